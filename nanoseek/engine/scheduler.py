"""The decode loop: every caller's tokens come out of `Scheduler.step` (serve, chat, eval, GRPO, generate).

Owns:
  * `Scheduler`: a wait queue (bounded for the server, unbounded for offline callers), the rows of one cache
    (engine/rows.py), the prefix cache (engine/prefix.py), and `step`, one iteration of the loop. `submit` (any
    thread) enqueues; `start`/`stop` run `step` in a daemon thread that sleeps while there is nothing to do,
    or a caller drives `step` itself (`Engine.generate`, engine/generate.py).
  * `RequestHandle`: what `submit` returns: a thread-safe stream of `Delta`s ending with one that carries
    `finish_reason`, `cancel()`, blocking `result()`, and timings.

Decisions (who gets a row, how the prefill budget is spent, which prompts are computed once for their twins)
are engine/policy.py's; the row layout and cache size are engine/rows.py's; the forwards are
engine/step.py's; a request's own bookkeeping is engine/request.py's. This module wires them together.

One iteration (`step`):
  1. drop cancelled requests (waiting ones and rows), admit waiting requests into free rows;
  2. run the prefill plan: chunks of prompts, oldest first, and row copies for twin prompts;
  3. one decode forward for the rows that were decoding before this step;
  4. sample the next token of every decoding row (those rows' decode logits plus the last-position logits of
     prompts completed this step) with one `Sampler`, rebuilt only when the rows change, under each row's
     logit constraint if it has one;
  5. emit deltas and free the rows of finished requests.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from nanoseek.engine.draft import Drafter, DraftRow
from nanoseek.engine.policy import CopyTwin, Prefill, RowView, admit_count, plan_prefill
from nanoseek.engine.prefix import PrefixCache
from nanoseek.engine.request import (
    Completion,
    Constraint,
    Delta,
    RequestState,
    check_prompt,
    logprob_rows,
)
from nanoseek.engine.rows import RowTable, Slot
from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.engine.step import ModelRunner
from nanoseek.errors import BadInputError, QueueFullError

log = logging.getLogger(__name__)


class RequestHandle:
    """One submitted request, as seen by the thread that submitted it.

    Iterate it for the `Delta`s (blocks; the last one has `finish_reason` set), or call `result()` for the
    whole `Completion`. Both raise the engine's exception if the loop failed while running the request.
    Timestamps are `time.monotonic()` seconds: submitted, admitted (got a row), first_token, finished."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, on_delta, cache_salt: bytes = b"",
                 constraint: Constraint | None = None, record_routing: bool = False, stream: bool = True,
                 speculate: bool = True):
        self.id, self.prompt, self.params = rid, prompt, params
        self.speculate = speculate  # may this request's row draft (when the scheduler has a drafter)
        self._stream = stream  # keep deltas for iteration (off for callers that only want on_delta/result)
        self.constraint, self.record_routing = constraint, record_routing
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
        if self._stream:
            self._deltas.put(delta)

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self.finished = time.monotonic()
        self.completion, self._error = completion, error
        if completion is not None:
            completion.total_s = self.finished - self.submitted
        if error is not None:
            self._deltas.put(error)
        self._done.set()


class Scheduler:
    """Continuous batching over one model. `submit` is thread-safe; `step` must run on one thread at a time
    (the loop thread once `start`ed). `max_queue=None`: no bound on waiting requests (offline callers)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 max_queue: int | None = 256, prefill_chunk: int = 256, eos_token_ids: Sequence[int] | None = None,
                 prefix_cache_tokens: int = 16384, block_size: int = 16, runner: ModelRunner | None = None,
                 drafter: Drafter | None = None, draft_tokens: int = 6):
        self.runner = runner or ModelRunner(model, tokenizer, eos_token_ids)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = min(self.runner.context, max_len or 4096)
        self.device = self.runner.device
        with torch.inference_mode():
            cache = self.runner.new_cache(max_batch, self.max_len)
            self.rows = RowTable(cache, max_batch, self.max_len)
            # 0 turns prefix caching off; otherwise the pool holds this many tokens, rounded up to blocks. A cache
            # whose state is not per position (V4's compressed windows) cannot be cut into blocks: no prefix cache.
            if prefix_cache_tokens > 0 and not cache.prefix_cacheable:
                log.info("prefix cache off: this model's cache folds positions into compressed windows")
                prefix_cache_tokens = 0
            self.prefix = PrefixCache(cache, -(-prefix_cache_tokens // block_size), block_size) \
                if prefix_cache_tokens > 0 else None
        # Speculative decoding (engine/draft.py): a rejected draft is rolled back by abandoning the positions
        # past the row's length, which only a rewindable cache allows (a compressed window folds them in).
        if drafter is not None and not cache.rewindable:
            log.warning("speculative decoding is off: this model's cache cannot drop rejected draft positions")
            drafter = None
        # At most 7 drafts: a verify step of <= 8 query tokens keeps MLA on its decode (absorbed) path.
        self.drafter, self.draft_tokens = drafter, max(0, min(draft_tokens, 7))
        self._feed_hidden = drafter is not None and drafter.needs_hidden
        self.runner.keep_hidden = self._feed_hidden
        self._sampler: Sampler | None = None
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # counters for stats(); written by the loop thread, read under the lock
        self._steps = 0
        self._batch_hist: Counter[int] = Counter()
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._finished: Counter[str] = Counter()
        self._verify_steps = 0          # decode steps that verified drafts
        self._verify_rows = 0           # rows that verified drafts, summed over those steps
        self._drafted = 0               # draft tokens proposed
        self._draft_accepted = 0        # of which the model agreed with

    @property
    def cache(self):
        return self.rows.cache

    # -- client side ------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_delta: Callable[[Delta], None] | None = None, cache_salt: bytes = b"", *,
               constraint: Constraint | None = None, record_routing: bool = False,
               stream: bool = True, speculate: bool = True) -> RequestHandle:
        """Queue a request. Raises BadInputError for bad params or prompt, QueueFullError when `max_queue`
        requests are already waiting. `on_delta`, if given, is called on the loop thread with every delta
        (e.g. to hand it to an asyncio loop with call_soon_threadsafe); keep it cheap and non-blocking.
        `cache_salt`: the prefix-cache namespace (engine/prefix.py); requests share cached prefixes only
        within one namespace. `constraint`: a grammar restricting each sampled token (request.Constraint).
        `record_routing`: the completion carries every position's routed experts (MoE models).
        `stream=False`: the handle keeps no deltas for iteration (use `on_delta` or `result()`).
        `speculate=False`: this row never drafts, even when the scheduler has a drafter."""
        prompt = [int(t) for t in prompt_ids]
        params.validate()
        check_prompt(prompt, self.max_len, "this server's context")
        V = self.runner.vocab_size
        if min(prompt) < 0 or max(prompt) >= V:
            raise BadInputError(f"token id outside the vocabulary of {V}")
        with self._cond:
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            rid = next(self._ids)
            handle = RequestHandle(rid, prompt, params, on_delta, cache_salt, constraint, record_routing, stream,
                                   speculate)
            handle._wake = self._wake
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stats(self) -> dict:
        """Gauges (running = rows used = decoding + prefilling, waiting) and counters since start (decode
        steps, decode batch-size histogram, prompt/generated tokens, finish reasons), for metrics. The row
        gauges are read without stopping the loop, so mid-step they may be one step stale."""
        with self._cond:
            used, d = len(self.rows), self.rows.decoding
            return {
                "running": used, "decoding": d, "prefilling": used - d, "waiting": len(self._waiting),
                "rows_used": used, "rows_total": self.max_batch,
                "steps": self._steps, "batch_size_histogram": dict(self._batch_hist),
                "max_batch_seen": max(self._batch_hist, default=0),
                "prompt_tokens": self._prompt_tokens, "generation_tokens": self._generated_tokens,
                "finished": dict(self._finished),
                "kv_positions": self.cache.max_len, "kv_bytes": self.cache.nbytes(),
                "prefix_queried_tokens": self.prefix.queried_tokens if self.prefix else 0,
                "prefix_hit_tokens": self.prefix.hit_tokens if self.prefix else 0,
                "prefix_blocks_used": self.prefix.blocks_used if self.prefix else 0,
                "prefix_blocks_total": self.prefix.num_blocks if self.prefix else 0,
                "speculative": self.drafter.name if self.drafter else None,
                "spec_verify_steps": self._verify_steps, "spec_draft_tokens": self._drafted,
                "spec_accepted_tokens": self._draft_accepted,
                "spec_acceptance_rate": self._draft_accepted / self._drafted if self._drafted else None,
                # tokens emitted per verifying row-step: accepted drafts plus the one every step yields
                "spec_tokens_per_step": (self._draft_accepted + self._verify_rows) / self._verify_rows
                if self._verify_rows else None,
            }

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self.rows.slots and not self._waiting

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
        for i in reversed(range(len(self.rows))):
            self._end(self.rows.slots[i], "cancelled")

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
                while not self._stopping and not self.rows.slots and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # fail the requests in flight, keep serving the others
                log.exception("scheduler step failed")
                self.fail_all(e)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration (see the module docstring). Returns whether there was anything to do."""
        rows = self.rows
        self._admit()
        if not rows.slots:
            rows.reserve(0)
            return False
        d_old = rows.decoding
        drafts = self._propose(rows.slots[:d_old]) if d_old and self.drafter is not None else None
        extra = max(map(len, drafts)) if drafts else 0
        # Positions this step may write: a prefilling row at most its prompt, a decoding row one more token
        # (plus its drafts, and the padding up to the longest draft).
        rows.reserve(max(len(s.state.prompt) if not s.decoding else s.state.pos + 1 + extra for s in rows.slots))
        self.runner.recorder.switch(any(s.handle.record_routing for s in rows.slots))
        ready = self._prefill()
        logits = []
        if d_old:
            live = rows.slots[:d_old]
            for s in live:
                s.state.pos += 1
            if extra:
                verify = self._verify(live, drafts, extra)
            else:
                logits.append(self.runner.decode([s.next_token for s in live], [s.state.pos - 1 for s in live],
                                                 self.cache.rows(0, d_old)))
                self._record(live, 1)
                if self._feed_hidden:
                    for i, s in enumerate(live):
                        self.drafter.observe(s.rid, s.state.pos - 1, self.runner.hidden[i])
        # Count the step before sampling: sampling hands results to waiting clients, and anyone who reads
        # stats() after a result must already see the step that produced it.
        with self._cond:
            self._steps += bool(d_old)
            if d_old:
                self._batch_hist[d_old] += 1
        if extra:
            self._sample_drafts(verify, drafts, ready)
        elif logits or ready:
            self._sample(torch.cat(logits + ready))
        if not rows.slots:
            rows.reserve(0)
            self.runner.recorder.switch(False)
        return True

    def _admit(self) -> None:
        """Drop cancelled requests, then move waiting requests into free rows."""
        with self._cond:
            for h in [h for h in self._waiting if h._cancel]:
                self._waiting.remove(h)
                self._end_unstarted(h)
            n = admit_count(len(self._waiting), len(self.rows), self.max_batch)
            admitted = [self._waiting.popleft() for _ in range(n)]
        for i in reversed(range(len(self.rows))):
            if self.rows.slots[i].handle._cancel:
                self._end(self.rows.slots[i], "cancelled")
        now = time.monotonic()
        for h in admitted:
            try:
                state = RequestState(h.id, h.prompt, h.params,
                                     SamplerState(h.params, self.runner.vocab_size, h.prompt, device=self.device),
                                     self.tokenizer, self.runner.eos_token_ids, self.max_len,
                                     h.constraint, h.record_routing)
            except Exception as e:
                h._finish(None, e)
                continue
            h.admitted = now
            key = hashlib.blake2b(h.cache_salt + np.asarray(h.prompt, np.int64).tobytes(), digest_size=16).digest()
            slot = Slot(h, state, key)
            if self._may_share(h):
                # Prompt blocks another request already computed are copied in; prefill starts after them.
                try:
                    filled, blocks = self.prefix.match(h.prompt, h.cache_salt)
                    self.rows.reserve(filled)
                    self.rows.add(slot)
                    slot.filled = filled
                    self.prefix.load(self.cache, slot.row, blocks)
                except Exception as e:  # e.g. out of memory growing the rows: fail this request, not the queue
                    if slot.row >= 0:
                        self.rows.free(slot.row)
                    h._finish(None, e)
                    continue
                state.out.cached_tokens = slot.filled
                with self._cond:
                    self._prompt_tokens += slot.filled
            else:
                self.rows.add(slot)

    def _may_share(self, h) -> bool:
        """Whether `h` may read the prefix cache: hits carry no routing record and no hidden states (for an
        MTP drafter), so such requests compute their prompt."""
        return self.prefix is not None and not h.record_routing and not self._feed_hidden

    def _prefill(self) -> list[torch.Tensor]:
        """Run this step's prefill plan (engine/policy.py). Rows whose prompt completes join the end of the
        decoding block; returns their last logits [1, V] in that order."""
        rows = self.rows
        if rows.decoding == len(rows):  # the common decode step: nothing to prefill, skip planning
            return []
        by_rid = {s.rid: s for s in rows.slots}
        views = [RowView(s.rid, s.key, len(s.state.prompt) - s.filled) for s in rows.slots]
        ready = []
        for action in plan_prefill(views, self.prefill_chunk):
            slot = by_rid[action.rid]
            prompt = slot.state.prompt
            if isinstance(action, CopyTwin):
                src = by_rid[action.src]
                self.cache.copy_row(src.row, slot.row, len(prompt))
                with self._cond:  # counted as processed, like prefix-cache hits
                    self._prompt_tokens += len(prompt) - slot.filled
                slot.filled, slot.first_logits = len(prompt), src.first_logits
                if self._feed_hidden:
                    self.drafter.fork(src.rid, slot.rid, len(prompt))
                if slot.state.out.routing is not None and src.state.out.routing is not None:
                    slot.state.out.routing[:] = src.state.out.routing[:len(prompt)]
            else:
                assert isinstance(action, Prefill)
                if slot.filled == 0 and self._may_share(slot.handle):
                    # Requests admitted together all missed the cache at admission; one prefilled earlier
                    # in this plan may have stored the blocks they share (a system prompt) since.
                    hit, blocks = self.prefix.match(prompt, slot.handle.cache_salt, again=True)
                    self.prefix.load(self.cache, slot.row, blocks)
                    slot.filled = slot.state.out.cached_tokens = hit
                    with self._cond:
                        self._prompt_tokens += hit
                start = slot.filled
                n = min(action.n, len(prompt) - start)
                slot.first_logits = self.runner.prefill(prompt[start:start + n], start, self.cache.rows(slot.row, 1))
                self._record([slot], n)
                if self._feed_hidden:
                    self.drafter.observe(slot.rid, start, self.runner.hidden[0])
                slot.filled += n
                with self._cond:
                    self._prompt_tokens += n
            if slot.decoding:
                if self.prefix is not None:  # shareable now, while this request is still decoding
                    self.prefix.store(self.cache, slot.row, prompt, slot.handle.cache_salt)
                rows.promote(slot)
                ready.append(slot.first_logits)
        return ready

    def _propose(self, live: list[Slot]) -> list[list[int]]:
        """Each decoding row's drafts: at most `draft_tokens`, none past its token limit or the cache's end
        (a verify step emits up to drafts + 1 tokens and writes drafts + 1 positions)."""
        rows, k = [], []
        for s in live:
            st = s.state
            n = min(self.draft_tokens, st.limit - len(st.out.token_ids) - 1, self.max_len - 1 - st.pos)
            rows.append(DraftRow(s.rid, st.prompt + st.out.token_ids))
            k.append(n if s.handle.speculate else 0)
        drafts = self.drafter.propose(rows, k)
        return [d[:n] for d, n in zip(drafts, k)]

    def _verify(self, live: list[Slot], drafts: list[list[int]], extra: int) -> tuple:
        """One forward over each row's fed token and its drafts (padded to the longest with the fed token,
        whose positions past the row's drafts are abandoned like rejected ones). Returns logits [d, 1 + extra, V],
        the routing record (or None), each row's first position, and the hidden states (MTP drafting)."""
        ids = torch.tensor([[s.next_token, *d] + [s.next_token] * (extra - len(d)) for s, d in zip(live, drafts)],
                           device=self.device)
        starts = [s.state.pos - 1 for s in live]
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(1 + extra, device=self.device)
        logits = self.runner.verify(ids, pos, self.cache.rows(0, len(live)))
        routing = self.runner.recorder.take(len(live), 1 + extra) if self.runner.recorder.on else None
        return logits, routing, starts, self.runner.hidden

    def _sample_drafts(self, verify, drafts: list[list[int]], ready: list[torch.Tensor]) -> None:
        """Sample the verified rows position by position, each position under the sampler state and constraint
        that plain decoding would have there, keeping a row's drafts while they match what it samples
        (Sampler.verify); rows whose prompt completed this step take their first token at position 0."""
        logits, routing, starts, hidden = verify
        live = self.rows.slots[:self.rows.decoding]
        d, T = logits.shape[0], logits.shape[1]
        if ready:
            first = torch.cat(ready)[:, None]
            logits = torch.cat([logits, first.expand(-1, T, -1)])
        self._refresh_sampler(live)
        want = torch.full((len(live), T), -1, dtype=torch.long)
        for i, dr in enumerate(drafts):
            want[i, :len(dr)] = torch.tensor(dr, dtype=torch.long)
        want = want.to(logits.device)
        active = [True] * len(live)   # rows still verifying (every earlier draft kept); host-side, no syncs
        fed = [1] * d           # positions of each verified row that hold confirmed tokens
        done, now, generated = [], time.monotonic(), 0
        wanted_lp = [s.state.params.logprobs for s in live]
        for j in range(T):
            allowed, dead = self._allowed(live, logits[:, j], active)
            tokens, accepted, lp = self._sampler.verify(logits[:, j], want[:, j],
                                                        torch.tensor(active, device=logits.device), allowed=allowed)
            tokens, accepted, lps = tokens.tolist(), accepted.tolist(), logprob_rows(lp, wanted_lp)
            for i in [i for i, a in enumerate(active) if a]:
                slot = live[i]
                delta = self._take(slot, tokens[i], lps[i], i in dead, now)
                generated += i not in dead
                if delta.finish_reason is not None:
                    done.append(i)
                    active[i] = False
                elif accepted[i]:
                    slot.state.pos += 1     # the draft fed at this position is now part of the row
                    fed[i] += 1
                else:
                    slot.next_token = tokens[i]
                    active[i] = False
            if not any(active):
                break
        with self._cond:
            self._generated_tokens += generated
            self._verify_steps += 1
            self._verify_rows += sum(1 for dr in drafts if dr)
            self._drafted += sum(map(len, drafts))
            self._draft_accepted += sum(f - 1 for f in fed)
        for i in range(d):
            if routing is not None and live[i].state.out.routing is not None:
                live[i].state.out.routing.extend(routing[i, :fed[i]].unbind(0))
            if self._feed_hidden:
                self.drafter.observe(live[i].rid, starts[i], hidden[i, :fed[i]])
        for i in sorted(done, reverse=True):
            self._end(self.rows.slots[i], None)

    def _record(self, slots: list[Slot], tokens: int) -> None:
        """Hand each slot the routing of the forward just run (when recording is on)."""
        if not self.runner.recorder.on:
            return
        routing = self.runner.recorder.take(len(slots), tokens)
        if routing is None:
            return
        for b, slot in enumerate(slots):
            if slot.state.out.routing is not None:
                slot.state.out.routing.extend(routing[b].unbind(0))

    def _sample(self, logits: torch.Tensor) -> None:
        live = self.rows.slots[:self.rows.decoding]
        self._refresh_sampler(live)
        allowed, dead = self._allowed(live, logits)
        out = self._sampler.sample(logits, allowed=allowed)
        tokens = out.tokens.tolist()
        lps = logprob_rows(out.logprobs, [s.state.params.logprobs for s in live])
        now = time.monotonic()
        done = []
        for i, (slot, tok, lp) in enumerate(zip(live, tokens, lps)):
            delta = self._take(slot, tok, lp, i in dead, now)
            slot.next_token = tok
            if delta.finish_reason is not None:
                done.append(i)
        with self._cond:
            self._generated_tokens += len(tokens) - len(dead)
        for i in reversed(done):
            self._end(self.rows.slots[i], None)

    def _refresh_sampler(self, live: list[Slot]) -> None:
        """Rebuild the batch's Sampler only when the decoding rows changed."""
        states = [s.state.state for s in live]
        if self._sampler is None or self._sampler.states != states:
            self._sampler = Sampler(states)

    @staticmethod
    def _take(slot: Slot, token: int, lp: dict | None, dead: bool, now: float) -> Delta:
        """Hand a row its sampled token, or end it when its constraint allowed nothing; emit and return the
        delta (one with a finish_reason ends the row)."""
        h = slot.handle
        if dead:
            delta = slot.state.fail("the output constraint allows no token here (a dead end in its grammar)")
        else:
            if h.first_token is None:
                h.first_token = now
                slot.state.out.first_token_s = now - h.submitted
            delta = slot.state.accept(token, lp)
        h._emit(delta)
        return delta

    @staticmethod
    def _allowed(live: list[Slot], logits: torch.Tensor,
                 active: list[bool] | None = None) -> tuple[torch.Tensor | None, set[int]]:
        """The batch's allowed-token mask [B, V] (None when no row is constrained now) and the rows whose
        constraint allows nothing. Only `active` rows are asked (default: all)."""
        masks = [(i, s.state.constraint.allowed()) for i, s in enumerate(live)
                 if s.state.constraint is not None and (active is None or active[i])]
        masks = [(i, m) for i, m in masks if m is not None]
        if not masks:
            return None, set()
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        dead = set()
        for i, m in masks:
            allowed[i] = m
            if not bool(m.any()):
                dead.add(i)
                allowed[i] = True  # sample something harmless; the row is ended, not fed
        return allowed, dead

    # -- rows -------------------------------------------------------------------------------------------

    def _end(self, slot: Slot, reason: str | None) -> None:
        """Finish a slot's request (with `reason` unless it already has one) and free its row."""
        out = slot.state.out
        if out.finish_reason is None:
            out.finish_reason = reason
            slot.handle._emit(Delta(slot.handle.id, [], "", reason))
        with self._cond:
            self._finished[out.finish_reason] += 1
        if self.prefix is not None:  # keep the reply too: the next turn of a chat starts with it
            self.prefix.store(self.cache, slot.row, slot.cached_tokens(), slot.handle.cache_salt)
        if self.drafter is not None:
            self.drafter.release(slot.rid)
        # Free the row before telling the client: whoever reads stats() after a result sees the row free.
        self.rows.free(slot.row)
        slot.handle._finish(out)

    def _end_unstarted(self, h: RequestHandle) -> None:
        out = Completion(index=h.id, prompt_tokens=len(h.prompt), finish_reason="cancelled")
        h._emit(Delta(h.id, [], "", "cancelled"))
        with self._cond:
            self._finished["cancelled"] += 1
        h._finish(out)

    def abort(self, error: BaseException) -> None:
        """The driving caller failed: end every request, waiting or running, with `error`."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            h._finish(None, error)
        self.fail_all(error)

    def fail_all(self, error: BaseException) -> None:
        """End every request in a row with `error` (the loop failed under them) and free the rows."""
        for slot in self.rows.slots:
            slot.handle._finish(None, error)
        self.rows.clear()
        self._sampler = None
