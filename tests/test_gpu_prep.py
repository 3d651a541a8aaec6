"""The CPU half of the GPU run: the static-shape decode step (engine/graphs.py) gives the plain loop's greedy
tokens, and benchmarks/gpu.py runs end to end in its smoke mode."""

import logging

import pytest
import torch

from nanoseek.engine.generate import Engine
from nanoseek.engine.graphs import EagerCapture, GraphRunner, bucket, make_runner, window_for
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.step import ModelRunner
from test_engine import _tiny_deepseek, _tiny_dense


def _dense():
    return _tiny_dense(96)


def _deepseek():
    return _tiny_deepseek(96)


# Seven requests through four rows: rows join as others leave (different max_tokens), prompts are
# prefilled in chunks of 4 while other rows decode (pad rows land on prefilling rows), and positions cross
# windows 8, 16, 32 and 64.
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4] * 13, [30], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [2, 2], [7]]
MAX_TOKENS = [12, 5, 40, 9, 20, 3, 60]


def _generate(model, runner=None):
    eng = Engine(model, max_batch=4, prefill_chunk=4)
    if runner is not None:
        eng.runner = runner
    params = [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS]
    return [c.token_ids for c in eng.generate(PROMPTS, params)], eng


@pytest.mark.parametrize("make", [_dense, _deepseek])
def test_static_decode_gives_the_plain_greedy_tokens(make):
    model = make()
    plain, _ = _generate(model)
    runner = GraphRunner(model, backend=EagerCapture(), min_window=8)
    static, eng = _generate(model, runner)
    assert static == plain
    assert [len(t) for t in static] == MAX_TOKENS
    # The loop ran on the runner's one cache: 4 rows (3's bucket), max_len + 1 positions, never reallocated.
    assert eng.loop.cache.batch == 4 and eng.loop.cache.max_len == 97
    assert eng.loop.cache.layers[0] is runner.cache.layers[0]
    shapes = runner.graphs
    assert {b for b, _ in shapes} == {1, 2, 4}          # 3 decoding rows ran padded to 4 (row 3 prefilling)
    assert {8, 16, 32, 64} <= {w for _, w in shapes}    # windows followed the longest position


class _NoHostSync(EagerCapture):
    """EagerCapture whose step fails on any host sync visible from Python (reading a tensor's value:
    int(), bool(), item(), tolist(); bincount and nonzero, whose output size depends on values). A CUDA
    graph cannot capture those; on CPU this is the nearest check that the static step has none."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def capture(self, fn):
        def guarded():
            def sync(*a, **k):
                raise AssertionError("host sync inside the static decode step")

            with self.mp.context() as m:
                for name in ("__int__", "__bool__", "__float__", "item", "tolist", "nonzero", "bincount"):
                    m.setattr(torch.Tensor, name, sync)
                for name in ("bincount", "nonzero", "unique"):
                    m.setattr(torch, name, sync)
                return fn()

        return super().capture(guarded)


@pytest.mark.parametrize("make", [_dense, _deepseek])
def test_static_step_reads_no_tensor_values_on_the_host(make, monkeypatch):
    model = make()
    plain, _ = _generate(model)
    static, eng = _generate(model, GraphRunner(model, backend=_NoHostSync(monkeypatch), min_window=8))
    assert static == plain and eng.runner.graphs


def test_static_moe_path_matches_grouped_experts():
    model = _deepseek()
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(6, 32)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [3, 2]])
    w = torch.rand(6, 2)
    grouped = experts(x, idx, w)
    experts.static_shapes = True
    try:
        assert torch.allclose(experts(x, idx, w), grouped, atol=1e-5)
    finally:
        experts.static_shapes = False


def test_window_masks_every_row_even_alone():
    """A static window is longer than the row: keys past its position must be masked even at batch 1 (the
    plain path leaves single-row decode unmasked because there it reads exactly pos + 1 keys)."""
    model = _dense()
    at = model.model.rotary.positions(torch.tensor([[3]]), torch.float32, cached=True, window=8)
    assert at.length == 8 and at.mask is not None
    assert at.mask.flatten().tolist() == [True] * 4 + [False] * 4


def test_first_prefill_chunk_runs_causal_without_a_mask():
    model = _dense()
    at = model.model.rotary.positions(torch.arange(5)[None], torch.float32, cached=True)
    assert at.mask is None and at.length == 5
    later = model.model.rotary.positions(torch.arange(5, 9)[None], torch.float32, cached=True)
    assert later.mask is not None  # a later chunk reads earlier keys: not plain causal


def test_routing_is_recorded_through_the_eager_fallback():
    model = _deepseek()
    eng = Engine(model, max_batch=2)
    eng.runner = GraphRunner(model, backend=EagerCapture(), min_window=8)
    p = SamplingParams(temperature=0, max_tokens=6)
    out = eng.generate([[1, 2, 3], [4, 5]], p, record_routing=True)
    plain = Engine(model, max_batch=2).generate([[1, 2, 3], [4, 5]], p, record_routing=True)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert all(len(c.routing) == len(q.routing) > 0 for c, q in zip(out, plain))


def test_buckets_and_windows():
    assert [bucket(n) for n in (1, 3, 16, 17, 256, 300, 600)] == [1, 4, 16, 32, 256, 512, 768]
    assert window_for(1, 385) == 128 and window_for(129, 385) == 256 and window_for(300, 385) == 385


def test_cuda_graphs_on_cpu_fall_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nanoseek.engine.graphs"):
        runner = make_runner(_dense(), cuda_graphs=True)
    assert type(runner) is ModelRunner
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_gpu_benchmark_smoke(tmp_path):
    """benchmarks/gpu.py --smoke: every section at tiny sizes on CPU, with the packages the H100 lacks
    (gguf, fastapi, math_verify, pydantic, ...) made unimportable: the device run has no import or shape
    errors."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu.py"), "--smoke", "--out-dir",
                           str(tmp_path)], check=False, capture_output=True, text=True, timeout=180, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = next(tmp_path.glob("gpu-smoke-*.md")).read_text()
    assert "FAILED" not in text, text
    for heading in ("## 0. setup", "## 1. decode", "## 2. training", "## 3. GRPO", "## 4. profiles",
                    "## 5. extra: decode with compiled blocks", "## 6. extra: MoE decode"):
        assert heading in text
    assert text.count("greedy tokens, ") == 2 and "**NO**" not in text
    assert "| 4 | transformers generate |" in text and "| nanoseek |" in text
