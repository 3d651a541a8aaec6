"""Continuous batching: one engine loop that requests join and leave between steps (the server's core).

Owns:
  * `Scheduler`: a bounded wait queue, ONE cache of `max_batch` rows whose length follows the longest live
    request (doubling up to `max_len`, shrinking when idle), the prefix cache (engine/prefix.py) whose blocks
    are copied into a row when a prompt starts with them, and the loop that fills the rows. `submit` (any thread) enqueues; `step` runs one iteration; `start`/`stop` run
    `step` in a daemon thread that sleeps on a condition variable while there is nothing to do.
  * `RequestHandle`: what `submit` returns — a thread-safe stream of `Delta`s ending with one that carries
    `finish_reason`, `cancel()`, blocking `result()`, and timings.

Row layout. Live requests always occupy cache rows [0, n): rows [0, d) are decoding, rows [d, n) are still
prefilling, so each decode step runs on the view `cache.rows(0, d)` — no gather, no copy. A new request is
admitted at row n. When a decoding row i leaves, the last decoding row d-1 is copied into i and the last
prefilling row into d-1 (only the positions already written are copied: the rest of a row is never read,
since attention masks keys by position). When a prefill completes, its row is swapped with row d and d grows.

One iteration (`step`):
  1. drop cancelled requests (waiting ones and rows), admit waiting requests into free rows;
  2. prefill at most `prefill_chunk` prompt tokens in total, oldest request first, so a long prompt is spread
     over several iterations instead of stalling the running decodes;
  3. one decode forward for the rows that were decoding before this step;
  4. sample the next token of every decoding row — those rows' decode logits plus the last-position logits of
     prompts that just finished prefilling — with one `Sampler`, rebuilt only when the rows change;
  5. emit deltas and free the rows of finished requests.

Per-request bookkeeping (detokenizer, stop strings, finish reasons, logprobs) is generate.RequestState, the
same as `Engine.generate` uses, so a request's output does not depend on which of the two ran it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

import torch

from nanoseek.engine.generate import Completion, Delta, Engine, RequestState, check_prompt, logprob_rows
from nanoseek.engine.prefix import PrefixCache
from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.errors import BadInputError, QueueFullError

log = logging.getLogger(__name__)


class RequestHandle:
    """One submitted request, as seen by the thread that submitted it.

    Iterate it for the `Delta`s (blocks; the last one has `finish_reason` set), or call `result()` for the
    whole `Completion`. Both raise the engine's exception if the loop failed while running the request.
    Timestamps are `time.monotonic()` seconds: submitted, admitted (got a row), first_token, finished."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, on_delta, cache_salt: bytes = b""):
        self.id, self.prompt, self.params = rid, prompt, params
        self.cache_salt = cache_salt      # the prefix-cache namespace this request reads and writes
        self._on_delta = on_delta
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = False
        self._error: BaseException | None = None
        self.completion: Completion | None = None
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self._wake: Callable[[], None] = lambda: None  # set by the scheduler: wakes its loop

    def cancel(self) -> None:
        """Ask for the request to end; its row is freed at the start of the loop's next step."""
        self._cancel = True
        self._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        while True:
            item = self._deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.completion

    # timings in seconds (None until known)
    @property
    def queued_s(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def total_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    # -- called by the loop thread --

    def _emit(self, delta: Delta) -> None:
        if self._on_delta is not None:
            try:
                self._on_delta(delta)
            except Exception:  # a consumer's bug must not take the loop (and every other request) down
                log.exception("on_delta callback of request %d failed", self.id)
        self._deltas.put(delta)

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self.finished = time.monotonic()
        self.completion, self._error = completion, error
        if completion is not None:
            completion.total_s = self.finished - self.submitted
        if error is not None:
            self._deltas.put(error)
        self._done.set()


class _Slot:
    """A request holding a cache row. `filled` prompt tokens are in the cache; once it equals the prompt
    length the row decodes, feeding `next_token` at `state.pos` each step."""

    def __init__(self, handle: RequestHandle, state: RequestState, row: int):
        self.handle, self.state, self.row = handle, state, row
        self.filled = 0
        self.next_token: int | None = None

    @property
    def decoding(self) -> bool:
        return self.filled == len(self.state.prompt)

    @property
    def length(self) -> int:
        """Cache positions of this row that hold data."""
        return self.state.pos if self.decoding else self.filled

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values this row holds, position by position: the prompt so far, then
        every sampled token that was fed back (the last sampled one never is)."""
        prompt = self.state.prompt
        if not self.decoding:
            return prompt[:self.filled]
        return prompt + self.state.out.token_ids[:self.state.pos - len(prompt)]


class Scheduler:
    """Continuous batching over one model. `submit` is thread-safe; `step` must run on one thread at a time
    (the loop thread once `start`ed)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 256, eos_token_ids: Sequence[int] | None = None,
                 prefix_cache_tokens: int = 16384, block_size: int = 16):
        # Engine works out vocab width, EOS ids, device and context the same way for both paths.
        self.engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk,
                             eos_token_ids=eos_token_ids)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = min(self.engine.context, max_len or 4096)
        self.device = self.engine.device
        with torch.inference_mode():
            # Rows start short and grow (doubling) to the longest live request, up to max_len, so memory
            # follows what is running rather than max_batch × max_len; idle, they shrink back.
            self._min_positions = min(self.max_len, 256)
            self.cache = model.new_cache(max_batch, self._min_positions)
            # 0 turns prefix caching off; otherwise the pool holds this many tokens, rounded up to blocks.
            self.prefix = PrefixCache(self.cache, -(-prefix_cache_tokens // block_size), block_size) \
                if prefix_cache_tokens > 0 else None
        self._slots: list[_Slot] = []   # slot i holds cache row i; decoding slots first
        self._decoding = 0              # d: slots [0, d) decode
        self._sampler: Sampler | None = None
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._pending: dict[int, tuple[RequestHandle, RequestState]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # counters for stats(); written by the loop thread, read under the lock
        self._steps = 0
        self._batch_hist: Counter[int] = Counter()
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._finished: Counter[str] = Counter()

    # -- client side ------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_delta: Callable[[Delta], None] | None = None, cache_salt: bytes = b"") -> RequestHandle:
        """Queue a request. Raises BadInputError for bad params or prompt, QueueFullError when `max_queue`
        requests are already waiting. `on_delta`, if given, is called on the loop thread with every delta
        (e.g. to hand it to an asyncio loop with call_soon_threadsafe); keep it cheap and non-blocking.
        `cache_salt`: the prefix-cache namespace (engine/prefix.py); requests share cached prefixes only
        within one namespace."""
        prompt = [int(t) for t in prompt_ids]
        params.validate()
        check_prompt(prompt, self.max_len, "this server's context")
        V = self.engine.vocab_size
        if min(prompt) < 0 or max(prompt) >= V:
            raise BadInputError(f"token id outside the vocabulary of {V}")
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            rid = next(self._ids)
            handle = RequestHandle(rid, prompt, params, on_delta, cache_salt)
            handle._wake = self._wake
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stats(self) -> dict:
        """Gauges (running = rows used = decoding + prefilling, waiting) and counters since start (decode
        steps, decode batch-size histogram, prompt/generated tokens, finish reasons), for metrics. The row
        gauges are read without stopping the loop, so mid-step they may be one step stale."""
        with self._cond:
            return {
                "running": len(self._slots), "decoding": self._decoding,
                "prefilling": len(self._slots) - self._decoding, "waiting": len(self._waiting),
                "rows_used": len(self._slots), "rows_total": self.max_batch,
                "steps": self._steps, "batch_size_histogram": dict(self._batch_hist),
                "max_batch_seen": max(self._batch_hist, default=0),
                "prompt_tokens": self._prompt_tokens, "generation_tokens": self._generated_tokens,
                "finished": dict(self._finished),
                "kv_positions": self.cache.max_len, "kv_bytes": self.cache.nbytes(),
                "prefix_queried_tokens": self.prefix.queried_tokens if self.prefix else 0,
                "prefix_hit_tokens": self.prefix.hit_tokens if self.prefix else 0,
                "prefix_blocks_used": self.prefix.blocks_used if self.prefix else 0,
                "prefix_blocks_total": self.prefix.num_blocks if self.prefix else 0,
            }

    def start(self) -> Scheduler:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop thread; requests still waiting or running end with finish_reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            self._end_unstarted(h)
        for i in reversed(range(len(self._slots))):
            self._end(self._slots[i], "cancelled")

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop ---------------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._slots and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # fail the requests in flight, keep serving the others
                log.exception("scheduler step failed")
                self._fail_all(e)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration (see the module docstring). Returns whether there was anything to do."""
        self._admit()
        if not self._slots:
            self._reserve(0)
            return False
        # Positions this step may write: a prefilling row at most its prompt, a decoding row one more token.
        self._reserve(max(len(s.state.prompt) if not s.decoding else s.state.pos + 1 for s in self._slots))
        d_old = self._decoding
        ready = self._prefill()
        logits = []
        if d_old:
            live = self._slots[:d_old]
            ids = torch.tensor([[s.next_token] for s in live], device=self.device)
            pos = torch.tensor([[s.state.pos] for s in live], device=self.device)
            for s in live:
                s.state.pos += 1
            logits.append(self.model(ids, pos, self.cache.rows(0, d_old))[:, -1])
        logits += ready
        # Count the step before sampling: sampling hands results to waiting clients, and anyone who reads
        # stats() after a result must already see the step that produced it.
        with self._cond:
            self._steps += bool(d_old)
            if d_old:
                self._batch_hist[d_old] += 1
        if logits:
            self._sample(torch.cat(logits))
        if not self._slots:
            self._reserve(0)
        return True

    def _admit(self) -> None:
        """Drop cancelled requests, then move waiting requests into free rows."""
        with self._cond:
            for h in [h for h in self._waiting if h._cancel]:
                self._waiting.remove(h)
                self._end_unstarted(h)
            admitted = []
            while self._waiting and len(self._slots) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
        for i in reversed(range(len(self._slots))):
            if self._slots[i].handle._cancel:
                self._end(self._slots[i], "cancelled")
        now = time.monotonic()
        for h in admitted:
            try:
                state = RequestState(h.id, h.prompt, h.params,
                                     SamplerState(h.params, self.engine.vocab_size, h.prompt, device=self.device),
                                     self.tokenizer, self.engine.eos_token_ids, self.max_len)
            except Exception as e:
                h._finish(None, e)
                continue
            h.admitted = now
            slot = _Slot(h, state, len(self._slots))
            if self.prefix is not None:
                # Prompt blocks another request already computed are copied in; prefill starts after them.
                try:
                    slot.filled, blocks = self.prefix.match(h.prompt, h.cache_salt)
                    self._reserve(slot.filled)
                    self.prefix.load(self.cache, slot.row, blocks)
                except Exception as e:  # e.g. out of memory growing the rows: fail this request, not the queue
                    h._finish(None, e)
                    continue
                state.out.cached_tokens = slot.filled
                with self._cond:
                    self._prompt_tokens += slot.filled
            self._slots.append(slot)

    def _prefill(self) -> list[torch.Tensor]:
        """Spend up to `prefill_chunk` prompt tokens on prefilling rows, oldest request first. Rows whose
        prompt completes move to the end of the decoding block; returns their last logits [1, V] in row order."""
        budget = self.prefill_chunk
        ready = []
        for slot in sorted(self._slots[self._decoding:], key=lambda s: s.handle.id):
            if budget <= 0:
                break
            prompt = slot.state.prompt
            n = min(budget, len(prompt) - slot.filled)
            ids = torch.tensor(prompt[slot.filled:slot.filled + n], device=self.device)[None]
            pos = torch.arange(slot.filled, slot.filled + n, device=self.device)[None]
            out = self.model(ids, pos, self.cache.rows(slot.row, 1), last_only=True)
            slot.filled += n
            budget -= n
            with self._cond:
                self._prompt_tokens += n
            if slot.decoding:
                if self.prefix is not None:  # shareable now, while this request is still decoding
                    self.prefix.store(self.cache, slot.row, prompt, slot.handle.cache_salt)
                d = self._decoding
                if slot.row != d:
                    self._swap(slot.row, d)
                self._decoding += 1
                ready.append(out[:, -1])
        return ready

    def _sample(self, logits: torch.Tensor) -> None:
        live = self._slots[:self._decoding]
        states = [s.state.state for s in live]
        if self._sampler is None or self._sampler.states != states:
            self._sampler = Sampler(states)
        out = self._sampler.sample(logits)
        tokens = out.tokens.tolist()
        lps = logprob_rows(out.logprobs, [s.state.params.logprobs for s in live])
        now = time.monotonic()
        done = []
        for i, (slot, tok, lp) in enumerate(zip(live, tokens, lps)):
            h = slot.handle
            if h.first_token is None:
                h.first_token = now
                slot.state.out.first_token_s = now - h.submitted
            delta = slot.state.accept(tok, lp)
            slot.next_token = tok
            h._emit(delta)
            if delta.finish_reason is not None:
                done.append(i)
        with self._cond:
            self._generated_tokens += len(tokens)
        for i in reversed(done):
            self._end(self._slots[i], None)

    # -- rows -------------------------------------------------------------------------------------------

    def _end(self, slot: _Slot, reason: str | None) -> None:
        """Finish a slot's request (with `reason` unless it already has one) and free its row."""
        out = slot.state.out
        if out.finish_reason is None:
            out.finish_reason = reason
            slot.handle._emit(Delta(slot.handle.id, [], "", reason))
        with self._cond:
            self._finished[out.finish_reason] += 1
        if self.prefix is not None:  # keep the reply too: the next turn of a chat starts with it
            self.prefix.store(self.cache, slot.row, slot.cached_tokens(), slot.handle.cache_salt)
        # Free the row before telling the client: whoever reads stats() after a result sees the row free.
        self._free(slot.row)
        slot.handle._finish(out)

    def _end_unstarted(self, h: RequestHandle) -> None:
        out = Completion(index=h.id, prompt_tokens=len(h.prompt), finish_reason="cancelled")
        h._emit(Delta(h.id, [], "", "cancelled"))
        with self._cond:
            self._finished["cancelled"] += 1
        h._finish(out)

    def _free(self, i: int) -> None:
        """Remove row i keeping the layout: the last decoding row fills a decoding hole, then the last
        prefilling row fills the decoding block's new end; a prefilling hole takes the last row."""
        last = len(self._slots) - 1
        if i < self._decoding:
            d_last = self._decoding - 1
            if i != d_last:
                self._move(d_last, i)
            if last != d_last:
                self._move(last, d_last)
            self._decoding -= 1
        elif i != last:
            self._move(last, i)
        self._slots.pop()

    def _reserve(self, positions: int) -> None:
        """Make rows hold at least `positions` positions: grow by doubling (amortized copies), or, with nothing
        running (positions == 0), shrink back to the initial length to give memory back."""
        have = self.cache.max_len
        if positions == 0 and not self._slots and have > self._min_positions:
            self.cache = self.cache.resized(self._min_positions)
        elif positions > have:
            while have < positions:
                have *= 2
            self.cache = self.cache.resized(min(self.max_len, have))

    def _move(self, src: int, dst: int) -> None:
        slot = self._slots[src]
        self.cache.copy_row(src, dst, slot.length)
        slot.row = dst
        self._slots[dst] = slot

    def _swap(self, a: int, b: int) -> None:
        sa, sb = self._slots[a], self._slots[b]
        self.cache.swap_rows(a, b, sa.length, sb.length)
        sa.row, sb.row = b, a
        self._slots[a], self._slots[b] = sb, sa

    def _fail_all(self, error: BaseException) -> None:
        for slot in self._slots:
            slot.handle._finish(None, error)
        self._slots.clear()
        self._decoding = 0
        self._sampler = None
