"""DeepSeek-V4's MoE (V4 report §2.1): DeepSeekMoE with three changes.

- Scores are sqrt(softplus(logits)) ("sqrtsoftplus"; softmax and sigmoid also load). The selection bias of
  aux-loss-free balancing is added for selection only, as in V3; gating weights are the chosen unbiased scores,
  always normalised, times `routed_scaling_factor`.
- Hash routing in the first layers (`mlp_layer_types == "hash_moe"`): the experts of token t are a fixed table
  `tid2eid[token id]` [V, k], whatever the hidden state; only their gating weights are learned. The table is
  frozen (a buffer, saved with the model) and, for a fresh model, drawn from `hash_seed` so that every expert
  gets the same number of vocabulary entries (`balanced_hash_table`).
- SwiGLU clamped at `swiglu_limit` (gate from above, up on both sides), in routed and shared experts alike.
The experts' grouped GEMMs and the V3 bias update / balance loss are moe.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.config import DeepseekV4Config
from nanoseek.models.moe import Experts, expert_counts


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def score(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if func == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


def balanced_hash_table(vocab: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """tid2eid [vocab, k]: k distinct experts per token; over the vocabulary each expert is chosen
    ⌊vocab·k/E⌋ or ⌈vocab·k/E⌉ times (a seeded shuffle of the token ids dealt round-robin)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    slot = torch.arange(vocab)[:, None] * k + torch.arange(k)[None, :]  # dealt in order: distinct per row if k ≤ E
    table = torch.empty(vocab, k, dtype=torch.long)
    table[perm] = slot % n_experts
    return table


class ClampedSwiGLU(nn.Module):
    """The shared expert: transformers' names gate_proj / up_proj / down_proj, width moe_intermediate_size."""

    def __init__(self, dim: int, hidden: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedExperts(Experts):
    def __init__(self, cfg: DeepseekV4Config):
        super().__init__(cfg)
        self.limit = cfg.swiglu_limit

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate, up, self.limit)


class V4Router(nn.Module):
    """`gate`: weight [E, H]; top-k routers also hold `e_score_correction_bias` [E], hash routers `tid2eid`."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool):
        super().__init__()
        self.n_experts, self.top_k, self.hashed = cfg.n_routed_experts, cfg.num_experts_per_tok, hashed
        self.scoring, self.scaling = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.006)
        if hashed:
            self.register_buffer("tid2eid", balanced_hash_table(cfg.vocab_size, cfg.n_routed_experts,
                                                                cfg.num_experts_per_tok, cfg.hash_seed))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H], ids [N] → gating weights [N, k], expert ids [N, k], scores [N, E] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = score(F.linear(x.float(), self.weight.float()), self.scoring)
        if self.hashed:
            idx = self.tid2eid[ids].long()
        else:
            idx = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


class V4MoE(nn.Module):
    """Routed + shared experts. Keeps `last_load` / `last_scores` / `last_idx` like moe.MoE, which is what the
    training loop's balance loss and bias update read (hash layers are left out of those: models/deepseek_v4)."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool):
        super().__init__()
        self.gate = V4Router(cfg, hashed)
        self.experts = ClampedExperts(cfg)
        self.shared_experts = ClampedSwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.last_load: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat, ids.reshape(-1))
        self.last_load = expert_counts(idx, self.gate.n_experts).detach()
        if self.training:
            self.last_scores, self.last_idx = scores.view(*shape[:-1], -1), idx.view(*shape[:-1], -1)
        return self.experts(flat, idx, weights).view(shape) + self.shared_experts(x)
