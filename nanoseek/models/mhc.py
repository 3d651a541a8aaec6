"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 report §2.2, after Xie et al. 2026).

The residual stream is widened to `hc_mult` parallel streams x [.., N, D]. Around each attention or FFN block,
a one-layer perceptron over the flattened, RMS-normed streams produces three mixes:
  pre  [N]    collapses the streams into the block's input,              sigmoid(·) + eps
  post [N]    spreads the block's output back over the streams,           2·sigmoid(·)
  comb [N, N] mixes the residual streams,  projected by Sinkhorn–Knopp onto doubly stochastic matrices,
so that the residual map is non-expansive however deep the stack: out = post ⊗ block(Σ pre·x) + combᵀ x.
`HyperHead` collapses the streams once more before the final norm (pre only). All of it runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn–Knopp on [.., N, N]: softmax over rows (+eps), then alternately normalise columns and rows;
    `iters` column normalisations in all, the last one leaving columns summing to 1 within eps."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """One block's mHC: transformers calls the parameters `fn` [(2+N)·N, N·D], `base` [(2+N)·N], `scale` [3]."""

    def __init__(self, hc_mult: int, hidden: int, iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = hc_mult, iters, eps, norm_eps
        self.fn = nn.Parameter(torch.randn((2 + hc_mult) * hc_mult, hc_mult * hidden) * 0.02)
        self.base = nn.Parameter(torch.zeros((2 + hc_mult) * hc_mult))
        self.scale = nn.Parameter(torch.ones(3))

    def mixes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, N, D] → pre [B, T, N], post [B, T, N], comb [B, T, N, N] (fp32)."""
        n = self.n
        flat = rms_unweighted(x.flatten(2).float(), self.norm_eps)
        w = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = w.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = sinkhorn((comb_w * s_comb + comb_b).unflatten(-1, (n, n)), self.iters, self.eps)
        return pre, post, comb

    def forward(self, x: torch.Tensor, block) -> torch.Tensor:
        """x [B, T, N, D]; block maps the collapsed [B, T, D] to [B, T, D]."""
        pre, post, comb = self.mixes(x)
        dtype = x.dtype
        out = block((pre.unsqueeze(-1) * x).sum(2).to(dtype))
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x


class HyperHead(nn.Module):
    """The final collapse of the N streams (pre only): `hc_fn` [N, N·D], `hc_base` [N], `hc_scale` [1]."""

    def __init__(self, hc_mult: int, hidden: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = nn.Parameter(torch.randn(hc_mult, hc_mult * hidden) * 0.02)
        self.hc_base = nn.Parameter(torch.zeros(hc_mult))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = rms_unweighted(x.flatten(2).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * x).sum(2).to(x.dtype)
