"""How the decode loop calls the model: the facts it needs about it, and the forward passes it runs.

Owns:
  * `ModelRunner`: vocabulary width, EOS ids, context and device, worked out once per model; `prefill` (a
    chunk of one row's prompt), `decode` (one token for each of rows [0, d)) and `verify` (several tokens per
    row, for speculative decoding); `new_cache`, the loop's cache. `decode` is the extension point for a
    static-shape step (CPU compile, CUDA graphs): a subclass pads to a batch bucket and a fixed cache length
    and replays, the loop does not change (engine/graphs.py's `GraphRunner`).
  * `RoutingRecorder`: forward hooks on the MoE routers that collect each forward's expert choices, so the
    loop can hand every row its routing (for replaying a rollout's routing in RL training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.models.cache import Cache


def logits_width(model: torch.nn.Module) -> int:
    """The width of the model's logits: its LM head's output features (possibly padded past the tokenizer's
    vocabulary), or the config's vocabulary for a head without them."""
    return model.lm_head.out_features if hasattr(model.lm_head, "out_features") else model.config.vocab_size


class ModelRunner:
    """The forward passes of the loop over one model. `eos_token_ids` defaults to the config's EOS plus the
    tokenizer's; the vocabulary width is the LM head's (the logits' width, possibly padded past the
    tokenizer's)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, eos_token_ids: Sequence[int] | None = None):
        self.model = model
        self.context = model.config.max_position_embeddings
        self.vocab_size = logits_width(model)
        self.device = next(model.parameters()).device
        if eos_token_ids is None:
            eos = model.config.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            tok_eos = getattr(tokenizer, "eos_token_id", None)
            if tok_eos is not None and tok_eos not in eos_token_ids:
                eos_token_ids.append(tok_eos)
        self.eos_token_ids = list(eos_token_ids)
        self.recorder = RoutingRecorder(model)
        # For drafters that read the final hidden states (MTP): each forward leaves them in `hidden`.
        self.keep_hidden = False
        self.hidden: torch.Tensor | None = None

    def new_cache(self, max_batch: int, max_len: int) -> Cache:
        """The loop's cache at start: a few short rows that grow with what runs (engine/rows.py). A
        static-shape runner (engine/graphs.py) returns its one full-size cache instead."""
        return self.model.new_cache(min(max_batch, 4), min(max_len, 256))

    def prefill(self, tokens: Sequence[int], start: int, row: Cache) -> torch.Tensor:
        """Write `tokens` at positions start.. of a one-row cache view; the last position's logits [1, V]."""
        ids = torch.tensor(tokens, device=self.device)[None]
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        if self.keep_hidden:
            self.hidden = self.model.hidden(ids, pos, row)
            return self.model.lm_head(self.hidden[:, -1])
        return self.model(ids, pos, row, last_only=True)[:, -1]

    def decode(self, tokens: Sequence[int], positions: Sequence[int], rows: Cache) -> torch.Tensor:
        """One token per row of `rows` (a view of rows [0, d)), each at its position; logits [d, V].

        A single row goes through the model's fused native step when one is attached
        (`models/cpu_decode.attach`: quantized dense models on CPUs with AVX-512 VNNI), which runs the whole
        token in one call instead of ~400 PyTorch ops."""
        native = getattr(self.model, "cpu_decoder", None)
        if native is not None and len(tokens) == 1 and native.accepts(rows):
            return native.step(int(tokens[0]), int(positions[0]), rows)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.verify(ids, pos, rows)[:, -1]

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, rows: Cache) -> torch.Tensor:
        """Several tokens per row [d, T] at positions [d, T]; logits for every one [d, T, V].

        One row of consecutive positions (a speculative verify at batch 1) goes through the native decoder's
        chunk step when one is attached: it reads each weight once for all T tokens, where the PyTorch int4
        forward costs about two native steps. Not when the hidden states are wanted (MTP drafting): the
        native step does not return them."""
        native = getattr(self.model, "cpu_decoder", None)
        if (native is not None and not self.keep_hidden and tokens.shape[0] == 1 and native.accepts(rows)
                and tokens.shape[1] <= native.max_chunk):
            start = int(positions[0, 0])
            if positions[0].tolist() == list(range(start, start + tokens.shape[1])):
                return native.verify(tokens[0].tolist(), start, rows)[None]
        if self.keep_hidden:
            self.hidden = self.model.hidden(tokens, positions, rows)
            return self.model.lm_head(self.hidden)
        return self.model(tokens, positions, rows)


class RoutingRecorder:
    """Collects the routed experts of every MoE layer during the forwards it is switched on for.

    Forward hooks, not model changes: the models stay unaware of the engine, and nothing runs while it is
    off. `take(batch, tokens)` returns the choices of the forwards since the last take as
    [batch, tokens, n_moe_layers, top_k] and resets."""

    def __init__(self, model: torch.nn.Module):
        from nanoseek.models.moe import Router

        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self._handles: list = []
        self._seen: list[torch.Tensor] = []

    @property
    def on(self) -> bool:
        return bool(self._handles)

    def switch(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        elif not on and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []
            self._seen.clear()

    def _hook(self, module, args, output) -> None:
        self._seen.append(output[1].detach())

    def take(self, batch: int, tokens: int) -> torch.Tensor | None:
        if not self._seen:
            return None
        out = torch.stack([idx.reshape(batch, tokens, -1) for idx in self._seen], dim=2).cpu()
        self._seen.clear()
        return out
