"""A static-shape decode step, captured once per shape and replayed: CUDA graphs for the decode loop.

Batch-1 decode of a small model is bound by launching kernels (hundreds per token), not by the GPU; a CUDA
graph replays a whole step as one launch. A graph fixes every tensor's shape and address, so this runner
(a `ModelRunner`, chosen by `make_runner`; the loop in engine/scheduler.py does not change) makes decode
static:

  * the cache is allocated once at full size (`new_cache`): rows for the largest batch bucket, and
    `max_len + 1` positions, so `RowTable` never reallocates it and graph addresses stay valid;
  * the batch is padded up to a bucket (1, 2, 4, ..., 256). Pad rows are rows past the decoding block
    (prefilling or free); they write their key/value at the scratch position `max_len`, which no request
    ever reaches (prompts and generations end before `max_len`), so no real row reads what they write;
  * attention reads a fixed window of keys, bucketed by the step's longest position (known on the host,
    from the Python positions the loop passes in, so no device sync), masked by position
    (`CausalLM.forward(window=...)`);
  * MoE layers compute every expert for every token (`Experts.static_shapes`), instead of sorting tokens
    into data-dependent groups.

One graph per (batch bucket, window), captured lazily on first use; inputs are copied into static buffers
before each replay. `Capture` is the CUDA backend; `EagerCapture` (CPU, and tests) "captures" by keeping the
callable and "replays" by calling it on the same static buffers, so CPU tests check everything but the
graph itself: padding, scratch writes, windows and the static MoE path give the plain path's tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch

from nanoseek.engine.rows import grow
from nanoseek.engine.step import ModelRunner
from nanoseek.models.cache import Cache

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_WINDOW = 128  # smallest attention window; windows double from here up to the cache's positions


def bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket ≥ n; past the largest, the next multiple of it (a bounded number of graphs)."""
    return next((b for b in buckets if b >= n), -(-n // buckets[-1]) * buckets[-1])


def window_for(length: int, positions: int, smallest: int = MIN_WINDOW) -> int:
    """The attention window for a step whose longest row needs `length` keys, in a cache of `positions`."""
    return grow(smallest, length, positions)


@contextlib.contextmanager
def static_shapes(model: torch.nn.Module):
    """Switch the modules with a static-shape alternative (MoE experts) onto it for the block's duration."""
    mods = [m for m in model.modules() if hasattr(m, "static_shapes")]
    saved = [m.static_shapes for m in mods]
    for m in mods:
        m.static_shapes = True
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.static_shapes = s


class EagerCapture:
    """CPU stand-in for CUDA graphs: capture keeps the callable, replay calls it again (same static buffers)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        out = fn()

        def replay() -> torch.Tensor:
            out.copy_(fn())
            return out

        return replay


class Capture:
    """CUDA graphs: warm up on a side stream (lazy inits, cuBLAS workspaces), capture, replay. All graphs
    share one memory pool (they never run concurrently)."""

    def __init__(self):
        self._pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the inputs are this step's: the warm-up writes what replay will write
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA while the loop thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class GraphRunner(ModelRunner):
    """`ModelRunner` whose decode runs padded, static-shape steps, captured per (batch bucket, window).

    `backend`: `Capture()` on CUDA, `EagerCapture()` elsewhere. Falls back to the plain decode when it cannot
    replay: while MoE routing is being recorded (router hooks do not run inside a graph), or when the loop
    hands it rows of another cache than the one it allocated."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, eos_token_ids: Sequence[int] | None = None,
                 backend: EagerCapture | Capture | None = None, min_window: int = MIN_WINDOW):
        super().__init__(model, tokenizer, eos_token_ids)
        self.min_window = min_window
        self.backend = backend or (Capture() if self.device.type == "cuda" else EagerCapture())
        self.cache: Cache | None = None
        self.scratch = 0          # the position pad rows write (= max_len, one past the last real one)
        self._inputs: torch.Tensor | None = None   # [2, rows]: token ids, positions (static buffer)
        self._replays: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}

    def new_cache(self, max_batch: int, max_len: int) -> Cache:
        """The full cache, once: rows for `max_batch`'s bucket, `max_len` positions plus the scratch one."""
        rows = bucket(max_batch)
        self.cache = self.model.new_cache(rows, max_len + 1)
        self.scratch = max_len
        self._inputs = torch.zeros(2, rows, dtype=torch.long, device=self.device)
        self._replays.clear()
        # Grow the rotary table to cover the scratch position now: a graph must never rebuild it. Outside
        # inference mode (the loop builds its cache inside it): the table is the model's, and training
        # (GRPO between rollouts) must be able to use it like any other buffer.
        rotary = self.model.model.rotary
        with torch.inference_mode(False):
            rotary.tables(torch.zeros(1, dtype=torch.long, device=self.device), torch.float32, max_len + 1)
        return self.cache

    @property
    def graphs(self) -> list[tuple[int, int]]:
        """The (batch, window) shapes captured so far."""
        return sorted(self._replays)

    def _usable(self, rows: Cache) -> bool:
        if self.cache is None or self.recorder.on:
            return False
        mine = next(t for t in vars(self.cache.layers[0]).values() if isinstance(t, torch.Tensor))
        theirs = next(t for t in vars(rows.layers[0]).values() if isinstance(t, torch.Tensor))
        return mine.data_ptr() == theirs.data_ptr()

    def decode(self, tokens: Sequence[int], positions: Sequence[int], rows: Cache) -> torch.Tensor:
        if not self._usable(rows):
            return super().decode(tokens, positions, rows)
        d = len(tokens)
        b = min(bucket(d), self.cache.batch)
        w = window_for(max(positions) + 1, self.cache.max_len, self.min_window)
        pad = b - d
        # One host-to-device copy of this step's inputs; pad rows feed token 0 at the scratch position.
        host = torch.tensor([list(tokens) + [0] * pad, list(positions) + [self.scratch] * pad], dtype=torch.long)
        self._inputs[:, :b].copy_(host, non_blocking=True)
        replay = self._replays.get((b, w))
        if replay is None:
            replay = self._replays[(b, w)] = self.backend.capture(self._step(b, w))
            log.info("captured a decode step for batch %d, window %d", b, w)
        return replay()[:d].clone()  # the static output is overwritten by the next replay

    def _step(self, b: int, w: int) -> Callable[[], torch.Tensor]:
        ids, pos = self._inputs[0, :b, None], self._inputs[1, :b, None]
        rows = self.cache.rows(0, b)
        model = self.model

        def step() -> torch.Tensor:
            with static_shapes(model):
                return model(ids, pos, rows, window=w)[:, -1]

        return step


def make_runner(model: torch.nn.Module, tokenizer=None, eos_token_ids: Sequence[int] | None = None, *,
                cuda_graphs: bool = False) -> ModelRunner:
    """The runner for a loop: `GraphRunner` with CUDA graphs when asked for and the model is on CUDA; the
    plain `ModelRunner` otherwise (a CPU model ignores the request, with a log line saying so)."""
    device = next(model.parameters()).device
    if cuda_graphs and device.type == "cuda":
        return GraphRunner(model, tokenizer, eos_token_ids)
    if cuda_graphs:
        log.warning("--cuda-graphs ignored: the model is on %s, CUDA graphs need a CUDA device", device)
    return ModelRunner(model, tokenizer, eos_token_ids)
