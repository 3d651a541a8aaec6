"""MLA's absorbed attention on CPU runs as plain matmuls (models/mla.py `_latent_matmuls`); it must give what
SDPA gives (the path kept for CUDA), with and without a mask, for decode and short chunks."""

import torch
import torch.nn.functional as F

from nanoseek.models.config import DeepseekConfig
from nanoseek.models.mla import MLA


def _cfg() -> DeepseekConfig:
    return DeepseekConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def test_latent_matmuls_equal_sdpa():
    torch.manual_seed(0)
    attn = MLA(_cfg())
    b, h, c, n = 2, 4, 20, 37
    kv = torch.randn(b, n, c)
    for t, mask in ((1, None), (3, torch.rand(b, 1, 3, n) > 0.3)):
        if mask is not None:
            mask[..., 0] = True  # every query sees a key, as Positions' causal masks guarantee
        q = torch.randn(b, h, t, c)
        ref = F.scaled_dot_product_attention(q, kv.unsqueeze(1), kv[..., :16].unsqueeze(1), attn_mask=mask,
                                             scale=attn.scale, enable_gqa=True)
        got = attn._latent_matmuls(q, kv, mask)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
