"""SFT: only reply tokens carry loss, reasoning stays inside <think>, packing keeps every label, and a tiny
model fine-tuned through the shared Trainer learns its reply."""

import json

import pytest
import torch

from nanoseek.chat import render_prompt
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
from nanoseek.train.loop import Trainer
from nanoseek.train.pretrain import init_weights
from nanoseek.train.sft import IGNORE, SFTBatches, SFTObjective, build_examples, pack, read_conversations
from test_chat import CHATML, make_tokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}]


def test_only_reply_tokens_carry_loss_and_reasoning_stays_in_think():
    tok = make_tokenizer(CHATML)
    ex1, ex2 = build_examples(tok, [CONV], seq_len=512)
    for ex, upto in ((ex1, 2), (ex2, 4)):
        prompt = render_prompt(tok, CONV[:upto], thinking=True if upto == 2 else None).ids
        assert ex.ids[:len(prompt)] == prompt
        assert ex.labels[:len(prompt)] == [IGNORE] * len(prompt)         # no loss on system/user/history
        target = [t for t in ex.labels if t != IGNORE]
        assert target == ex.ids[len(prompt):] and target[-1] == tok.eos_token_id
    assert tok.decode(ex1.ids[-len([t for t in ex1.labels if t != IGNORE]):-1]).endswith("add\n</think>\n\n4")
    assert tok.decode([t for t in ex2.labels if t != IGNORE][:-1]) == "6"
    # the second example's history holds the first reply without its reasoning (R1's convention)
    assert "add" not in tok.decode(ex2.ids[:len(ex2.ids) - 2])


def test_packing_keeps_every_label_and_shifts_them():
    tok = make_tokenizer(CHATML)
    examples = build_examples(tok, [CONV] * 3, seq_len=128)
    x, y = pack(examples, 128, pad_id=0)
    assert x.shape[1] == y.shape[1] == 128 and x.shape[0] < len(examples)   # several examples per row
    assert int((y != IGNORE).sum()) == sum(sum(t != IGNORE for t in e.labels) for e in examples)
    rows = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=torch.long)], 1)
    keep = y != IGNORE
    assert torch.equal(y[keep], rows[:, 1:][keep])                          # labels are the next inputs


def test_bad_data_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n{oops\n")
    with pytest.raises(BadInputError, match="d.jsonl:2"):
        read_conversations(f)
    with pytest.raises(BadInputError, match="no assistant turn"):
        build_examples(make_tokenizer(CHATML), [CONV[:2]], seq_len=64)


def test_tiny_model_learns_its_reply(tmp_path):
    tok = make_tokenizer(CHATML)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    x, y = pack(build_examples(tok, [conv], seq_len=64) * 4, 64, pad_id=0)
    torch.manual_seed(0)
    model = build_model(DenseConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    eos_token_id=tok.eos_token_id))
    init_weights(model, 0.02)
    cfg = TrainConfig(optim=OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0),
                      train=RunConfig(steps=80, device="cpu", out_dir=str(tmp_path), eval_every=0, ckpt_every=0,
                                      plots=False, log_every=1000))
    Trainer(cfg, model, SFTObjective(), SFTBatches(x, y, batch_size=1)).fit()
    model.eval()
    prompt = render_prompt(tok, conv[:1]).ids
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.text == "hello there" and out.finish_reason == "stop"
