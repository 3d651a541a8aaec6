"""Multi-turn tool episodes: the calculator, the Python sandbox's limits, a scripted fake model exercising
tool parsing and the loss mask, sandbox violations ending an episode with reward 0 (never an exception), and
the reward path through GRPO (a scripted policy that uses the calculator is the one rewarded)."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from test_chat import CHATML, make_tokenizer

from nanoseek.engine.request import Completion
from nanoseek.sandbox import SandboxLimits, run_python
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.tools import ToolTask, calculate, render_conversation, run_episodes
from nanoseek.toolcall import RESPONSE_OPEN, format_call

FAST = SandboxLimits(cpu_s=1, wall_s=5, memory_mb=256, output_bytes=256)


def test_calculator():
    assert calculate("12 * (3 + 4)") == "84"
    assert calculate("7 / 2") == "3.5" and calculate("2 ** 10") == "1024" and calculate("-3 // 2") == "-2"
    for bad in ("__import__('os')", "2 ** 1000", "1 / 0", "x + 1", "", "1" * 300):
        with pytest.raises(ValueError):
            calculate(bad)


def test_sandbox_limits():
    assert run_python("import math\nmath.factorial(10)", FAST).output == "3628800\n"
    assert run_python("print(sum(range(5)))", FAST).output == "10\n"
    err = run_python("1 / 0", FAST)
    assert err.violation is None and "ZeroDivisionError" in err.error
    assert run_python("while True:\n    pass", FAST).violation == "timeout"
    assert run_python("x = bytearray(1 << 30)", FAST).violation == "memory"
    assert run_python("print('a' * 1000)", FAST).violation == "output"
    for mod in ("os", "socket", "subprocess", "from os import path"):
        r = run_python(mod if mod.startswith("from") else f"import {mod}", FAST)
        assert r.violation == "import" and "refused" in r.detail, r
    # The code's own `except` cannot swallow a violation.
    assert run_python("try:\n    import socket\nexcept BaseException:\n    print('caught')", FAST).violation == "import"
    # Scratch working directory: a relative write lands in a fresh, deleted directory.
    assert run_python("open('f.txt', 'w').write('hi')\nopen('f.txt').read()", FAST).output == "'hi'\n"
    import os

    if os.geteuid() == 0:   # root: the child runs in its own network namespace
        assert run_python("1", FAST).network_isolated


class Scripted:
    """A fake model: a first turn that calls a tool, then an answer that uses the tool's result. `code` picks
    the call; `use_tool(seed)` decides per episode whether it calls the tool or guesses."""

    def __init__(self, tok, call=None, use_tool=lambda seed: True):
        self.tok, self.call, self.use_tool = tok, call, use_tool
        self.turns = []

    def __call__(self, prompts, params, record_routing=False):
        outs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            text = self.tok.decode(ids, skip_special_tokens=False)
            self.turns.append(text)
            expr = text.split("What is ")[-1].split("?")[0]
            if RESPONSE_OPEN not in text and self.use_tool(p.seed):
                name, args = self.call or ("calculator", {"expression": expr})
                reply, stop = format_call(name, json.dumps(args)), self.tok.eos_token_id
            else:
                value = text.split(RESPONSE_OPEN + "\n")[-1].split("\n")[0] if RESPONSE_OPEN in text else "7"
                reply, stop = f"<think>the tool says {value}</think> <answer>{value}</answer>", None
            outs.append(Completion(i, len(ids), self.tok.encode(reply, add_special_tokens=False), reply, "stop",
                                   stop_token=stop))
        return outs


def _params(n, seed=0):
    from nanoseek.engine.sampling import SamplingParams

    return [SamplingParams(max_tokens=64, temperature=1.0, seed=seed + i, stop=["</answer>"]) for i in range(n)]


def test_scripted_episode_parses_calls_and_masks_the_loss():
    tok = make_tokenizer(CHATML)
    task = ToolTask(ArithmeticTask(digits=3), ("calculator", "python"))
    problems = task.problems("test", 2)
    eps = run_episodes(Scripted(tok), tok, task, problems, _params(2))
    for e, p in zip(eps, problems):
        assert e.turns == 2 and e.calls == 1 and e.violation is None
        assert e.results[0]["output"] == p.answer
        r = e.score(task)
        assert r.accuracy == 1.0 and r.total == 1.0
        # The sequence is the conversation as serve's renderer writes it (tools in the system message, the
        # result as a <tool_response> turn), ending with the model's answer.
        whole = render_conversation(tok, e.messages, task.functions).text
        text = tok.decode(e.ids, skip_special_tokens=False)
        assert text.startswith(whole) and text.endswith("</answer>")
        assert '"name": "calculator"' in whole and "<tools>" in whole
        # The loss mask: exactly the model's two turns (with the token that ended the first).
        own = tok.decode([t for t, m in zip(e.ids, e.own) if m], skip_special_tokens=False)
        assert own == format_call("calculator", json.dumps({"expression": p.prompt[8:-1]})) + "<|im_end|>" + \
            f"<think>the tool says {p.answer}</think> <answer>{p.answer}</answer>"
        assert RESPONSE_OPEN not in own and sum(e.own[:e.prompt_len]) == 0


@pytest.mark.parametrize("code,violation", [("import os", "import"), ("import socket", "import"),
                                            ("while True:\n    pass", "timeout"),
                                            ("x = bytearray(1 << 30)", "memory")])
def test_sandbox_violation_ends_the_episode_with_reward_zero(caplog, code, violation):
    tok = make_tokenizer(CHATML)
    task = ToolTask(ArithmeticTask(), ("python",), limits=FAST)
    with caplog.at_level(logging.WARNING, logger="nanoseek.tools"):
        [e] = run_episodes(Scripted(tok, call=("python", {"code": code})), tok, task, task.problems("test", 1),
                           _params(1))
    assert e.violation == violation and e.finish_reason == "violation" and e.turns == 1
    assert e.score(task).total == 0.0
    assert any("sandbox violation" in r.message and violation in r.message for r in caplog.records)


def test_wrong_calls_are_results_the_model_reads():
    tok = make_tokenizer(CHATML)
    task = ToolTask(ArithmeticTask(), ("calculator",))
    fake = Scripted(tok, call=("weather", {"city": "Paris"}))
    [e] = run_episodes(fake, tok, task, task.problems("test", 1), _params(1))
    assert e.violation is None and e.turns == 2 and "unknown tool 'weather'" in fake.turns[-1]


def test_reward_path_through_grpo():
    """A scripted policy calls the calculator in about half of its episodes and guesses otherwise: through
    GRPO's rollout, the tool users get reward 1 and positive advantages, the guessers 0 and negative; the
    loss mask covers the model's own tokens only."""
    from test_grpo import _policy

    from nanoseek.train.grpo import GRPOConfig, Rollouts

    tok = make_tokenizer(CHATML)
    task = ToolTask(ArithmeticTask(digits=3), ("calculator",))
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=64, template="chat", open_think=False)
    src = Rollouts(_policy(tok), tok, task, cfg, micro_batches=1)
    src.engine.generate = Scripted(tok, use_tool=lambda seed: random.Random(seed).random() < 0.5)
    src.engine.runner.context = 4096   # the stand-in model has no context limit (the tiny policy's is 64)
    batch = src.next_batch()
    rewards = batch.advantages > 0
    assert 0 < int(rewards.sum()) < 16
    for b in range(16):
        targets = [int(batch.ids[b, t + 1]) for t in range(batch.mask.shape[1]) if batch.mask[b, t]]
        own = tok.decode(targets, skip_special_tokens=False)
        assert RESPONSE_OPEN not in own
        assert ("<tool_call>" in own) == bool(rewards[b])     # the calculator users are the rewarded ones
    assert batch.stats["accuracy"] == pytest.approx(float(rewards.float().mean()))
    assert batch.stats["tool_calls"] == pytest.approx(float(rewards.float().mean()))


def test_grpo_and_eval_run_tool_tasks_with_a_real_tiny_model(tmp_path):

    from nanoseek.engine.generate import Engine
    from nanoseek.evaluate import EvalConfig, evaluate
    from nanoseek.models import build_model
    from nanoseek.models.config import DenseConfig
    from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
    from nanoseek.train.grpo import GRPOConfig, GRPOObjective, Rollouts
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import init_weights

    tok = make_tokenizer(CHATML)
    torch.manual_seed(0)
    policy = build_model(DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    init_weights(policy, 0.02)
    task = ToolTask(ArithmeticTask(), ("calculator",), max_turns=2)
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=8, template="chat", open_think=False)
    tcfg = TrainConfig(optim=OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0),
                       train=RunConfig(steps=2, device="cpu", out_dir=str(tmp_path / "run"), eval_every=0,
                                       ckpt_every=0, plots=False, log_every=1000))
    last = Trainer(tcfg, policy, GRPOObjective(cfg), Rollouts(policy, tok, task, cfg, micro_batches=1)).fit()
    assert torch.isfinite(torch.tensor(last["train"]["loss"]))
    report = evaluate(Engine(policy, tok), tok, task, EvalConfig(samples=1, max_tokens=8, limit=2, template="chat",
                                                                 open_think=False), progress=False)
    assert report.stats["problems"] == 2
