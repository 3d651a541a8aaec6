"""DeepSeekMoE (V3 §2.1.2): the router, experts as grouped GEMMs, shared experts, and load balancing.

- Router: sigmoid (V3) or softmax (V2) affinities in fp32; a per-expert bias is added for *selection only*
  (group-limited top-k); gating weights come from the unbiased scores, normalized and scaled.
- Aux-loss-free balancing: the bias is not trained by gradient. `update_router_bias` applies
  b_i += γ·sign(mean(load) − load_i) after each optimizer step, with loads counted over the global batch.
- The complementary sequence-wise balance loss (V3 eq. 17–20) is `sequence_balance_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.config import DeepseekConfig
from nanoseek.models.layers import SwiGLU


class Router(nn.Module):
    """transformers calls it `gate`: weight [E, H] and the selection bias `e_score_correction_bias` [E]."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring, self.norm_topk, self.scaling = cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.006)
        # fp32 always: sign updates of size γ=1e-3 vanish in bf16 once |b| grows.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # Keep routing (V3.2 GRPO): expert ids [N, k] to use instead of this router's own choice in the next
        # forwards, set by the trainer from a rollout's routing record; rows of -1 choose freely (padding, the
        # last token). Gating weights still come from the current scores, so the router keeps its gradient.
        self.forced: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] → gating weights [N, k], expert ids [N, k], scores [N, E] (unbiased, fp32)."""
        # fp32 even inside a bf16 autocast region (training), where F.linear would otherwise run in bf16.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.scoring == "sigmoid" else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            # V3 ranks a group by the sum of its two best biased scores; V2 (softmax) by its best one.
            group_score = grouped.topk(2, dim=-1)[0].sum(-1) if self.scoring == "sigmoid" else grouped.amax(-1)
            keep = group_score.topk(self.topk_group, dim=-1)[1]
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            # expand + reshape, not repeat_interleave: the same mask with shapes known up front (graph capture).
            expert_mask = group_mask[:, :, None].expand(-1, -1, self.n_experts // self.n_group).reshape(
                group_mask.shape[0], self.n_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        idx = choice.topk(self.top_k, dim=-1)[1]
        if self.forced is not None:
            forced = self.forced.to(idx.device)
            if forced.shape != idx.shape:
                raise ValueError(f"forced routing {tuple(forced.shape)} does not match {tuple(idx.shape)} tokens")
            idx = torch.where(forced >= 0, forced, idx)
        weights = scores.gather(1, idx)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] for expert ids `idx`. A scatter, not `torch.bincount`: bincount sizes its output
    from max(idx), a host sync on CUDA that breaks graph capture and stalls every MoE layer."""
    flat = idx.reshape(-1)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class Experts(nn.Module):
    """E SwiGLU experts packed as gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I],
    transformers 5.x's layout. Tokens are sorted by expert and run as two grouped GEMMs.

    `static_shapes` (set by engine/graphs.py around a captured decode step): every token runs through every
    expert, weighted by its gate (zero for experts it did not choose): two plain GEMMs whose shapes depend
    only on the token count, no sort, gather or data-dependent group sizes. E/k times the FLOPs, which decode
    (a few hundred tokens, bound by reading the weights, all of which a batch touches anyway) can afford."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        nn.init.normal_(self.gate_up_proj, std=0.006)
        nn.init.normal_(self.down_proj, std=0.006)
        self.use_grouped_mm = _grouped_mm_available()
        self.static_shapes = False

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.static_shapes:
            return self.forward_all(x, idx, weights)
        n, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = expert_counts(flat, self.gate_up_proj.shape[0])
        xs = x[token]
        w1, w2 = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):  # training in bf16: autocast does not cover _grouped_mm
            dt = torch.get_autocast_dtype(x.device.type)
            xs, w1, w2 = xs.to(dt), w1.to(dt), w2.to(dt)
        if self._grouped(xs):
            offs = counts.cumsum(0).to(torch.int32)  # _grouped_mm wants int32 group ends
            gu = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
            ys = torch._grouped_mm(self.act(*gu.chunk(2, dim=-1)), w2.transpose(1, 2), offs=offs)
        else:
            ys = self.forward_loop(xs, counts)
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's gating; DeepSeek-V4's experts clamp it (models/v4_moe.py)."""
        return F.silu(gate) * up

    def _grouped(self, xs: torch.Tensor) -> bool:
        """The CPU kernel takes fp32/bf16/fp16; the CUDA kernel (and torch.compile's checks) bf16 only."""
        if not self.use_grouped_mm:
            return False
        if xs.device.type == "cpu" and not torch.compiler.is_compiling():
            return xs.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return xs.dtype == torch.bfloat16

    def forward_all(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Static-shape path (see the class docstring): x [N, H] → [N, H]."""
        n = x.shape[0]
        e, two_i, h = self.gate_up_proj.shape
        gate = weights.new_zeros(n, e).scatter_(1, idx, weights)  # [N, E], zero for experts not chosen
        gu = F.linear(x, self.gate_up_proj.view(e * two_i, h)).view(n, e, two_i)
        act = self.act(*gu.chunk(2, dim=-1)) * gate.to(gu.dtype)[..., None]  # gate folded in before the down proj
        # One batched GEMM per expert's down projection [E, N, I] x [E, I, H], summed over experts.
        ys = torch.bmm(act.transpose(0, 1), self.down_proj.transpose(1, 2))
        return ys.sum(0).to(x.dtype)

    def forward_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference path: one pair of matmuls per expert over its contiguous slice of sorted tokens."""
        out, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                g, u = F.linear(xs[start:start + c], self.gate_up_proj[e]).chunk(2, dim=-1)
                out.append(F.linear(self.act(g, u), self.down_proj[e]))
            start += c
        return torch.cat(out) if out else xs.new_zeros(0, self.down_proj.shape[1])


class MoE(nn.Module):
    """Routed experts + always-on shared experts. Keeps the last forward's routing for statistics and
    the balance loss: `last_load` [E] token counts, `last_scores` [N, E], `last_idx` [N, k]."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.last_load: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat)
        self.last_load = expert_counts(idx, self.gate.n_experts).detach()
        if self.training:
            self.last_scores, self.last_idx = scores.view(*shape[:-1], -1), idx.view(*shape[:-1], -1)
        out = self.experts(flat, idx, weights)
        return out.view(shape) + self.shared_experts(x)


@torch.no_grad()
def update_router_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """V3 §2.1.2: raise the bias of under-loaded experts, lower it for over-loaded ones, by γ each step."""
    load = load.float()
    bias += gamma * torch.sign(load.mean() - load)


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """V3 eq. 17–20, averaged over sequences: Σ_i f_i·P_i with f_i = E/(K·T)·#{t: i ∈ topk(t)} and
    P_i = mean_t s'_{i,t}, s' the scores normalized over experts. scores [B, T, E], idx [B, T, K].
    Multiply by α yourself."""
    b, t, e = scores.shape
    counts = torch.zeros(b, e, device=scores.device).scatter_add_(
        1, idx.reshape(b, -1), torch.ones(b, t * top_k, device=scores.device))
    f = counts * e / (top_k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def load_imbalance(load: torch.Tensor) -> float:
    """max/mean of per-expert token counts: 1.0 is perfectly balanced."""
    load = load.float()
    return float(load.max() / load.mean().clamp(min=1e-9))
