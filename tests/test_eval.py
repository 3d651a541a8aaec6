"""Evaluation: metrics equal a direct computation — on scripted completions with hand-worked numbers, and on
a tiny random model whose samples are regenerated here with the same seeds and scored by hand."""

import json
import math
from collections import Counter

import pytest
import torch
from test_chat import CHATML, make_tokenizer

from nanoseek.cli import main
from nanoseek.engine.generate import Engine
from nanoseek.engine.request import Completion
from nanoseek.engine.sampling import SamplingParams
from nanoseek.evaluate import (
    EvalConfig,
    Sample,
    completion_text,
    estimate,
    evaluate,
    majority,
    sample_seed,
    wilson,
    write_report,
)
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.tasks import Task, Template, get_task
from nanoseek.tasks.base import Problem

Z = 1.959963984540054


def test_wilson_and_normal_intervals():
    assert wilson(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))   # textbook values
    assert wilson(10, 10)[1] == 1.0
    e = estimate([0.75, 0.25, 0.5])
    half = Z * math.sqrt((0.0625 + 0.0625 + 0) / 2 / 3)
    assert (e.value, e.low, e.high, e.n) == (0.5, pytest.approx(0.5 - half), pytest.approx(0.5 + half), 3)
    assert estimate([1.0, 0.0, 1.0, 1.0]).low == pytest.approx(wilson(3, 4)[0])   # 0/1 values: Wilson


def test_majority_groups_values_and_breaks_ties_by_first_seen():
    task = get_task("arithmetic")
    assert majority(task, ["7", "1,000", None, "1000.0"]) == 1          # 1,000 and 1000.0 are one vote each
    assert majority(task, ["1,000", "7", None, "1000.0", "7"]) == 0     # 1000 ×2 ties 7 ×2: 1000 was first
    assert majority(task, [None, "6", "5", "5"]) == 2
    assert majority(task, [None, None]) is None


# --- scripted completions, numbers worked by hand -----------------------------------------------------------

SCRIPT = [  # (text the engine returns, whether it stopped on "</answer>"); the chat prompt opened <think>
    # problem 0, answer 18: samples, then greedy
    ("a</think><answer>18", True), ("a</think><answer>18", True), ("18", False),
    ("b</think><answer>17", True), ("x</think><answer>17", True),
    # problem 1, answer 7
    ("c</think><answer>6", True), ("6", False), ("c</think><answer>7", True), ("seven", False),
    ("c</think><answer>7", True),
]


class ScriptedEngine:
    """Plays SCRIPT back in job order, checking the sampling parameters evaluate asks for."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def generate(self, prompts, params, on_delta=None):
        self.calls += 1
        assert len(prompts) == len(params) == len(SCRIPT)
        seeds = [p.seed for p in params if p.temperature > 0]
        assert len(set(seeds)) == 8 and all(p.stop == ["</answer>"] for p in params)
        assert [p.temperature for p in params] == [0.6] * 4 + [0.0] + [0.6] * 4 + [0.0]
        assert all(p.top_p == 0.95 and p.max_tokens == 512 for p in params if p.temperature > 0)
        outs = []
        for i, (text, stopped) in enumerate(SCRIPT):
            ids = self.tok.encode(text + ("</answer>" if stopped else ""), add_special_tokens=False)
            outs.append(Completion(i, len(prompts[i]), ids, text, "stop"))
        return outs


def test_metrics_on_scripted_completions():
    tok = make_tokenizer(CHATML)
    task = get_task("arithmetic")
    probs = [Problem("a", "What is 15 + 3?", "18"), Problem("b", "What is 3 + 4?", "7")]
    report = evaluate(ScriptedEngine(tok), tok, task, EvalConfig(), probs, progress=False)
    m = {k: v.value for k, v in report.metrics.items()}
    # Lenient answers: [18, 18, 18, 17] and [6, 6, 7, none]; well-formed ones: [18, 18, 17] and [6, 7].
    assert m == {"answer/pass@1": (3 / 4 + 1 / 4) / 2, "answer/maj@4": (1 + 0) / 2, "answer/pass@4": 1.0,
                 "answer/greedy": (0 + 1) / 2,
                 "strict/pass@1": (2 / 4 + 1 / 4) / 2, "strict/maj@4": (1 + 0) / 2,   # 6 vs 7 tie: 6 seen first
                 "strict/pass@4": 1.0, "strict/greedy": (0 + 1) / 2}
    assert report.stats["format_rate"] == 7 / 10
    assert report.stats["mean_reward"] == pytest.approx((1 + 1 + 0 + 0.1 + 0.1 + 0.1 + 0 + 1 + 0 + 1) / 10)
    e = report.metrics["answer/pass@1"]
    half = Z * math.sqrt(((0.75 - 0.5) ** 2 + (0.25 - 0.5) ** 2) / 1 / 2)
    assert (e.low, e.high) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert report.metrics["answer/greedy"].low == pytest.approx(wilson(1, 2)[0])
    assert report.results[0].samples[0].text == "a</think><answer>18</answer>"   # stop string restored


def test_completion_text_keeps_the_stop_and_special_tags():
    tok = make_tokenizer(CHATML)     # <think> and </think> are special tokens in this vocabulary

    def done(text, reason="stop"):
        return Completion(0, 1, tok.encode(text, add_special_tokens=False), "(engine text)", reason)

    assert completion_text(tok, done("a</think><answer>5</answer>"), ["</answer>"]) == "a</think><answer>5</answer>"
    assert completion_text(tok, done("<answer>5"), ["</answer>"]) == "<answer>5"          # ended by EOS
    assert completion_text(tok, done("<answer>5", "length"), ["</answer>"]) == "<answer>5"
    assert completion_text(tok, done("x</answer>y</answer>"), ["</answer>", "y"]) == "x</answer>"   # first stop


# --- a tiny random model: regenerate the same samples directly and score them by hand -----------------------


def _tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


class FirstCharTask(Task):
    """Answer = the completion's first non-space character: random text then gets some right and some wrong."""

    name, numeric = "first-char", False

    def __init__(self, problems):
        super().__init__()
        self._problems = problems

    def iter_problems(self, split="test"):
        yield from self._problems

    def extract_answer(self, completion, *, started_in_think=False):
        return completion.strip()[:1] or None

    def check(self, answer, problem):
        return answer == problem.answer


def test_eval_numbers_equal_direct_computation():
    tok = make_tokenizer(CHATML)
    engine = Engine(_tiny_model(tok), tok, max_batch=7)
    cfg = EvalConfig(samples=3, max_tokens=6, seed=11)
    ids = [f"p{i}" for i in range(6)]
    template = Template("chat")
    prompt = template.render(tok, Problem("x", "Say something.", "")).ids

    def direct(pid, j):   # one completion, alone, outside evaluate
        sp = SamplingParams(max_tokens=6, stop=["</answer>"], **(
            {"temperature": 0.0} if j < 0 else {"temperature": 0.6, "top_p": 0.95, "seed": sample_seed(11, pid, j)}))
        return completion_text(tok, engine.generate([prompt], sp)[0], ["</answer>"])

    texts = {(pid, j): direct(pid, j) for pid in ids for j in (-1, 0, 1, 2)}
    first = {key: t.strip()[:1] or None for key, t in texts.items()}
    # References chosen so that some problems are right by sample 0, some by greedy, some never.
    answers = [first[(pid, 0)] if i % 3 == 0 else first[(pid, -1)] if i % 3 == 1 else "\u2603"
               for i, pid in enumerate(ids)]
    probs = [Problem(pid, "Say something.", a or "") for pid, a in zip(ids, answers)]
    report = evaluate(engine, tok, FirstCharTask(probs), cfg, progress=False)

    for r, pid in zip(report.results, ids):
        assert [s.text for s in r.samples] == [texts[(pid, j)] for j in range(3)]
        assert r.greedy.text == texts[(pid, -1)]
    frac, maj, anyk, greedy = [], [], [], []
    for pid, gold in zip(ids, answers):
        got = [first[(pid, j)] for j in range(3)]
        right = [a is not None and a == gold for a in got]
        frac.append(sum(right) / 3)
        anyk.append(float(any(right)))
        votes = Counter(a for a in got if a is not None)
        top = max(votes.values()) if votes else 0
        winner = next((a for a in got if a is not None and votes[a] == top), None)
        maj.append(float(winner is not None and winner == gold))
        greedy.append(float(first[(pid, -1)] == gold))
    m = report.metrics
    assert m["answer/pass@1"].value == pytest.approx(sum(frac) / 6)
    assert m["answer/maj@3"].value == pytest.approx(sum(maj) / 6)
    assert m["answer/pass@3"].value == pytest.approx(sum(anyk) / 6)
    assert m["answer/greedy"].value == pytest.approx(sum(greedy) / 6)
    assert 0 < m["answer/pass@1"].value < 1 and 0 < m["answer/greedy"].value < 1
    mean = sum(frac) / 6
    half = Z * math.sqrt(sum((f - mean) ** 2 for f in frac) / 5 / 6)
    assert m["answer/pass@1"].low == pytest.approx(max(0.0, mean - half))
    assert m["answer/greedy"].low == pytest.approx(wilson(round(sum(greedy)), 6)[0])
    assert report.stats["format_rate"] == 0.0 and m["strict/pass@1"].value == 0.0   # random text is never well-formed


# --- the command --------------------------------------------------------------------------------------------


def test_cli_eval_writes_report(tmp_path, capsys):
    from nanoseek.weights.hf import save_hf

    tok = make_tokenizer(CHATML)
    save_hf(_tiny_model(tok, seed=1), tmp_path / "tiny", tokenizer=tok)
    out = tmp_path / "report.json"
    rc = main(["eval", "--model", str(tmp_path / "tiny"), "--task", "arithmetic", "--task-arg", "digits=1",
               "--task-arg", "test_size=20", "--limit", "3", "--samples", "2", "--max-tokens", "5", "--quant", "none",
               "--out", str(out), "--keep-samples"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "maj@2" in printed and f"wrote {out}" in printed
    rep = json.loads(out.read_text())
    assert rep["task"] == "arithmetic" and rep["task_args"] == {"digits": 1, "test_size": 20}
    assert rep["config"]["samples"] == 2 and rep["config"]["temperature"] == 0.6
    assert rep["stats"]["problems"] == 3 and rep["stats"]["completions"] == 9
    rows = rep["problems"]
    assert [len(r["samples"]) for r in rows] == [2, 2, 2] and all("text" in r["greedy"] for r in rows)
    assert rep["metrics"]["answer/pass@1"]["value"] == pytest.approx(sum(r["correct"] / 2 for r in rows) / 3)
    assert rep["metrics"]["answer/pass@1"]["n"] == 3
    lo, hi = rep["metrics"]["answer/greedy"]["ci95"]
    assert 0 <= lo <= rep["metrics"]["answer/greedy"]["value"] <= hi <= 1


@pytest.mark.parametrize("argv, code, message", [
    (["--task", "nope"], 2, "unknown task"),
    (["--task", "gsm8k"], 3, "needs path"),
    (["--task", "arithmetic", "--temperature", "0"], 3, "temperature"),
    (["--task", "arithmetic", "--task-arg", "digits"], 3, "KEY=VALUE"),
    (["--task", "arithmetic", "--template", "r1-zero", "--samples", "0", "--no-greedy"], 3, "samples"),
])
def test_cli_eval_bad_input(argv, code, message, capsys):
    assert main(["eval", *argv]) == code
    assert message in capsys.readouterr().err


def test_write_report_is_atomic(tmp_path):
    tok = make_tokenizer(CHATML)
    probs = [Problem("a", "What is 15 + 3?", "18"), Problem("b", "What is 3 + 4?", "7")]
    report = evaluate(ScriptedEngine(tok), tok, get_task("arithmetic"), EvalConfig(), probs, progress=False)
    path = write_report(report, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["metrics"]["answer/maj@4"]["value"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert "samples" not in json.loads(path.read_text())["problems"][0]   # texts only with keep_samples
    assert isinstance(report.results[0].samples[0], Sample)
