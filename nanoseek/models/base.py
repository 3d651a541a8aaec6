"""What every nanoseek language model shares: the embedding → blocks → norm stack and the LM surface
(forward with optional cache and positions, cache allocation, weight tying)."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.models.cache import Cache
from nanoseek.models.layers import RMSNorm, Rotary


class DecoderStack(nn.Module):
    """Embedding → blocks → final norm; the part transformers calls `model`."""

    def __init__(self, cfg, blocks: list[nn.Module], rotary: Rotary):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache | None = None,
                window: int | None = None) -> torch.Tensor:
        x = self.embed_tokens(ids)
        at = self.rotary.positions(pos, x.dtype, cached=cache is not None, window=window)
        for i, layer in enumerate(self.layers):
            x = layer(x, at, None if cache is None else cache.layers[i])
        return self.norm(x)


class CausalLM(nn.Module):
    """Shared surface of every nanoseek language model.

    forward(ids [B, T], pos [B, T] | None, cache | None, logits_for="all"|"last") → logits [B, T|1, V].
    Without `pos`, positions are 0..T-1 and attention is plainly causal (training, reference checks); with a
    cache, tokens are written at `pos` and attend to everything cached at or before their position.
    `window` (with a cache): read exactly that many cached keys, masked by position, with no host sync: the
    static shapes a captured decode step needs (engine/graphs.py).
    """

    config: object
    model: DecoderStack
    lm_head: nn.Linear

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor | None = None, cache: Cache | None = None,
               window: int | None = None):
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.model(ids, pos, cache, window)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor | None = None, cache: Cache | None = None,
                last_only: bool = False, window: int | None = None) -> torch.Tensor:
        h = self.hidden(ids, pos, cache, window)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> Cache:
        p = self.model.embed_tokens.weight
        dtype = dtype or (p.dtype if p.dtype.is_floating_point else torch.float32)
        return Cache([layer.self_attn.new_cache(batch, max_len, dtype, device or p.device)
                      for layer in self.model.layers], max_len)

    def fuse(self) -> None:
        """Fuse sibling projections for inference (qkv, gate+up). One-way: a fused model is for serving,
        not for saving or training."""
        for m in list(self.modules()):
            if m is not self and callable(getattr(m, "fuse", None)):
                m.fuse()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
