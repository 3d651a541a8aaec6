"""Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are generated from a low-rank latent c_KV (kv_lora_rank wide); positions enter only
through a separate, decoupled rope key shared by all heads. Two equivalent ways to attend:

- naive: expand c_KV through kv_b_proj into per-head keys/values, then ordinary attention. Cheapest for
  long prefills and what training uses.
- absorbed: fold W_UK into the query and W_UV into the output (V2 §2.1.2's "absorb" trick), so attention
  runs directly against the cached latent — MQA with one (kv_lora + rope)-wide key and a kv_lora-wide value.
  This is what makes the small latent cache pay off at decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.cache import LatentLayer, Positions
from nanoseek.models.config import DeepseekConfig
from nanoseek.models.layers import RMSNorm, apply_rotary, yarn_mscale


class MLA(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.n_heads, self.kv_lora = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        self.q_lora = cfg.q_lora_rank
        if self.q_lora is None:  # V2-Lite / Moonlight: one full-rank query projection
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora)
            self.q_b_proj = nn.Linear(self.q_lora, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora)
        self.kv_b_proj = nn.Linear(self.kv_lora, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)
        self.scale = qk ** -0.5
        r = cfg.rope
        if r.rope_type == "yarn" and r.mscale_all_dim:
            # V2 appendix: YaRN's temperature enters the softmax scale squared (once for q, once for k).
            self.scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
        self.mode = "auto"  # "naive" | "absorb" | "auto" (absorb for short query chunks, i.e. decode)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentLayer:
        return LatentLayer(torch.zeros(batch, max_len, self.kv_lora + self.rope, dtype=dtype, device=device),
                           self.kv_lora)

    def _queries(self, x: torch.Tensor, at: Positions):
        """(query latent c_Q [B, T, q_lora] or None without q_lora, q_nope [B, T, H, nope], rotated q_rope)."""
        b, t, _ = x.shape
        latent = None if self.q_lora is None else self.q_a_layernorm(self.q_a_proj(x))
        q = (self.q_proj(x) if latent is None else self.q_b_proj(latent)).view(b, t, self.n_heads,
                                                                                self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        return latent, q_nope, apply_rotary(q_rope, at)

    def _keys(self, x: torch.Tensor, at: Positions, cache: LatentLayer | None):
        """Write this chunk's latent + rope key to the cache; return every key it reads [B, L, kv_lora + rope]
        and the mask (None: causal over the chunk without a cache, or every key visible)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # the norm covers the latent only, never the rope part
        k_rope = apply_rotary(k_rope.unsqueeze(2), at).squeeze(2)
        if cache is None:
            return torch.cat([latent, k_rope], dim=-1), None
        cache.write(at.pos, torch.cat([latent, k_rope], dim=-1))
        return cache.kv[:, :at.length], at.mask

    def _attend(self, q_nope, q_rope, kv, mask, cached: bool) -> torch.Tensor:
        """Attention output [B, T, H, v_dim], by whichever of the two equivalent forms is cheaper here."""
        absorb = self.mode == "absorb" or (self.mode == "auto" and cached and q_nope.shape[1] <= 8)
        if absorb:
            return self._absorbed(q_nope, q_rope, kv, mask)
        return self._naive(q_nope, q_rope, kv, mask)

    def forward(self, x: torch.Tensor, at: Positions, cache: LatentLayer | None = None) -> torch.Tensor:
        _, q_nope, q_rope = self._queries(x, at)
        kv, mask = self._keys(x, at, cache)
        return self._project(self._attend(q_nope, q_rope, kv, mask, cache is not None))

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, T, H, v_dim] → [B, T, hidden] (heads concatenated, then o_proj)."""
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_rope, kv, mask):
        b, length, _ = kv.shape
        latent, k_rope = kv.split([self.kv_lora, self.rope], dim=-1)
        kvh = self.kv_b_proj(latent).view(b, length, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kvh.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        pad = q.shape[-1] - self.v_dim if mask is None else 0
        if pad > 0:
            # Flash-attention kernels want one head size for q, k and v; without it SDPA falls back to the
            # math path, which materializes the T×T scores (training at T = 2048: GBs per layer). Zero columns
            # in v give zero columns in the output, dropped below.
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None and q.shape[1] > 1,
                                             scale=self.scale)
        out = out.transpose(1, 2)  # [B, T, H, v]
        return out[..., :self.v_dim] if pad > 0 else out

    def _absorbed_queries(self, q_nope, q_rope):
        """W_UK folded into the queries: (q [B, H, T, kv_lora + rope] against the cached latent + rope key,
        W_UV [H, v_dim, kv_lora] to lift the attended latent back to values)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        q_latent = torch.einsum("bthn,hnc->bhtc", q_nope, w[:, :self.nope].to(q_nope.dtype))
        return torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1), w[:, self.nope:]

    def _absorbed(self, q_nope, q_rope, kv, mask):
        q, w_uv = self._absorbed_queries(q_nope, q_rope)
        k = kv.unsqueeze(1)  # [B, 1, L, kv_lora + rope]: one key head shared by all query heads
        v = kv[..., :self.kv_lora].unsqueeze(1)
        if mask is None and q.shape[2] > 1:
            mask = torch.ones(q.shape[2], kv.shape[1], dtype=torch.bool, device=kv.device).tril()
        if q.shape[2] == 1 or kv.device.type == "cpu":
            out = self._one_head(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return torch.einsum("bhtc,hvc->bthv", out, w_uv.to(out.dtype))

    def _one_head(self, q, k, v, mask):
        """Every head's queries against the one latent key as a single head ([B, 1, H·T, C]; the mask repeated
        per head). Every SDPA backend takes this with a mask (enable_gqa with a mask sends CUDA to the math
        kernel), and on CPU it is 9-14x faster than enable_gqa at 8k-32k cached positions (one decode query,
        tiny and V3-wide shapes, 1 thread), so CPU uses it for short chunks too; CUDA keeps enable_gqa there."""
        b, h, t, c = q.shape
        if mask is not None and t > 1:
            mask = mask.expand(b, h, t, -1).reshape(b, 1, h * t, -1)
        out = F.scaled_dot_product_attention(q.reshape(b, 1, h * t, c), k, v, attn_mask=mask, scale=self.scale)
        return out.view(b, h, t, -1)
