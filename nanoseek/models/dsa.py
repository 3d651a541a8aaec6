"""DeepSeek Sparse Attention (DSA; DeepSeek-V3.2 report §2.1): MLA that attends only to the past tokens a
lightning indexer ranks highest, and the indexer's training loss (§2.1.1, continued pre-training).

- Lightning indexer: I(t,s) = Σ_j w(t,j)·ReLU(q_I(t,j)·k_I(s)). A few index heads j with one key per token
  shared by all of them (cached next to MLA's latent: cache.IndexedLatentLayer). Queries come from MLA's query
  latent c_Q, the key and the head weights w from the block's normed input. The first qk_rope_head_dim dims of
  q_I and k_I are rotated in the half-split layout (MLA's own rope slice uses interleaved pairs). The released
  model also applies a Hadamard rotation and FP8 to q_I and k_I: the rotation is orthogonal (dot products are
  unchanged) and FP8 is a precision choice, so neither appears here (transformers' reference omits both too).
- Selection: each query attends only to its `index_topk` highest-scoring keys among those it may see. While
  no row holds more than index_topk keys that is every visible key, so scoring is skipped (exactly equal).
- Training: stage "warmup" keeps attention dense and trains only the indexer, by KL(p_t ‖ softmax(I_t)) with
  p_t the main attention summed over heads and L1-normalised; stage "sparse" attends over the top-k and
  restricts the same KL to the selected keys. The indexer's input is detached in both stages, so the indexer
  learns only from its loss and the rest of the model only from the LM loss (train/loop.py adds the loss).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.cache import IndexedLatentLayer, Positions
from nanoseek.models.config import DeepseekV32Config
from nanoseek.models.layers import apply_rotary
from nanoseek.models.mla import MLA

STAGES = ("warmup", "sparse")


class LightningIndexer(nn.Module):
    """transformers' `self_attn.indexer`: wq_b [H_I·D_I, q_lora], wk [D_I, hidden], k_norm (a LayerNorm with
    bias), weights_proj [H_I, hidden]."""

    def __init__(self, cfg: DeepseekV32Config):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim ** -0.5

    def _rotate(self, x: torch.Tensor, at: Positions) -> torch.Tensor:
        half_split = dataclasses.replace(at, interleaved=False)
        return torch.cat([apply_rotary(x[..., :self.rope], half_split), x[..., self.rope:]], dim=-1)

    def keys(self, x: torch.Tensor, at: Positions) -> torch.Tensor:
        """Index keys k_I [B, T, D_I] of this chunk's tokens (what the cache stores)."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), at).squeeze(2)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, at: Positions, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """I(t, s) [B, T, L] in fp32 for queries x/q_latent [B, T, ·] against keys [B, L, D_I]; -inf where
        `visible` [B|1, T, L] is False. fp32 even under autocast: near-equal scores must rank as the reference's."""
        b, t, _ = x.shape
        with torch.autocast(x.device.type, enabled=False):
            q = self._rotate(self.wq_b(q_latent).float().view(b, t, self.n_heads, self.head_dim), at)
            dots = torch.matmul(q.reshape(b, t * self.n_heads, self.head_dim).float(), keys.float().transpose(1, 2))
            dots = F.relu(dots * self.scale).view(b, t, self.n_heads, -1)  # [B, T, H_I, L]
            proj = self.weights_proj  # fp32 when loaded (hf.py); quantize_model may swap it for an int layer
            w = F.linear(x.float(), proj.weight.float()) if isinstance(proj, nn.Linear) else proj(x).float()
            w = w * self.n_heads ** -0.5
            s = torch.matmul(w.unsqueeze(2), dots).squeeze(2)  # Σ_j w(t,j)·ReLU(…): [B, T, L]
        return s.masked_fill(~visible, float("-inf"))


class SparseMLA(MLA):
    """MLA (mla.py) whose queries each attend to the keys the lightning indexer picks. Decode (a few query
    tokens against a cache) gathers the picked latent rows and attends over index_topk of them, so its cost
    stops growing with the context; prefill and training mask the dense scores instead."""

    def __init__(self, cfg: DeepseekV32Config):
        super().__init__(cfg)
        self.indexer = LightningIndexer(cfg)
        self.topk = cfg.index_topk
        self.stage = "sparse"  # training only: "warmup" (dense attention, indexer KL) or "sparse"
        self.last_index_loss: torch.Tensor | None = None  # the last training forward's KL, for the loop

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> IndexedLatentLayer:
        return IndexedLatentLayer(torch.zeros(batch, max_len, self.kv_lora + self.rope, dtype=dtype, device=device),
                                  self.kv_lora,
                                  torch.zeros(batch, max_len, self.indexer.head_dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, at: Positions, cache: IndexedLatentLayer | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q_latent, q_nope, q_rope = self._queries(x, at)
        kv, mask = self._keys(x, at, cache)
        x_i, q_i = x.detach(), q_latent.detach()  # the indexer learns only from its own loss
        keys = self.indexer.keys(x_i, at)
        if cache is not None:
            cache.write_index(at.pos, keys)
            keys = cache.index_k[:, :at.length]
        length, cached = kv.shape[1], cache is not None
        learn = self.training and torch.is_grad_enabled()
        if learn and self.stage not in STAGES:
            raise ValueError(f"DSA stage {self.stage!r}: expected one of {STAGES}")
        if length <= self.topk and not learn:  # top-k of what is visible is all of it
            return self._project(self._attend(q_nope, q_rope, kv, mask, cached))
        visible = _visible(mask, t, length, x.device)
        scores = self.indexer.scores(x_i, q_i, at, keys, visible)
        if (learn and self.stage == "warmup") or length <= self.topk:
            chosen = visible.expand(b, -1, -1)
        else:
            idx = scores.topk(self.topk, dim=-1).indices  # [B, T, k]
            if cached and not learn and t <= 8 and self.mode != "naive":
                ok = scores.gather(-1, idx) > float("-inf")  # a short row's picks may include invisible keys
                return self._project(self._gathered(q_nope, q_rope, kv, idx, ok))
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True) & visible
        out = self._attend(q_nope, q_rope, kv, chosen.unsqueeze(1), cached)
        if learn:
            with torch.no_grad():
                probs = self.attention_probs(q_nope, q_rope, kv, chosen)
            self.last_index_loss = indexer_kl(probs, scores, chosen)
        return self._project(out)

    def attention_probs(self, q_nope, q_rope, kv, allowed: torch.Tensor) -> torch.Tensor:
        """The main attention's probabilities [B, H, T, L] over keys `allowed` [B, T, L] (the warm-up target)."""
        q, _ = self._absorbed_queries(q_nope, q_rope)
        logits = torch.einsum("bhtc,blc->bhtl", q.float(), kv.float()) * self.scale
        return logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1)

    def _gathered(self, q_nope, q_rope, kv, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Absorbed attention (mla.py) over each query's picked latent rows only: idx, ok [B, T, k]."""
        b, t, k = idx.shape
        q, w_uv = self._absorbed_queries(q_nope, q_rope)
        picked = kv.gather(1, idx.reshape(b, t * k, 1).expand(-1, -1, kv.shape[-1])).view(b, t, k, -1)
        logits = torch.einsum("bhtc,btkc->bhtk", q, picked).float() * self.scale
        p = logits.masked_fill(~ok.unsqueeze(1), float("-inf")).softmax(-1).to(q.dtype)
        out = torch.einsum("bhtk,btkc->bhtc", p, picked[..., :self.kv_lora])
        return torch.einsum("bhtc,hvc->bthv", out, w_uv.to(out.dtype))


def _visible(mask: torch.Tensor | None, t: int, length: int, device) -> torch.Tensor:
    """Which keys each query may see, [B|1, T, L] bool, from MLA's mask convention (None: causal without a
    cache, everything with one)."""
    if mask is not None:
        return mask[:, 0]
    if t == length:
        return torch.ones(t, t, dtype=torch.bool, device=device).tril().unsqueeze(0)
    return torch.ones(1, t, length, dtype=torch.bool, device=device)


def indexer_kl(attn_probs: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The indexer's loss, mean over queries of KL(p_t ‖ softmax(I_t)) over the keys `allowed` [B, T, L].

    p_t is the main attention attn_probs [B, H, T, L] summed over heads and L1-normalised (a target: no
    gradient); scores I [B, T, L] carry the gradient to the indexer. Zero-probability targets contribute 0."""
    target = attn_probs.detach().float().sum(1)
    # A query with no allowed key (V4's CSA before its first entry closes) has an all-zero target: the clamp
    # keeps its row 0 rather than NaN, and the mean is over the queries that have keys.
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1).masked_fill(~allowed, 0.0)
    has = allowed.any(-1)
    kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1)
    return kl.masked_fill(~has, 0.0).sum() / has.sum().clamp(min=1)


def dsa_modules(model: nn.Module) -> list[nn.Module]:
    """Every attention in `model` whose lightning indexer trains by `indexer_kl`, in order: V3.2's DSA layers
    (main stack and MTP modules) and V4's CSA layers (v4_attention.py). Each has `indexer`, `stage` and
    `last_index_loss`, which is all train/loop.py uses."""
    return [m for m in model.modules() if getattr(m, "indexer", None) is not None and hasattr(m, "last_index_loss")]
