"""The DeepSeek-V3 (and V3.2) decoder: MLA attention in every block, a dense SwiGLU in the first
`first_k_dense_replace` blocks and DeepSeekMoE after, plus optional MTP modules (`mtp.py`).

Parameter names match transformers' DeepseekV3ForCausalLM (experts packed as in transformers 5.x);
MTP modules live under `mtp.{k}` here and under `model.layers.{num_hidden_layers + k}` in hub files.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.models.base import CausalLM, DecoderStack
from nanoseek.models.config import DeepseekConfig, DeepseekV32Config
from nanoseek.models.dsa import SparseMLA
from nanoseek.models.layers import RMSNorm, Rotary, SwiGLU
from nanoseek.models.mla import MLA
from nanoseek.models.moe import MoE


class DeepseekBlock(nn.Module):
    def __init__(self, cfg: DeepseekConfig, layer_idx: int):
        super().__init__()
        # V3.2 (DeepseekV32Config) attends sparsely: DSA, models/dsa.py
        self.self_attn = SparseMLA(cfg) if isinstance(cfg, DeepseekV32Config) else MLA(cfg)
        self.mlp = MoE(cfg) if layer_idx >= cfg.first_k_dense_replace else SwiGLU(cfg.hidden_size,
                                                                                  cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, at, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), at, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        from nanoseek.models.mtp import MTPModule

        self.config = cfg
        rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings,
                        interleaved=cfg.rope_interleave)
        self.model = DecoderStack(cfg, [DeepseekBlock(cfg, i) for i in range(cfg.num_hidden_layers)], rotary)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.tie_weights()

    def moe_layers(self) -> list:
        """Every MoE in the main stack and the MTP modules, in order (for load statistics and bias updates)."""
        return [m for m in self.modules() if m.__class__.__name__ == "MoE"]

    def mtp_logits(self, ids: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the MTP modules (V3 §2.2). Depth k predicts token t+k+1 from position t.

        ids [B, T], h [B, T, H] the main model's final (normed) hidden states. Returns, for k = 1..D,
        logits [B, T-k, V] whose row t is the prediction for ids[:, t+k+1] (the last row has no target
        inside the sequence when t+k+1 == T)."""
        out, prev = [], h
        for k, module in enumerate(self.mtp, start=1):
            emb = self.model.embed_tokens(ids[:, k:])
            prev = module(prev[:, :-1], emb, self.model.rotary)
            out.append(self.lm_head(prev))
        return out
