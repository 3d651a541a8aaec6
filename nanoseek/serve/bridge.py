"""The seam between the scheduler's loop thread and the server's asyncio loop.

Owns `Job`: the engine requests behind one HTTP request (one per choice, n > 1 submits several), their
deltas handed to asyncio with `call_soon_threadsafe`, and their cancellation when the client goes away.
Nothing here blocks the event loop: the scheduler thread only ever schedules a `put_nowait`, and the
event loop only ever waits on an asyncio.Queue. Latency metrics are observed here, on the event loop, as
each delta is handed to the route (serve/metrics.RequestTimer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from nanoseek.engine.request import Completion, Delta
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import RequestHandle, Scheduler
from nanoseek.serve.metrics import RequestTimer


class ClientGone(Exception):
    """The client disconnected; the job's requests have been cancelled."""


class Job:
    """Submit `len(params)` requests; `events()` yields (choice index, Delta) as they arrive, or None when
    `poll_s` passed with nothing (the caller may send a keep-alive). `timer`, if given, sees every delta.
    `cache_salt`: the prefix-cache namespace of the caller (serve/auth.py's Caller.cache_salt). `constraints`:
    one engine Constraint (or None) per request (a grammar: serve/structured.py)."""

    def __init__(self, scheduler: Scheduler, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                 request=None, poll_s: float = 0.5, timer: RequestTimer | None = None, cache_salt: bytes = b"",
                 constraints: Sequence | None = None):
        self.request, self.poll_s, self.timer = request, poll_s, timer
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.generated = [0] * len(params)      # tokens seen per choice: usage even for cancelled requests
        self.finish: list[str | None] = [None] * len(params)
        self.handles: list[RequestHandle] = []
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                self.handles.append(scheduler.submit(ids, p, on_delta=self._bridge(loop, i), cache_salt=cache_salt,
                                                     constraint=constraints[i] if constraints else None))
        except BaseException:
            self.cancel()   # choice k failed to submit (queue full): don't leave choices 0..k-1 running
            raise

    def _bridge(self, loop: asyncio.AbstractEventLoop, i: int):
        def on_delta(d: Delta) -> None:   # runs on the scheduler thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, d))
            except RuntimeError:          # the event loop is closed (server shutting down): nobody listens
                pass
        return on_delta

    @property
    def queued(self) -> bool:
        """Some choice has not got a cache row yet."""
        return any(h.admitted is None and not h.done for h in self.handles)

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    def _raise_engine_error(self) -> None:
        # A failed engine step finishes the handle with an exception but does not call on_delta, so the
        # queue never hears of it: look at the handles themselves on every idle poll.
        for h in self.handles:
            if h.done and h.completion is None:
                h.result(timeout=0)

    async def _check_client(self) -> None:
        if self.request is not None and await self.request.is_disconnected():
            self.cancel()
            raise ClientGone()

    async def events(self) -> AsyncIterator[tuple[int, Delta] | None]:
        remaining = len(self.handles)
        last_check = time.monotonic()
        while remaining:
            try:
                i, d = await asyncio.wait_for(self.queue.get(), self.poll_s)
            except TimeoutError:
                self._raise_engine_error()
                await self._check_client()
                last_check = time.monotonic()
                yield None
                continue
            if time.monotonic() - last_check > self.poll_s:   # a busy stream must notice a disconnect too
                await self._check_client()
                last_check = time.monotonic()
            self.generated[i] += len(d.token_ids)
            if self.timer is not None:
                self.timer.delta(i, len(d.token_ids), d.finish_reason)
            if d.finish_reason is not None:
                self.finish[i] = d.finish_reason
                remaining -= 1
            yield i, d
        # The loop thread emits the final delta just before it stores the Completion on the handle: wait
        # out that instant so callers can read `handle.completion`.
        while not all(h.done for h in self.handles):
            await asyncio.sleep(0.001)

    async def completion(self, i: int) -> Completion | None:
        """Choice i's Completion once its final delta was seen (None if the engine failed it)."""
        h = self.handles[i]
        while not h.done:     # the same instant as at the end of events()
            await asyncio.sleep(0.001)
        return h.completion

    def cached_tokens(self, choices_per_prompt: int) -> list[int]:
        """Prompt tokens served from the prefix cache, one count per distinct prompt (choices k*n … k*n+n-1
        share prompt k). A prompt counts once in usage whatever n is, so its hits are those of its least-cached
        copy: a copy that missed is the one whose prefill the other copies reused, and that work was done."""
        n = choices_per_prompt
        per_choice = [getattr(h.completion, "cached_tokens", 0) or 0 for h in self.handles]
        return [min(per_choice[k:k + n]) for k in range(0, len(per_choice), n)]
