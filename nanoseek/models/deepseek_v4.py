"""The DeepSeek-V4 decoder (V4 report §2): embedding → `hc_mult` residual streams → blocks of
[mHC around V4 attention, mHC around V4 MoE] → final stream collapse (`hc_head`) → RMSNorm → LM head.

Parameter names are transformers' DeepseekV4ForCausalLM ones (weights/hf.py translates DeepSeek's own
checkpoint names). MTP modules are not built (transformers does not instantiate them either).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.errors import UnsupportedError
from nanoseek.models.base import CausalLM
from nanoseek.models.cache import Cache
from nanoseek.models.config import DeepseekV4Config
from nanoseek.models.layers import RMSNorm, Rotary
from nanoseek.models.mhc import HyperConnection, HyperHead
from nanoseek.models.v4_attention import V4Attention, V4Positions
from nanoseek.models.v4_moe import V4MoE


class V4Block(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, i: int):
        super().__init__()
        self.self_attn = V4Attention(cfg, cfg.layer_types[i])
        self.mlp = V4MoE(cfg, hashed=cfg.mlp_layer_types[i] == "hash_moe")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hc = (cfg.hc_mult, cfg.hidden_size, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*hc)
        self.ffn_hc = HyperConnection(*hc)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, at: V4Positions, cache=None) -> torch.Tensor:
        """x [B, T, hc_mult, H] streams; ids [B, T] (hash routing reads the token ids)."""
        x = self.attn_hc(x, lambda h: self.self_attn(self.input_layernorm(h), at, cache))
        return self.ffn_hc(x, lambda h: self.mlp(self.post_attention_layernorm(h), ids))


class V4Stack(nn.Module):
    """transformers' `model`: embed_tokens, layers, hc_head, norm; plus our two rotary tables."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.hc_mult = cfg.hc_mult
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # interleaved pairs are applied by v4_attention.rope_tail itself, so the tables' layout flag is unused
        self.rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, interleaved=True)
        self.compress_rotary = Rotary(cfg.compress_rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings,
                                      interleaved=True)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache | None = None,
                window: int | None = None) -> torch.Tensor:
        if window is not None:  # CausalLM.hidden passes it; only a static-shape decode step sets it
            raise UnsupportedError("static-shape decode steps (--cuda-graphs) are not implemented for DeepSeek-V4: "
                                   "its caches are windows and compressed entries, not a span of positions")
        x = self.embed_tokens(ids)
        need = int(pos.max()) + 1
        at = V4Positions(pos, self.rotary.tables(pos, x.dtype, need), self.compress_rotary.tables(pos, x.dtype, need),
                         self.compress_rotary)
        x = x.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            x = layer(x, ids, at, None if cache is None else cache.layers[i])
        return self.norm(self.hc_head(x))


class DeepseekV4ForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.config = cfg
        self.model = V4Stack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    # The prefix cache cannot serve this model's caches (models/v4_cache.py; the engine asks the cache,
    # `Cache.prefix_cacheable`, as it does whether drafts can be rolled back, `Cache.rewindable`).
    prefix_cacheable = False

    def moe_layers(self) -> list:
        """The top-k routed MoEs, in order: what the aux-loss-free bias update and the balance loss act on.
        Hash-routed layers have no bias and no choice to balance; they train like any other weights."""
        return [layer.mlp for layer in self.model.layers if not layer.mlp.gate.hashed]
