"""Who is calling, and what they may spend: API keys, budget and rate-limit reservations, the usage ledger.

The one copy of these rules. The API routes (serve/routes.py) and the chat web app (serve/web.py) both ask
`Gate.caller` who is calling; every generating request goes through `Gate.admit`, which reserves its worst
case before the engine sees it, and ends with its `Ticket` settled to what was really generated.

Why reserve: a budget or tokens-per-minute check that only reads what was already spent lets fifty parallel
requests through on a budget for five, since none of them has been billed yet (issue 13, findings 1 and 10).
So admission reserves prompt + max_tokens for every choice, in the same SQLite transaction that checks the
budget (store.py) and under the limiter's lock (limits.py); the end of the request replaces the reservation
with the real usage row.

When the remaining budget cannot cover a request's worst case, its max_tokens shrinks to what the budget
covers (the reply then ends with finish_reason "length", as when the context runs out), and only a budget
that cannot pay for the prompt plus one token per choice is a 402. Tokens per minute: an omitted max_tokens
shrinks to the room left in the key's window; an explicit one waits its turn (429 with Retry-After), and one
larger than the whole allowance holds all of it, so it runs alone (limits.py).

Why durable before the end: the reservation row holds the tokens generated so far (written every
PROGRESS_S), the usage row is committed before the final SSE chunk or JSON body is sent, and the store bills
leftover reservations at the next start, so neither a finished nor a killed stream goes unbilled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from fastapi import Request

from nanoseek.serve.errors import ApiError
from nanoseek.serve.limits import Hold, RateLimiter
from nanoseek.serve.store import KeyRecord, PriceTable, Store

log = logging.getLogger(__name__)
PROGRESS_S = 1.0      # how often a running request's generated-token count is written to its reservation


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: a key, or None on an open server (the local user)."""

    key: KeyRecord | None

    @property
    def key_id(self) -> int | None:
        return None if self.key is None else self.key.id

    def cache_salt(self, isolate: bool) -> bytes:
        """The prefix-cache namespace of this caller's prompts. Isolated per key, a guess at another key's
        prompt never hits its cached blocks, so neither the hit count nor the time to first token tells
        whether the guess was right (DeepSeek: "each user's cache is isolated and logically invisible")."""
        if not isolate or self.key is None:
            return b""
        return hashlib.blake2b(f"key:{self.key.id}".encode(), digest_size=16).digest()


class Ticket:
    """One admitted request's reservations (store budget row + limiter hold), until `settle` or `release`.

    `granted` is the per-choice max_tokens the reservation covers (the request's own, or the default shrunk
    to what the caller can afford)."""

    def __init__(self, gate: Gate, caller: Caller, model: str, prices: PriceTable, prompt_tokens: int,
                 granted: int, reservation, hold: Hold | None):
        self.gate, self.caller, self.model, self.prices = gate, caller, model, prices
        self.prompt_tokens, self.granted = prompt_tokens, granted
        self.reservation, self.hold = reservation, hold
        self.started = time.monotonic()
        self._last_progress = self.started
        self._closed = False

    def progress(self, generated: int) -> None:
        """Note the tokens generated so far (at most every PROGRESS_S, off the event loop), so a server killed
        mid-stream bills them at its next start."""
        now = time.monotonic()
        store = self.gate.store
        if self.reservation is None or store is None or now - self._last_progress < PROGRESS_S:
            return
        self._last_progress = now
        reservation = self.reservation

        def write():
            try:
                store.progress(reservation, generated)
            except Exception:
                log.exception("could not record progress")
        asyncio.get_running_loop().run_in_executor(None, write)

    def _write(self, completion: int, hit: int, reasoning: int, finish: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.hold is not None:
            self.gate.limiter.settle(self.hold, self.prompt_tokens + completion)
        store = self.gate.store
        if store is None:
            return
        store.settle(self.reservation, cache_hit_tokens=hit, completion_tokens=completion,
                     reasoning_tokens=reasoning, finish_reason=finish, latency_s=time.monotonic() - self.started)

    async def settle(self, completion: int, hit: int, reasoning: int = 0, finish: str | None = None) -> None:
        """Replace the reservation with the usage row, committed before this returns: call it before the
        response's last bytes go out."""
        await asyncio.to_thread(self._write, completion, hit, reasoning, finish)

    def settle_later(self, completion_of, hit_of, reasoning: int = 0, finish_of=lambda: None) -> None:
        """Settle from a worker thread without waiting (a dropped stream's `finally`). The callables run on
        that thread, so they may wait for the engine to finish the request's last step."""
        def write():
            try:
                self._write(completion_of(), hit_of(), reasoning, finish_of())
            except Exception:
                log.exception("could not record usage")
        try:
            asyncio.get_running_loop().run_in_executor(None, write)
        except RuntimeError:      # a stream closed outside the event loop (garbage-collected): write here
            write()

    def release(self) -> None:
        """The request never reached the engine: drop its reservations, bill nothing."""
        if self._closed:
            return
        self._closed = True
        if self.hold is not None:
            self.gate.limiter.settle(self.hold, 0)
        if self.reservation is not None and self.gate.store is not None:
            self.gate.store.release(self.reservation)


class Gate:
    """Authentication, budgets and rate limits for one app. `require_auth`: a key is needed even before one
    exists (a server off loopback); otherwise the server is open until the first key is created."""

    def __init__(self, store: Store | None, require_auth: bool, limiter: RateLimiter | None = None):
        if require_auth and store is None:
            raise ValueError("require_auth needs a store holding the keys")
        self.store, self.require_auth = store, require_auth
        self.limiter = limiter or RateLimiter()

    async def is_open(self) -> bool:
        """No key is asked for: no store, or no key was ever created and the server listens on loopback."""
        store = self.store
        return store is None or (not self.require_auth and not await asyncio.to_thread(store.any_keys))

    async def caller(self, request: Request) -> Caller:
        """Who is calling: a live key from 'Authorization: Bearer KEY' or 'x-api-key: KEY' (the Anthropic
        SDK's header), or the local user on an open server. Raises a 401 ApiError otherwise."""
        store = self.store
        if await self.is_open():
            return Caller(None)
        secret = _presented_key(request.headers)
        if secret is None:
            raise ApiError.authentication("Authentication failed: send the API key as 'Authorization: Bearer KEY' "
                                          "or 'x-api-key: KEY'.")
        key = await asyncio.to_thread(store.authenticate, secret)
        if key is None:
            raise ApiError.authentication()
        return Caller(key)

    async def check_funds(self, caller: Caller) -> None:
        """A 402 when the caller's budget is spent (or fully reserved): for cheap routes that bill nothing."""
        if caller.key is None or caller.key.budget_usd is None or self.store is None:
            return
        remaining = await asyncio.to_thread(self.store.remaining_usd, caller.key.id)
        if remaining is not None and remaining <= 0:
            raise _no_funds(caller.key)

    def count_request(self, caller: Caller) -> None:
        """Count a request that generates nothing against the key's rpm (429 when over it)."""
        if caller.key is None:
            return
        got = self.limiter.reserve(caller.key.id, 0, 0, rpm=caller.key.rpm)
        if not isinstance(got, Hold):
            raise ApiError.rate_limited(got)

    async def admit(self, caller: Caller, model: str, prices: PriceTable, prompt_tokens: int, max_tokens: int,
                    choices: int, explicit: bool) -> Ticket:
        """Reserve the worst case of a request: `prompt_tokens` in all, and `max_tokens` for each of `choices`.
        The per-choice max_tokens may shrink to what the budget covers, and when not `explicit` (the client
        omitted it) to the key's tokens-per-minute room; Ticket.granted says what is left."""
        key = caller.key
        granted, hold = max_tokens, None
        if key is not None and key.tpm is not None and not explicit:
            room = self.limiter.room(key.id, key.tpm)
            if room is not None and room - prompt_tokens >= choices:
                granted = min(granted, (room - prompt_tokens) // choices)
        reservation = None
        if self.store is not None:
            reservation = await asyncio.to_thread(self.store.reserve, caller.key_id, model, prices, prompt_tokens,
                                                  granted, choices=choices)
            granted = reservation.max_tokens
        if key is not None:
            try:
                got = self.limiter.reserve(key.id, prompt_tokens, granted * choices, rpm=key.rpm, tpm=key.tpm)
            except BaseException:
                if reservation is not None:
                    await asyncio.to_thread(self.store.release, reservation)
                raise
            if not isinstance(got, Hold):
                if reservation is not None:
                    await asyncio.to_thread(self.store.release, reservation)
                raise ApiError.rate_limited(got)
            hold = got
        return Ticket(self, caller, model, prices, prompt_tokens, granted, reservation, hold)


def _presented_key(headers) -> str | None:
    """The key a request presents. Bearer wins when both headers are sent; a client sending two different
    keys gets the Bearer one checked, never a fallback to the other after a failure."""
    scheme, _, secret = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret.strip()
    secret = headers.get("x-api-key", "").strip()
    return secret or None


def _no_funds(key: KeyRecord) -> ApiError:
    return ApiError.insufficient_balance(f"Insufficient balance: key {key.prefix}… has spent its budget of "
                                         f"${key.budget_usd:.2f}.")
