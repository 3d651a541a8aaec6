"""Distillation: rejection-sampled teacher traces become SFT conversations; logit distillation pulls a
student's next-token distributions onto the teacher's."""

import json

import pytest
import torch
from test_chat import CHATML, make_tokenizer

from nanoseek.engine.request import Completion
from nanoseek.errors import BadInputError
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.tasks import get_task
from nanoseek.tasks.base import Problem
from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
from nanoseek.train.distill import KDObjective, generate_traces
from nanoseek.train.loop import LMForward, Trainer, read_jsonl
from nanoseek.train.pretrain import init_weights
from nanoseek.train.sft import SFTBatches, build_examples, pack, read_conversations


class ScriptedEngine:
    """Stands in for a teacher: returns fixed replies (the teacher is not under test; the filtering is)."""

    def __init__(self, tok, replies):
        self.tok, self.replies = tok, replies

    def generate(self, prompts, params, on_delta=None):
        assert len(prompts) == len(self.replies)
        return [Completion(index=i, prompt_tokens=len(p), token_ids=self.tok.encode(r, add_special_tokens=False),
                           finish_reason="stop") for i, (p, r) in enumerate(zip(prompts, self.replies))]


def test_traces_keep_only_correct_well_formed_replies(tmp_path):
    tok = make_tokenizer(CHATML)
    task = get_task("arithmetic", digits=1, ops="+", test_size=3)
    problems = [Problem("train/0", "What is 2 + 3?", "5"), Problem("train/1", "What is 4 + 4?", "8")]
    replies = ["two plus three is five </think> <answer>5</answer>",   # right (the prompt opened <think>)
               "<answer>5</answer>",                                     # right answer, no reasoning: format fails
               "four and four </think> <answer>9</answer>",             # well-formed, wrong
               "four and four </think> <answer>8</answer>"]             # right
    out = tmp_path / "traces.jsonl"
    counts = generate_traces(ScriptedEngine(tok, replies), tok, task, problems, out, samples=2)
    assert counts == {"problems": 2, "completions": 4, "kept": 2, "problems_covered": 2, "duplicates": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["train/0", "train/1"]
    reply = rows[0]["messages"][-1]
    assert reply == {"role": "assistant", "content": "<answer>5</answer>", "reasoning_content": "two plus three is five"}
    assert rows[0]["messages"][-2] == {"role": "user", "content": "What is 2 + 3?"}
    # the traces are SFT data as they stand
    assert build_examples(tok, read_conversations(out), seq_len=512)
    counts = generate_traces(ScriptedEngine(tok, replies), tok, task, problems, tmp_path / "f.jsonl", samples=2,
                             keep="formatted")
    assert counts["kept"] == 3
    # the same reply sampled twice is kept once
    counts = generate_traces(ScriptedEngine(tok, [replies[0]] * 2 + [replies[3]] * 2), tok, task, problems,
                             tmp_path / "d.jsonl", samples=2)
    assert (counts["kept"], counts["duplicates"]) == (2, 2)


def _tiny(tok, seed):
    torch.manual_seed(seed)
    m = build_model(DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                eos_token_id=tok.eos_token_id))
    init_weights(m, 0.3)
    return m


def test_kd_loss_is_zero_for_the_teacher_itself_and_checks_vocab():
    tok = make_tokenizer(CHATML)
    teacher = _tiny(tok, 0)
    x, y = pack(build_examples(tok, [[{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]], 64), 64, pad_id=0)
    loss, m = KDObjective(teacher, alpha=1.0).loss(LMForward(teacher), (x, y))
    assert abs(float(loss.detach())) < 1e-5 and float(m["ce"]) > 0
    with pytest.raises(BadInputError):
        KDObjective(teacher, alpha=1.5)


def test_student_moves_onto_the_teacher(tmp_path):
    tok = make_tokenizer(CHATML)
    teacher, student = _tiny(tok, 0), _tiny(tok, 1)
    convs = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]
             for w in ("one", "two", "three", "four")]
    x, y = pack(build_examples(tok, convs, 64), 64, pad_id=0)
    objective = KDObjective(teacher, alpha=1.0, temperature=2.0)
    with torch.no_grad():
        before = float(objective.loss(LMForward(student), (x, y))[0])
    cfg = TrainConfig(optim=OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0),
                      train=RunConfig(steps=40, device="cpu", out_dir=str(tmp_path), eval_every=0, ckpt_every=0,
                                      plots=False, log_every=1000))
    Trainer(cfg, student, objective, SFTBatches(x, y, batch_size=x.shape[0])).fit()
    kl = [r["kl"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert kl[0] == pytest.approx(before, rel=1e-4)
    assert kl[-1] < 0.3 * kl[0], kl
