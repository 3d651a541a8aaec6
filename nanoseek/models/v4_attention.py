"""DeepSeek-V4 attention (V4 report §2.3): one shared K=V head, a local window in every layer, and for CSA / HCA
layers compressed entries of the whole past.

- Shared-KV MQA with partial RoPE: queries (low-rank, `q_a` → RMSNorm → `q_b`, then an unweighted RMSNorm per
  head) and the single key = value head rotate only their last `qk_rope_head_dim` channels (interleaved pairs).
  Because values carry that rotation too, the output's rope slice is rotated back by the query's position
  (`rope_tail(.., -sin)`), which leaves each entry's contribution a function of the relative distance.
- Attention sinks (§2.3.3): a learned logit per head joins every softmax and takes probability mass, but no
  value.
- Local window: every query sees the last `sliding_window` tokens (itself included) exactly.
- Compression (`Compressor`): entry w of rate m is a softmax-gated sum over its window's tokens, per channel,
  of projected kv with gates Z + B (B a learned bias per offset in the window), then RMSNorm and RoPE at
  position w·m (the compressed rotary base, YaRN). HCA (§2.3.2): windows of m' = 128 tokens, no overlap; every
  query sees all entries whose window has ended at or before it. CSA (§2.3.1): windows of m = 4 with overlap —
  each token projects two series, and entry w mixes the previous window's first series with its own window's
  second (2m tokens, stride m).
- Lightning indexer (§2.3.1, eqs. 13–17), CSA only: its own compressor at `index_head_dim` (the index keys)
  and `index_n_heads` query heads from the query latent; I(t, s) = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s) with
  w from the hidden state; each query attends only the `index_topk` best visible entries. Top-k passes no
  gradient, so in training the indexer learns from V3.2's KL loss toward the main attention over the
  compressed entries (dsa.indexer_kl, run by train/loop.py like V3.2's): in the "warmup" stage CSA attends
  to every visible entry (dense, as HCA does) and the loss covers them all; in "sparse" it covers the picks.
  The indexer's inputs are detached, so it learns only from that loss.
- Grouped output projection (§2.3.1): heads are split into `o_groups` groups, each projected to
  `o_lora_rank` (`o_a_proj`, block diagonal), then mixed to the hidden size (`o_b_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.models.config import DeepseekV4Config
from nanoseek.models.dsa import STAGES, indexer_kl
from nanoseek.models.layers import RMSNorm, Rotary
from nanoseek.models.mhc import rms_unweighted
from nanoseek.models.v4_cache import CompressedLayer, CompressorState, WindowLayer


@dataclass
class V4Positions:
    """Per forward: positions pos [B, T] and the two rotary tables at them ([B, T, rope/2] each)."""

    pos: torch.Tensor
    main: tuple[torch.Tensor, torch.Tensor]
    comp: tuple[torch.Tensor, torch.Tensor]
    comp_rotary: Rotary


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2·cos.shape[-1] channels of x as interleaved pairs (x[2i], x[2i+1]), in place of layout.
    cos / sin broadcast against x's leading dims (add head dims before calling)."""
    r = 2 * cos.shape[-1]
    nope, rp = x[..., :-r], x[..., -r:]
    x1, x2 = rp[..., 0::2], rp[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rot], dim=-1)


class Compressor(nn.Module):
    """Compressed entries of one rate (HCA: overlap=False; CSA and its indexer: overlap=True).
    transformers' names: kv_proj, gate_proj, position_bias [m, width], kv_norm."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps)

    @property
    def ring(self) -> int:
        return 2 * self.rate if self.overlap else self.rate

    def new_state(self, batch: int, max_len: int, dtype, device) -> CompressorState:
        return CompressorState.empty(batch, self.ring, self.kv_proj.out_features, self.dim, self.rate, max_len,
                                     dtype, device)

    def forward(self, x: torch.Tensor, at: V4Positions, state: CompressorState | None) -> torch.Tensor:
        """x [B, T, H] at positions at.pos → the entries visible to this pass, [B, N, D] (entry w at index w;
        N = the most windows any row has completed; which of them a query may read is the caller's mask)."""
        m, pos = self.rate, at.pos
        b, t = pos.shape
        kv = self.kv_proj(x)
        gate = self.gate_proj(x) + self.position_bias[pos % m].to(x.dtype)
        if state is None:
            ring_kv, ring_gate = kv[:, :0], gate[:, :0]
            ring_pos = torch.full((b, 0), -1, dtype=torch.long, device=pos.device)
        else:
            ring_kv, ring_gate, ring_pos = state.pend_kv, state.pend_gate, state.pend_pos
        r = ring_kv.shape[1]
        start = pos[:, :1]
        # The windows this pass can complete, laid out from the first token they need (for CSA one window
        # earlier, the overlap): positions first .. first+L, L a whole number of windows.
        over = m if self.overlap else 0
        first = start // m * m - over
        length = -(-(t + over + m - 1) // m) * m
        w = start // m + torch.arange(length // m - (1 if self.overlap else 0), device=pos.device)  # [B, n] entry ids
        closing = ((w + 1) * m - 1 >= start) & ((w + 1) * m - 1 < start + t)
        if state is not None and not bool(closing.any()):  # most decode steps: no window ends here
            state.write_pending(pos, kv, gate)
            return state.entries[:, :int(((start[:, 0] + t) // m).max())]
        p = first + torch.arange(length, device=pos.device)
        old = p < start
        if r:
            slot = p % r
            old_ok = old & (p >= 0) & (ring_pos.gather(1, slot) == p)
        else:
            slot, old_ok = torch.zeros_like(p), torch.zeros_like(old)
        valid = old_ok | (~old & (p < start + t))
        src = torch.where(old, slot, r + (p - start).clamp(0, t - 1))
        idx = src.unsqueeze(-1).expand(-1, -1, kv.shape[-1])
        ext_kv = torch.cat([ring_kv, kv], 1).gather(1, idx)
        # Missing tokens get the lowest gate, not -inf: a window with none would softmax to NaN, and NaN
        # poisons gradients even where the entry is discarded. exp(min - max) is exactly 0 where any is valid.
        ext_gate = torch.cat([ring_gate, gate], 1).gather(1, idx)
        ext_gate = ext_gate.masked_fill(~valid.unsqueeze(-1), torch.finfo(ext_gate.dtype).min)
        ext_kv = ext_kv.masked_fill(~valid.unsqueeze(-1), 0.0)
        win_kv = ext_kv.unflatten(1, (length // m, m))
        win_gate = ext_gate.unflatten(1, (length // m, m))
        if self.overlap:  # entry i: previous window's first series, then this window's second series
            d = self.dim
            win_kv = torch.cat([win_kv[:, :-1, :, :d], win_kv[:, 1:, :, d:]], dim=2)
            win_gate = torch.cat([win_gate[:, :-1, :, :d], win_gate[:, 1:, :, d:]], dim=2)
        comp = (win_kv * win_gate.float().softmax(dim=2).to(win_kv.dtype)).sum(2)
        comp = self.kv_norm(comp)
        cos, sin = at.comp_rotary.tables(w * m, comp.dtype)
        comp = rope_tail(comp, cos, sin)
        if state is None:  # no cache: every row starts at 0, so entry w is comp[:, w]
            return comp[:, :int(closing[0].sum())]
        rows = torch.arange(b, device=pos.device)[:, None].expand_as(w)
        state.entries[rows[closing], w[closing]] = comp[closing]
        state.write_pending(pos, kv, gate)
        return state.entries[:, :int(((start[:, 0] + t) // m).max())]


def visible(entries_n: int, pos: torch.Tensor, rate: int) -> torch.Tensor:
    """[B, T, N]: entry s is visible to the query at position q once its window has ended: s < (q+1) // m."""
    return torch.arange(entries_n, device=pos.device) < ((pos + 1) // rate).unsqueeze(-1)


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer; transformers nests it as `compressor.indexer` with its compressor's
    tensors flattened in (kv_proj, gate_proj, position_bias, kv_norm), `q_b_proj` and `scorer.weights_proj`."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.heads, self.dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.comp = Compressor(cfg.hidden_size, cfg.index_head_dim, cfg.compress_rate_csa, True, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)

    def scores(self, x, q_latent, at: V4Positions, state: CompressorState | None) -> torch.Tensor:
        """I(t, s) [B, T, N] in fp32 over the index keys visible to this pass; -inf where not yet visible."""
        keys = self.comp(x, at, state)  # [B, N, Di]
        b, t, _ = x.shape
        q = self.q_b_proj(q_latent).view(b, t, self.heads, self.dim)
        cos, sin = at.comp
        q = rope_tail(q, cos.unsqueeze(2), sin.unsqueeze(2))
        s = torch.relu(torch.einsum("bthd,bnd->bthn", q.float(), keys.float())) * self.dim ** -0.5
        w = self.weights_proj(x).float() * self.heads ** -0.5
        score = (s * w.unsqueeze(-1)).sum(2)  # [B, T, N]
        return score.masked_fill(~visible(keys.shape[1], at.pos, self.comp.rate), float("-inf"))

    def forward(self, x, q_latent, at: V4Positions, state: CompressorState | None):
        """→ indices [B, T, k] of the selected entries and valid [B, T, k] (False: nothing left to pick)."""
        return pick(self.scores(x, q_latent, at, state), self.topk)


def pick(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k entries of scores [B, T, N]: indices [B, T, k'] and valid [B, T, k'], k' = min(k, N)."""
    top = score.topk(min(k, score.shape[-1]), dim=-1)
    return top.indices, top.values > float("-inf")


class GroupedLinear(nn.Module):
    """`o_a_proj`: one [rank, in] projection per head group, stored as transformers does, weight [G·rank, in].
    Not an nn.Linear on purpose: weight-only quantization (models/quant.py) replaces nn.Linears by kernels
    that compute x @ Wᵀ for one matrix; this one is block diagonal, so it stays float like the experts."""

    def __init__(self, in_per_group: int, rank: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * rank, in_per_group))
        nn.init.normal_(self.weight, std=in_per_group ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, G, in] → [B, T, G, rank]."""
        return torch.einsum("btgi,gri->btgr", x, self.weight.view(self.groups, -1, x.shape[-1]))


class V4Attention(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.heads, self.dim, self.window = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        self.groups = cfg.o_groups
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.heads * d, bias=False)
        self.kv_proj = nn.Linear(h, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(self.heads * d // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, h, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.heads))
        self.eps = cfg.rms_norm_eps
        rate = cfg.compress_rate(layer_type)
        self.compressor = None if not rate else Compressor(h, d, rate, layer_type == "compressed_sparse_attention",
                                                           cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if layer_type == "compressed_sparse_attention" else None
        self.stage = "sparse"  # training only (CSA): "warmup" (dense over entries, indexer KL) or "sparse"
        self.last_index_loss: torch.Tensor | None = None  # the last training forward's KL, for the loop

    def new_cache(self, batch: int, max_len: int, dtype, device) -> WindowLayer | CompressedLayer:
        window = WindowLayer.empty(batch, self.window, self.dim, dtype, device)
        if self.compressor is None:
            return window
        index = None if self.indexer is None else self.indexer.comp.new_state(batch, max_len, dtype, device)
        return CompressedLayer(window, self.compressor.new_state(batch, max_len, dtype, device), index)

    def forward(self, x: torch.Tensor, at: V4Positions, cache: WindowLayer | CompressedLayer | None = None):
        b, t, _ = x.shape
        cos, sin = at.main if self.compressor is None else at.comp
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = rms_unweighted(self.q_b_proj(q_latent).view(b, t, self.heads, self.dim), self.eps)
        q = rope_tail(q, cos.unsqueeze(2), sin.unsqueeze(2)).transpose(1, 2)  # [B, H, T, D]
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, T, D]: the one key = value head
        window = cache.window if isinstance(cache, CompressedLayer) else cache
        keys, key_pos = kv, at.pos
        if window is not None:  # earlier tokens from the ring, read before this pass overwrites it
            old = window.pos.masked_fill(window.pos >= at.pos[:, :1], -1)
            keys, key_pos = torch.cat([window.kv, kv], 1), torch.cat([old, at.pos], 1)
            window.write(at.pos, kv)
        dist = at.pos.unsqueeze(-1) - key_pos.unsqueeze(1)  # [B, T, L]
        local_ok = (key_pos.unsqueeze(1) >= 0) & (dist >= 0) & (dist < self.window)
        logits = [(q @ keys.unsqueeze(1).transpose(-1, -2)).masked_fill(~local_ok.unsqueeze(1), float("-inf"))]
        scale = self.dim ** -0.5
        far, gathered = None, False  # gathered: far is each query's own picks [B, T, k, D]
        learn = self.indexer is not None and self.training and torch.is_grad_enabled()  # CSA's indexer KL
        if self.compressor is not None:
            entries = self.compressor(x, at, None if cache is None else cache.comp)  # [B, N, D]
            if self.indexer is None:  # HCA: every finished window
                far = entries.unsqueeze(1)  # [B, 1, N, D]
                ok = visible(entries.shape[1], at.pos, self.compressor.rate)
                logits.append((q @ far.transpose(-1, -2)).masked_fill(~ok.unsqueeze(1), float("-inf")))
            else:  # CSA: the indexer's top-k
                state = None if cache is None else cache.index
                if learn:  # the indexer learns only from its own loss (indexer_kl below)
                    if self.stage not in STAGES:
                        raise ValueError(f"CSA stage {self.stage!r}: expected warmup or sparse")
                    score = self.indexer.scores(x.detach(), q_latent.detach(), at, state)
                if learn and self.stage == "warmup":  # dense over every visible entry, as HCA
                    far, ok = entries.unsqueeze(1), score > float("-inf")  # [B, 1, N, D], [B, T, N]
                    lg = q @ far.transpose(-1, -2)
                else:
                    idx, ok = pick(score, self.indexer.topk) if learn else self.indexer(x, q_latent, at, state)
                    rows = torch.arange(b, device=x.device)[:, None, None]
                    far, gathered = entries[rows, idx], True  # [B, T, k, D]
                    lg = torch.einsum("bhtd,btkd->bhtk", q, far)
                    if learn:
                        score = score.gather(-1, idx)
                logits.append(lg.masked_fill(~ok.unsqueeze(1), float("-inf")))
        sizes = [lg.shape[-1] for lg in logits]
        sink = self.sinks.to(q.dtype).view(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.cat([lg * scale for lg in logits] + [sink], -1).float().softmax(-1).to(q.dtype)
        parts = probs.split(sizes + [1], dim=-1)
        out = parts[0] @ keys.unsqueeze(1)
        if far is not None:
            out = out + (torch.einsum("bhtk,btkd->bhtd", parts[1], far) if gathered else parts[1] @ far)
        if learn:
            # target: the main attention's mass on the entries the indexer chose among (the window and sink
            # excluded; indexer_kl renormalises), queries with no visible entry yet left out
            self.last_index_loss = indexer_kl(parts[1], score, ok)
        out = rope_tail(out.transpose(1, 2), cos.unsqueeze(2), -sin.unsqueeze(2))  # [B, T, H, D]
        return self.o_b_proj(self.o_a_proj(out.reshape(b, t, self.groups, -1)).flatten(2))
