"""Drafters for speculative decoding: cheap guesses of a row's next tokens, which the loop verifies in one
batched forward of the real model (engine/scheduler.py) and keeps only as far as the model agrees.

Owns the `Drafter` interface and three drafters:
  * `NgramDrafter`: prompt lookup, as llama.cpp's and vLLM's n-gram drafting: find the most recent earlier
    occurrence of the row's last n tokens and propose what followed it. No weights; pays off when the output
    repeats its context (editing, quoting, code).
  * `ModelDrafter`: a small model sharing the target's vocabulary, run greedily on its own cache.
  * `MTPDrafter`: the target's own multi-token-prediction module (DeepSeek-V3 §2.2), which was trained to
    predict one token further than the main model; applied recursively for more than one draft token.

Every proposal is deterministic (greedy for the model drafters), which keeps the acceptance rule simple and
exact: engine/sampling.Sampler.verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from nanoseek.engine.rows import grow
from nanoseek.engine.step import logits_width
from nanoseek.models.deepseek import DeepseekBlock


@dataclass
class DraftRow:
    """What a drafter sees of one decoding row: its request id and every token so far (prompt, output, and
    last the token about to be fed, whose successor is the first draft)."""

    rid: int
    tokens: Sequence[int]


class Drafter(Protocol):
    name: str
    # Whether the drafter reads the target's final hidden states: the loop then hands it every confirmed
    # position's (`observe`, `fork` for a twin's copied prompt) and computes prompts it would otherwise take
    # from the prefix cache, which holds no hidden states.
    needs_hidden: bool

    def propose(self, rows: Sequence[DraftRow], k: Sequence[int]) -> list[list[int]]:
        """Up to k[i] draft tokens following rows[i].tokens (fewer, or none, when it has no good guess)."""

    def release(self, rid: int) -> None:
        """The request ended: drop whatever is kept for it."""


class NgramDrafter:
    """Prompt lookup: match the last n tokens (n from `max_n` down to `min_n`) against earlier context."""

    name = "ngram"
    needs_hidden = False

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, rows: Sequence[DraftRow], k: Sequence[int]) -> list[list[int]]:
        return [self._one(np.asarray(r.tokens, dtype=np.int64), n) if n > 0 else [] for r, n in zip(rows, k)]

    def _one(self, seq: np.ndarray, k: int) -> list[int]:
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            tail = seq[-n:]
            # candidate starts j < len - n (so a continuation exists), latest first
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == tail).all(-1))
            if len(hits):
                j = int(hits[-1]) + n
                return seq[j:j + k].tolist()
        return []

    def release(self, rid: int) -> None:
        pass


class _RowCaches:
    """Per-request one-row caches of a drafting model, grown by doubling, with how many positions hold the
    confirmed tokens (positions past that are abandoned drafts, rewritten on the next call)."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model, self.max_len = model, max_len
        self.rows: dict[int, list] = {}   # rid -> [cache, filled]

    def get(self, rid: int, need: int):
        entry = self.rows.get(rid)
        if entry is None:
            entry = self.rows[rid] = [self.model.new_cache(1, min(self.max_len, max(64, need))), 0]
        cache = entry[0]
        if need > cache.max_len:
            entry[0] = cache.resized(grow(cache.max_len, need, self.max_len))
        return entry

    def release(self, rid: int) -> None:
        self.rows.pop(rid, None)


class ModelDrafter:
    """Greedy drafts from a smaller model with the target's vocabulary (checked at construction)."""

    name = "draft"
    needs_hidden = False

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_len: int):
        width = logits_width(model)
        if width != vocab_size:
            from nanoseek.errors import BadInputError

            raise BadInputError(f"the draft model's vocabulary ({width}) differs from the target's ({vocab_size}); "
                                "a draft model must share the target's tokenizer")
        self.model = model
        self.device = next(model.parameters()).device
        self.caches = _RowCaches(model, min(max_len, model.config.max_position_embeddings))

    @torch.inference_mode()
    def propose(self, rows: Sequence[DraftRow], k: Sequence[int]) -> list[list[int]]:
        out = []
        for r, n in zip(rows, k):
            n = min(n, self.caches.max_len - len(r.tokens))
            if n <= 0:
                out.append([])
                continue
            entry = self.caches.get(r.rid, len(r.tokens) + n)
            cache, filled = entry
            filled = min(filled, len(r.tokens) - 1)  # keep at least the last token to feed
            ids = torch.tensor(r.tokens[filled:], device=self.device)[None]
            pos = torch.arange(filled, len(r.tokens), device=self.device)[None]
            draft = []
            logits = self.model(ids, pos, cache, last_only=True)[:, -1]
            entry[1] = len(r.tokens)
            for i in range(n):
                tok = int(logits.argmax(-1))
                draft.append(tok)
                if i + 1 < n:
                    p = len(r.tokens) + i
                    logits = self.model(torch.tensor([[tok]], device=self.device),
                                        torch.tensor([[p]], device=self.device), cache)[:, -1]
            out.append(draft)
        return out

    def release(self, rid: int) -> None:
        self.caches.release(rid)


class MTPDrafter:
    """Drafts from the target's first MTP module (DeepSeek-V3 §2.2, "MTP in inference").

    At position t the module reads the main model's final hidden state h_t and the embedding of token t+1,
    and predicts token t+2. With a row's tokens x_0..x_{n-1} (x_{n-1} about to be fed at n-1), h up to n-2 is
    known, so the module at n-2 predicts x_n: the first draft. Further drafts apply the same module again,
    feeding its own output state in place of the main model's (which does not exist yet) with the previous
    draft's embedding. The module's attention keeps its own per-row cache of positions whose inputs are
    confirmed; recursive positions past them are abandoned and rewritten, like rejected drafts."""

    name = "mtp"
    needs_hidden = True

    def __init__(self, model: torch.nn.Module, max_len: int):
        from nanoseek.errors import BadInputError

        if not len(getattr(model, "mtp", ())):  # noqa: PLC1802 - an nn.ModuleList or nothing
            raise BadInputError("this model has no MTP module (num_nextn_predict_layers is 0); use --speculative "
                                "ngram or draft=MODEL")
        self.model, self.module = model, model.mtp[0]
        p = model.model.embed_tokens.weight
        self.device = p.device
        self.dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.max_len = max_len
        self.rows: dict[int, dict] = {}  # rid -> {"cache", "filled", "h": main hidden states [L, H]}

    def _row(self, rid: int, need: int) -> dict:
        r = self.rows.get(rid)
        size = min(self.max_len, max(64, need))
        if r is None:
            from nanoseek.models.cache import Cache

            layer = self.module.self_attn.new_cache(1, size, self.dtype, self.device)
            r = self.rows[rid] = {"cache": Cache([layer], size), "filled": 0,
                                  "h": torch.zeros(size, self.model.config.hidden_size, dtype=self.dtype,
                                                   device=self.device)}
        if need > r["cache"].max_len:
            size = grow(r["cache"].max_len, need, self.max_len)
            r["cache"] = r["cache"].resized(size)
            h = torch.zeros(size, r["h"].shape[1], dtype=self.dtype, device=self.device)
            h[:r["h"].shape[0]] = r["h"]
            r["h"] = h
        return r

    def observe(self, rid: int, start: int, hidden: torch.Tensor) -> None:
        """The main model's final hidden states [T, H] at confirmed positions start..start+T-1."""
        r = self._row(rid, start + hidden.shape[0])
        r["h"][start:start + hidden.shape[0]] = hidden

    def fork(self, src: int, dst: int, n: int) -> None:
        """dst's first n positions are a copy of src's (a twin prompt)."""
        self.observe(dst, 0, self.rows[src]["h"][:n])

    def _step(self, r: dict, h: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The module over positions start.. with inputs h [T, H] and next tokens [T]; its output states."""
        m = self.module
        x = m.eh_proj(torch.cat([m.enorm(self.model.model.embed_tokens(tokens)), m.hnorm(h)], -1))[None]
        pos = torch.arange(start, start + x.shape[1], device=self.device)[None]
        at = self.model.model.rotary.positions(pos, x.dtype, cached=True)
        y = DeepseekBlock.forward(m, x, at, r["cache"].layers[0])  # the module's block, on the row's cache
        return m.shared_head.norm(y)[0]

    @torch.inference_mode()
    def propose(self, rows: Sequence[DraftRow], k: Sequence[int]) -> list[list[int]]:
        out = []
        for row, n in zip(rows, k):
            toks = row.tokens
            last = len(toks) - 2            # the position whose module output predicts the first draft
            if n <= 0 or last < 0:
                out.append([])
                continue
            r = self._row(row.rid, last + 1 + n)
            start = min(r["filled"], last)
            ids = torch.tensor(toks[start + 1:last + 2], device=self.device)
            o = self._step(r, r["h"][start:last + 1], ids, start)[-1:]
            r["filled"] = last + 1
            draft = []
            for i in range(n):
                tok = int(self.model.lm_head(o).argmax(-1))
                draft.append(tok)
                if i + 1 < n:
                    o = self._step(r, o, torch.tensor([tok], device=self.device), last + 1 + i)
            out.append(draft)
        return out

    def release(self, rid: int) -> None:
        self.rows.pop(rid, None)
