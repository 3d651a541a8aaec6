"""One sampling rule, in SamplingParams.validate(), and every entry point applies it before any compute.

Near-zero values were the hole: 1e-40 passed a `> 0` check, then divided float32 logits into inf/NaN and
the engine step failed with an out-of-range token index. The rule (normal float32 values only) lives in
nanoseek/engine/sampling.py; the engine, the scheduler, the CLI commands, eval, GRPO and the HTTP schemas
all reach it, and the sampler is safe for every value the rule admits.
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.cli import main
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import Sampler, SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import BadInputError
from nanoseek.serve.schemas import ChatCompletionRequest, CompletionRequest
from nanoseek.serve.errors import ApiError
from test_engine import _tiny_dense

F32 = torch.finfo(torch.float32)

# Positive, finite as Python floats, and below float32's smallest normal number (1.18e-38): subnormal there
# (1e-40, 1e-45, tiny/2) or 0 once rounded (5e-324, 1e-300).
TOO_SMALL = [1e-40, 1e-45, F32.tiny / 2, 5e-324, 1e-300]
BAD = [*({field: v} for field in ("temperature", "top_p", "repetition_penalty") for v in TOO_SMALL),
       {"repetition_penalty": 1e300}]   # inf in float32, and 0·inf is NaN


def _name(kw: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in kw.items())


@pytest.mark.parametrize("kw", BAD, ids=_name)
def test_validate_refuses_values_float32_cannot_sample_with(kw):
    with pytest.raises(BadInputError, match=f"Invalid '{next(iter(kw))}'"):
        SamplingParams(max_tokens=4, **kw).validate()


def test_smallest_normal_values_are_valid():
    SamplingParams(temperature=F32.tiny, top_p=F32.tiny, repetition_penalty=F32.tiny).validate()
    SamplingParams(repetition_penalty=F32.max).validate()


@pytest.fixture(scope="module")
def counting():
    """A tiny model that counts its forward calls: a refused request must not reach the model."""
    model = _tiny_dense()
    inner = model.forward

    def forward(*args, **kwargs):
        model.calls += 1
        return inner(*args, **kwargs)

    model.forward, model.calls = forward, 0
    return model


@pytest.mark.parametrize("kw", [BAD[0], BAD[len(TOO_SMALL)], BAD[2 * len(TOO_SMALL)]], ids=_name)
def test_engine_generate_refuses_before_any_compute(counting, kw):
    eng = Engine(counting)
    good = SamplingParams(max_tokens=3, temperature=0)
    counting.calls = 0
    with pytest.raises(BadInputError):
        # the bad request comes second: nothing of the batch may run, not even the good one's prefill
        eng.generate([[1, 2, 3], [4, 5]], [good, SamplingParams(max_tokens=3, seed=0, **kw)])
    assert counting.calls == 0


@pytest.mark.parametrize("kw", [BAD[0], BAD[len(TOO_SMALL)], BAD[2 * len(TOO_SMALL)]], ids=_name)
def test_scheduler_submit_refuses_before_queueing(counting, kw):
    sched = Scheduler(counting, max_batch=2, prefix_cache_tokens=0)
    counting.calls = 0
    with pytest.raises(BadInputError):
        sched.submit([1, 2, 3], SamplingParams(max_tokens=3, seed=0, **kw))
    assert sched.stats()["waiting"] == 0
    sched.step()
    assert counting.calls == 0


# ---------------------------------------------------------------------------------------------------------
# Every value the rule admits samples without NaN


def test_smallest_temperature_samples_the_argmax_even_with_large_logits():
    # x / T overflows to +inf here (10 / 1.18e-38 > 3.4e38); the sampler must still return the limit, greedy.
    logits = torch.tensor([[3.0, 10.0, 9.0, -5.0], [50.0, -1e30, 49.0, 0.0]])
    sampler = Sampler.from_requests([SamplingParams(temperature=F32.tiny, seed=s) for s in (0, 1)], 4)
    for _ in range(3):
        assert sampler.sample(logits).tokens.tolist() == [1, 0]


def test_tiny_repetition_penalty_overflowing_logits_still_samples():
    # r < 1 divides a seen positive logit by r: 10 / 1.18e-38 is +inf in float32. Both seen tokens overflow;
    # sampling must pick one of them, not fail on NaN.
    params = SamplingParams(repetition_penalty=F32.tiny, top_p=0.9, seed=0)
    sampler = Sampler.from_requests([params], 5, prompts=[[1, 3]])
    for _ in range(5):
        assert int(sampler.sample(torch.tensor([[2.0, 10.0, 0.5, 20.0, -1.0]])).tokens[0]) in (1, 3)


def test_engine_at_the_smallest_temperature_equals_greedy():
    eng = Engine(_tiny_dense())
    greedy = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    tiny = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=F32.tiny, seed=3))[0].token_ids
    assert tiny == greedy


# ---------------------------------------------------------------------------------------------------------
# The other entry points: CLI, eval, GRPO (one line on stderr, no traceback, before loading a model), HTTP


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or running GRPO) fails the test: bad arguments must be refused before that."""
    def refuse(*a, **k):
        raise AssertionError("the bad argument must be refused before a model loads")

    monkeypatch.setattr("nanoseek.cli._session", refuse)
    monkeypatch.setattr("nanoseek.train.grpo.run_grpo", refuse)


@pytest.mark.parametrize("argv, param", [
    (["generate", "hi", "--temperature", "1e-40"], "temperature"),
    (["chat", "--repetition-penalty", "1e-40"], "repetition_penalty"),
    (["eval", "--task", "arithmetic", "--temperature", "1e-40"], "temperature"),
    (["eval", "--task", "arithmetic", "--top-p", "1e-45"], "top_p"),
    (["grpo", "--task", "arithmetic", "--out", "{tmp}", "--temperature", "1e-40"], "temperature"),
    (["grpo", "--task", "arithmetic", "--out", "{tmp}", "--top-p", "1e-40"], "top_p"),
])
def test_cli_commands_refuse_in_one_line(argv, param, tmp_path, capsys, no_model):
    rc = main([a.format(tmp=tmp_path / "run") for a in argv])
    err = capsys.readouterr().err
    assert rc == BadInputError.exit_code
    assert err.startswith(f"nanoseek: error: Invalid '{param}'") and err.count("\n") == 1, err


def test_grpo_needs_a_sampling_temperature(tmp_path, capsys, no_model):
    rc = main(["grpo", "--task", "arithmetic", "--out", str(tmp_path / "run"), "--temperature", "0"])
    assert rc == BadInputError.exit_code and "temperature must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("cls, body", [(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
                                       (CompletionRequest, {"prompt": "hi"})], ids=["chat", "completions"])
@pytest.mark.parametrize("kw", BAD, ids=_name)
def test_http_requests_get_the_rules_400(cls, body, kw):
    """The schemas hold no copy of the rule: the 400 carries SamplingParams.validate()'s own message."""
    with pytest.raises(BadInputError) as rule:
        SamplingParams(**kw).validate()
    with pytest.raises(ApiError) as info:
        cls.parse({"model": "m", **body, **kw})
    err = info.value
    assert (err.status, err.param, err.message) == (400, next(iter(kw)), str(rule.value))
    assert err.body()["error"]["type"] == "invalid_request_error"
