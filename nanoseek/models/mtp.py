"""Multi-token prediction (DeepSeek-V3 §2.2): sequential modules that each predict one token further ahead.

Module k combines the previous depth's representation h_t (for k = 1, the main model's hidden state after
its final norm) with the embedding of token t+k: eh_proj([enorm(emb); hnorm(h)]) — embedding FIRST, the
order real checkpoints use, not the paper's figure — then one decoder block, then `shared_head.norm`; the
output head and embedding are the main model's. Training adds λ·CE(token t+k+1); inference may drop the
modules or use them to draft tokens for speculative decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.models.config import DeepseekConfig
from nanoseek.models.deepseek import DeepseekBlock
from nanoseek.models.layers import RMSNorm, Rotary


class SharedHead(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DeepseekBlock):
    """A decoder block (same parameter names as in the main stack) with MTP's input projection around it."""

    def __init__(self, cfg: DeepseekConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rotary: Rotary) -> torch.Tensor:  # type: ignore[override]
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.shared_head.norm(super().forward(x, rotary.positions(pos, x.dtype, cached=False)))
