"""One request's life in the decode loop, independent of which rows it shares a batch with.

Owns `Completion` (a finished request), `Delta` (one streamed piece), `RequestState` (detokenizer, stop strings,
sampler state, token limit, next position, and the optional per-row hooks: a logit constraint and a routing
record), `check_prompt` and `logprob_rows`. The scheduler's loop (engine/scheduler.py) is the only thing that
drives a RequestState, so a request's output never depends on who submitted it (server, eval, GRPO, chat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nanoseek.engine.detok import IncrementalDetokenizer
from nanoseek.engine.sampling import SamplerState, SamplingParams
from nanoseek.engine.stops import StopMatcher
from nanoseek.errors import BadInputError


@dataclass
class Completion:
    index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    logprobs: list[dict] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    stop_token: int | None = None  # the EOS / stop token that ended it (never part of token_ids)
    stop_string: str | None = None  # the stop string that ended it (cut from text); Anthropic's stop_sequence
    error: str | None = None  # why the loop ended it early (finish_reason "error"), e.g. a grammar dead end
    # With `record_routing`: per cached position (prompt, then each generated token fed back), the routed
    # experts of every MoE layer [n_moe_layers, top_k], for replaying a rollout's routing in training.
    routing: list[torch.Tensor] | None = None
    # timings, seconds
    first_token_s: float | None = None
    total_s: float | None = None

    @property
    def sampled_ids(self) -> list[int]:
        """Every token the model sampled, the stop token included: what training takes as the completion
        (the model learns to end its answer)."""
        return self.token_ids + ([self.stop_token] if self.stop_token is not None else [])


@dataclass
class Delta:
    """One streamed piece of output for request `index`: the tokens sampled this step and the text they
    released (possibly empty while a multi-byte character or a possible stop string is held back)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # per sampled token, when the request asked for logprobs


class Constraint(Protocol):
    """A per-row restriction of the next token (a grammar: JSON schema, tool-call syntax). The loop asks
    `allowed()` before sampling the row and reports every token the row keeps with `advance`; `rollback(n)`
    forgets the last n advanced tokens (a rejected speculative draft). Sampling draws from the allowed tokens
    only, while reported logprobs stay the model's own (unmasked) distribution."""

    def allowed(self) -> torch.Tensor | None:
        """[V] bool on the logits' device: the tokens that keep the output valid; None: no restriction now
        (e.g. while a reasoning block is still open)."""

    def advance(self, token: int) -> None: ...

    def rollback(self, n: int) -> None: ...


class RequestState:
    """Bookkeeping of one request while it holds a row of the loop: its output so far,
    detokenizer, stop strings, sampler state, token limit and the position its next fed token goes to."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, state: SamplerState,
                 tokenizer, eos_ids: Sequence[int], max_len: int, constraint: Constraint | None = None,
                 record_routing: bool = False):
        self.index, self.prompt, self.params, self.state = index, prompt, params, state
        self.constraint = constraint
        self.out = Completion(index=index, prompt_tokens=len(prompt),
                              logprobs=[] if params.logprobs is not None else None)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.finish_ids = params.finish_token_ids(eos_ids)
        self.limit = min(params.max_tokens, max_len - len(prompt))
        self.pos = len(prompt)  # position the next fed token goes to
        if record_routing:
            self.out.routing = []

    def accept(self, token: int, lp=None) -> Delta:
        """Record a sampled token; decide whether the row is finished."""
        o = self.out
        text = ""
        if token in self.finish_ids:
            o.finish_reason, o.stop_token = "stop", token
        else:
            o.token_ids.append(token)
            if self.constraint is not None:
                self.constraint.advance(token)
            if lp is not None:
                o.logprobs.append(lp)
            if self.detok is not None:
                text = self.detok.add(token)
                if self.stops is not None:
                    text, hit = self.stops.feed(text)
                    if hit:
                        o.finish_reason, o.stop_string = "stop", self.stops.matched
            if o.finish_reason is None and len(o.token_ids) >= self.limit:
                o.finish_reason = "length"
        if o.finish_reason is not None:
            text += self._drain()
        o.text += text
        lps = [lp] if lp is not None and o.logprobs is not None and token not in self.finish_ids else None
        return Delta(self.index, [token], text, o.finish_reason, lps)

    def fail(self, message: str) -> Delta:
        """End the row early with finish_reason "error" and a message for the caller."""
        self.out.finish_reason, self.out.error = "error", message
        text = self._drain()
        self.out.text += text
        return Delta(self.index, [], text, "error")

    def _drain(self) -> str:
        """Text still held back when the row ends (unless a stop string cut it off)."""
        if self.detok is None:
            return ""
        tail = self.detok.flush()
        if self.stops is None:
            return tail
        text, hit = self.stops.feed(tail)
        return text if hit else text + self.stops.flush()


def check_prompt(prompt: Sequence[int], context: int, what: str = "the model's context") -> None:
    """A prompt must be non-empty and leave room in `context` positions for at least one generated token."""
    if not prompt:
        raise BadInputError("the prompt is empty")
    if len(prompt) >= context:
        raise BadInputError(f"the prompt is {len(prompt)} tokens but {what} is {context} "
                            "tokens (room is needed for at least one generated token)")



def logprob_rows(lp, wanted: list[int | None]) -> list[dict | None]:
    """Per-row logprob dicts from a batch's Logprobs (None for rows that did not ask)."""
    if lp is None:
        return [None] * len(wanted)
    out = []
    for b, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        out.append({"logprob": float(lp.chosen[b]),
                    "top": list(zip(lp.top_ids[b, :n].tolist(), lp.top_logprobs[b, :n].tolist()))})
    return out
