"""MLA's absorbed attention runs decode (and, on CPU, every short chunk) as one key head with every query
head stacked into its rows (models/mla.py `_one_head`); it must give what SDPA with enable_gqa gives, with
and without a mask, for one query and for several."""

import torch
import torch.nn.functional as F

from nanoseek.models.config import DeepseekConfig
from nanoseek.models.mla import MLA


def test_one_head_equals_gqa():
    torch.manual_seed(0)
    attn = MLA(DeepseekConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=8))
    b, h, c, n = 2, 4, 20, 37
    kv = torch.randn(b, n, c)
    k, v = kv.unsqueeze(1), kv[..., :16].unsqueeze(1)
    masks = [(1, None), (1, torch.rand(b, 1, 1, n) > 0.3), (3, torch.rand(b, 1, 3, n) > 0.3),
             (3, torch.ones(3, n, dtype=torch.bool).tril(n - 3))]
    for t, mask in masks:
        if mask is not None:
            mask[..., 0] = True  # every query sees a key, as Positions' causal masks guarantee
        q = torch.randn(b, h, t, c)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale, enable_gqa=True)
        got = attn._one_head(q, k, v, mask)
        assert got.shape == ref.shape == (b, h, t, 16)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
