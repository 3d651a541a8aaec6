"""Dense decoder of the Llama / Qwen2 family: GQA attention with RoPE, SwiGLU MLP, pre-norm residual blocks.

Parameter names match transformers' LlamaForCausalLM / Qwen2ForCausalLM, so a state dict moves across
without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.base import CausalLM, DecoderStack
from nanoseek.models.cache import KVLayer, Positions
from nanoseek.models.config import DenseConfig
from nanoseek.models.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, fuse_linears


class GQAttention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVLayer:
        shape = (batch, self.n_kv, max_len, self.head_dim)
        return KVLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def fuse(self) -> None:
        """Inference only: q, k and v from one matmul, and one rotary call for q and k together."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, at: Positions, cache: KVLayer | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(b, t, nq + 2 * nkv, hd)
            qk = apply_rotary(qkv[:, :, :nq + nkv], at)
            q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv:]
        else:
            q = apply_rotary(self.q_proj(x).view(b, t, nq, hd), at)
            k = apply_rotary(self.k_proj(x).view(b, t, nkv, hd), at)
            v = self.v_proj(x).view(b, t, nkv, hd)
        q = q.transpose(1, 2)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=t > 1,
                                                 enable_gqa=self.n_kv != self.n_heads)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        cache.write(at.pos, k, v)
        k, v = cache.k[:, :, :at.length], cache.v[:, :, :at.length]
        if t == 1 and nkv != nq:
            # Decode: the query heads sharing a KV head become that head's queries ([B, n_kv, group, D]), a
            # plain multi-head call every SDPA backend takes with a mask (with enable_gqa and a mask, CUDA
            # falls back to the math kernel, which copies K and V per query head).
            out = F.scaled_dot_product_attention(q.reshape(b, nkv, nq // nkv, hd), k, v, attn_mask=at.mask)
            return self.o_proj(out.reshape(b, t, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, is_causal=at.mask is None and t > 1,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DenseBlock(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.self_attn = GQAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, at, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), at, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseForCausalLM(CausalLM):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, interleaved=False)
        self.model = DecoderStack(cfg, [DenseBlock(cfg) for _ in range(cfg.num_hidden_layers)], rotary)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
