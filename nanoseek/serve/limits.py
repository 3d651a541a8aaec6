"""Per-key requests-per-minute and tokens-per-minute limits over a sliding window, in memory.

Owns one question: may this key send now, and if not, how many seconds until it may? The limits
themselves live on the key record in the store; the caller passes them with every check, so a
changed limit applies at once with nothing to invalidate here.

State is per process and forgotten on restart, which at worst lets a key burst once. That is fine
for a limiter whose job is sharing one machine fairly; money (budgets) is enforced from the SQLite
ledger instead, which does survive restarts.

Tokens per minute are reserved, like budgets (finding 10 of issue 13: charging completions only after
the fact let parallel requests put 828 tokens through a 300 tpm key). `reserve` holds the prompt plus
max_tokens at admission and `settle` lowers the hold to what the request really used. The one burst
allowed: a request whose prompt + max_tokens exceeds the whole tpm holds the whole tpm (so it runs
with nothing else of its key in the window) rather than being refused; if it really generates more,
the window goes over by that excess and the key's next requests wait it out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from nanoseek.errors import BadInputError


class RequestTooLarge(BadInputError):
    """One request needs more tokens than the key's whole per-minute allowance: no wait can help."""


class Hold:
    """Tokens one admitted request holds against its key's tpm, from `reserve` to `settle`."""

    __slots__ = ("key_id", "event", "held")

    def __init__(self, key_id: Hashable, event: list, held: int) -> None:
        self.key_id, self.event, self.held = key_id, event, held


class _Window:
    """Events still inside the window, oldest first, with running totals so a check is O(1) when it passes."""

    __slots__ = ("events", "requests", "tokens")

    def __init__(self) -> None:
        self.events: deque[list] = deque()  # [time, requests 0|1, tokens]; a list so settle can lower tokens
        self.requests = 0
        self.tokens = 0


class RateLimiter:
    """Sliding-log limiter: `check` admits and records a request, or says how long to wait.

    A sliding log rather than fixed per-minute buckets: fixed buckets let a key send twice its
    limit across a bucket boundary, and with a handful of keys the log's memory is negligible.
    `clock` is injectable (monotonic seconds) so tests step time instead of sleeping.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()  # the server checks from many threads; each call is microseconds

    def check(self, key_id: Hashable, tokens: int = 0, *, rpm: int | None = None,
              tpm: int | None = None) -> float | None:
        """None: admitted, and the request and its `tokens` now count against the key.

        Otherwise the seconds until the same request would be admitted; nothing is recorded, so a
        rejected request costs the client nothing. None limits mean unlimited. Raises RequestTooLarge
        when `tokens` alone exceeds `tpm`.
        """
        admitted = self._admit(key_id, tokens, tokens, rpm, tpm)
        return admitted if isinstance(admitted, float) else None

    def reserve(self, key_id: Hashable, prompt_tokens: int, max_tokens: int, *, rpm: int | None = None,
                tpm: int | None = None) -> Hold | float:
        """Admit a request holding its worst case, prompt + max_tokens (at most the whole tpm), against
        the key's tpm; returns its Hold, to `settle` when it ends. Otherwise, as `check`: the seconds to
        wait, with nothing recorded. RequestTooLarge when the prompt alone exceeds `tpm`."""
        if max_tokens < 0:
            raise ValueError("max_tokens must be non-negative")
        held = prompt_tokens + max_tokens if tpm is None else min(prompt_tokens + max_tokens, tpm)
        return self._admit(key_id, prompt_tokens, held, rpm, tpm)

    def settle(self, hold: Hold, used_tokens: int) -> None:
        """The request is over and used `used_tokens` (prompt + generated): its hold becomes that, as of
        its admission. A hold that has already left the window (a request longer than the window) has
        counted at its worst case for a whole window; it changes nothing more."""
        if used_tokens < 0:
            raise ValueError("used_tokens must be non-negative")
        with self._lock:
            now = self._clock()
            w = self._prune(hold.key_id, now)
            if hold.event[0] > now - self.window_s:  # still in the window (pruning just dropped older ones)
                w.tokens += used_tokens - hold.event[2]
                hold.event[2] = used_tokens
            hold.held = used_tokens

    def _admit(self, key_id: Hashable, tokens: int, held: int, rpm: int | None, tpm: int | None) -> Hold | float:
        """Admit a request that needs `tokens` (RequestTooLarge past tpm) and records `held` ≥ tokens."""
        if (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1):
            raise ValueError("rpm and tpm must be at least 1 (None means unlimited)")
        if tokens < 0:
            raise ValueError("tokens must be non-negative")
        if tpm is not None and tokens > tpm:
            raise RequestTooLarge(f"this request needs {tokens} tokens but the key is limited to {tpm} "
                                  f"tokens per minute")
        with self._lock:
            now = self._clock()
            w = self._prune(key_id, now)
            waits = []
            if rpm is not None and w.requests + 1 > rpm:
                waits.append(self._wait_until_freed(w, now, requests=w.requests + 1 - rpm))
            if tpm is not None and w.tokens + held > tpm:
                waits.append(self._wait_until_freed(w, now, tokens=w.tokens + held - tpm))
            if waits:
                return float(max(waits))
            return Hold(key_id, self._add(w, now, 1, held), held)

    def room(self, key_id: Hashable, tpm: int | None) -> int | None:
        """Tokens the key could still hold in its window now (None: unlimited). The server shrinks an omitted
        max_tokens to this, so a default never turns into the whole-tpm burst above."""
        if tpm is None:
            return None
        with self._lock:
            return max(0, tpm - self._prune(key_id, self._clock()).tokens)

    def _prune(self, key_id: Hashable, now: float) -> _Window:
        # One window per key ever seen, emptied but kept: the store's key count bounds the memory.
        w = self._windows.setdefault(key_id, _Window())
        cutoff = now - self.window_s
        while w.events and w.events[0][0] <= cutoff:  # an event at t counts during [t, t + window)
            _, r, k = w.events.popleft()
            w.requests -= r
            w.tokens -= k
        return w

    def _add(self, w: _Window, now: float, requests: int, tokens: int) -> list:
        event = [now, requests, tokens]
        w.events.append(event)
        w.requests += requests
        w.tokens += tokens
        return event

    def _wait_until_freed(self, w: _Window, now: float, requests: int = 0, tokens: int = 0) -> float:
        """Seconds until the oldest events holding at least `requests` requests and `tokens` tokens expire."""
        freed_r = freed_k = 0
        for t, r, k in w.events:
            freed_r += r
            freed_k += k
            if freed_r >= requests and freed_k >= tokens:
                return t + self.window_s - now
        # Unreachable given the callers' arithmetic (the window always holds the excess); be safe.
        return self.window_s
