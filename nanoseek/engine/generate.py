"""The batched generation loop: prefill each prompt into its row of a preallocated cache, then decode all
live rows together one token per step, sampling each row with its own parameters.

Rows that finish leave the batch at once: the cache and sampler are compacted to the live rows, so a long
request never drags finished ones through the model. Streaming goes through a callback per text delta;
cancellation is a predicate polled every step. Continuous batching (rows joining mid-flight) is the
scheduler's job (engine/scheduler.py), built on the same step functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.engine.detok import IncrementalDetokenizer
from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.engine.stops import StopMatcher
from nanoseek.errors import BadInputError
from nanoseek.models.cache import Cache


@dataclass
class Completion:
    index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    logprobs: list[dict] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    stop_token: int | None = None  # the EOS / stop token that ended it (never part of token_ids)
    # timings, seconds
    first_token_s: float | None = None
    total_s: float | None = None


@dataclass
class Delta:
    """One streamed piece of output for request `index`: the tokens sampled this step and the text they
    released (possibly empty while a multi-byte character or a possible stop string is held back)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # per sampled token, when the request asked for logprobs


class RequestState:
    """Bookkeeping of one request while it is in a batch (Engine's or the Scheduler's): its output so far,
    detokenizer, stop strings, sampler state, token limit and the position its next fed token goes to."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, state: SamplerState,
                 tokenizer, eos_ids: Sequence[int], max_len: int):
        self.index, self.prompt, self.params, self.state = index, prompt, params, state
        self.out = Completion(index=index, prompt_tokens=len(prompt),
                              logprobs=[] if params.logprobs is not None else None)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.finish_ids = params.finish_token_ids(eos_ids)
        self.limit = min(params.max_tokens, max_len - len(prompt))
        self.pos = len(prompt)  # position the next fed token goes to

    def accept(self, token: int, lp=None) -> Delta:
        """Record a sampled token; decide whether the row is finished."""
        o = self.out
        text = ""
        if token in self.finish_ids:
            o.finish_reason, o.stop_token = "stop", token
        else:
            o.token_ids.append(token)
            if lp is not None:
                o.logprobs.append(lp)
            if self.detok is not None:
                text = self.detok.add(token)
                if self.stops is not None:
                    text, hit = self.stops.feed(text)
                    if hit:
                        o.finish_reason = "stop"
            if o.finish_reason is None and len(o.token_ids) >= self.limit:
                o.finish_reason = "length"
        if o.finish_reason is not None:
            text += self._drain()
        o.text += text
        lps = [lp] if lp is not None and o.logprobs is not None and token not in self.finish_ids else None
        return Delta(self.index, [token], text, o.finish_reason, lps)

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


class Engine:
    """Generation over one loaded model. Not thread-safe: one `generate` at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_batch: int = 64,
                 prefill_chunk: int = 512, eos_token_ids: Sequence[int] | None = None, compile: bool = False):
        self.model = model
        if compile:
            compile_blocks(model)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.lm_head.out_features if hasattr(model.lm_head, "out_features") \
            else model.config.vocab_size
        self.device = next(model.parameters()).device
        if eos_token_ids is None:
            eos = model.config.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            tok_eos = getattr(tokenizer, "eos_token_id", None)
            if tok_eos is not None and tok_eos not in eos_token_ids:
                eos_token_ids.append(tok_eos)
        self.eos_token_ids = list(eos_token_ids)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        check_prompt(prompt, self.context)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_delta: Callable[[Delta], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """Generate for every prompt (token ids). `params` is one for all or one per prompt. Returns the
        completions in prompt order. Batches of at most `max_batch` rows run one after another."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise BadInputError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        for p, prompt in zip(plist, prompts):
            p.validate()
            self.check_prompt(prompt)
        results: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch):
            idx = range(start, min(start + self.max_batch, len(prompts)))
            results += self._run([list(prompts[i]) for i in idx], [plist[i] for i in idx], list(idx),
                                 on_delta, cancelled)
        return results

    def prefill(self, prompt: list[int], cache: Cache) -> torch.Tensor:
        """Run a prompt through a one-row cache in chunks; returns the last position's logits [V]."""
        ids = torch.tensor(prompt, device=self.device)[None]
        logits = None
        for s in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, s:s + self.prefill_chunk]
            pos = torch.arange(s, s + chunk.shape[1], device=self.device)[None]
            logits = self.model(chunk, pos, cache, last_only=True)
        return logits[0, -1]

    def _prefill_rows(self, rows: list[RequestState], cache: Cache) -> list[torch.Tensor]:
        """Each row's last prompt logits. A prompt seen earlier in the batch (n samples, GRPO groups, eval's
        k samples) is computed once and its cache row copied: G× less prefill for a group of G."""
        done: dict[tuple[int, ...], int] = {}
        out = []
        for b, r in enumerate(rows):
            key = tuple(r.prompt)
            if key in done:
                src = done[key]
                cache.copy_row(src, b, len(r.prompt))
                out.append(out[src])
            else:
                done[key] = b
                out.append(self.prefill(r.prompt, cache.rows(b)))
        return out

    def _run(self, prompts, plist, indices, on_delta, cancelled) -> list[Completion]:
        t0 = time.perf_counter()
        max_len = min(self.context, max(len(p) + sp.max_tokens for p, sp in zip(prompts, plist)))
        cache = self.model.new_cache(len(prompts), max_len)
        rows = [RequestState(i, p, sp, SamplerState(sp, self.vocab_size, p, device=self.device), self.tokenizer,
                     self.eos_token_ids, max_len) for i, p, sp in zip(indices, prompts, plist)]
        first = torch.stack(self._prefill_rows(rows, cache))
        live = rows
        sampler = Sampler([r.state for r in live])
        logits = first
        while live:
            out = sampler.sample(logits)
            tokens = out.tokens.tolist()
            now = time.perf_counter() - t0
            lps = logprob_rows(out.logprobs, [r.params.logprobs for r in live])
            for r, tok, lp in zip(live, tokens, lps):
                if r.out.first_token_s is None:
                    r.out.first_token_s = now
                delta = r.accept(tok, lp)
                if r.out.finish_reason is None and cancelled is not None and cancelled(r.index):
                    r.out.finish_reason = delta.finish_reason = "cancelled"
                if on_delta is not None:
                    on_delta(delta)
            keep = [b for b, r in enumerate(live) if r.out.finish_reason is None]
            if not keep:
                break
            if len(keep) < len(live):
                cache = cache.select(torch.tensor(keep, device=self.device))
                live = [live[b] for b in keep]
                sampler = Sampler([r.state for r in live])
                tokens = [tokens[b] for b in keep]
            ids = torch.tensor(tokens, device=self.device)[:, None]
            pos = torch.tensor([r.pos for r in live], device=self.device)[:, None]
            for r in live:
                r.pos += 1
            logits = self.model(ids, pos, cache)[:, -1]
        total = time.perf_counter() - t0
        for r in rows:
            r.out.total_s = total
        return [r.out for r in rows]


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each decoder block (dynamic shapes: batch and cache length vary step to step).

    Per-token decode of a small model is bound by per-op dispatch, not FLOPs: on 2 CPU cores SmolLM2 spends
    ~8 of its 15 ms per step outside the matmuls. Inductor fuses the norms, rotary and cache glue into a few
    C++ kernels (15.2 → 12.1 ms/step measured with int4 weights), at the price of ~20 s of compilation on
    first use; hence opt-in."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)


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
