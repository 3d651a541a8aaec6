"""Weight-only quantization: kernels against the dequantized matmul (tight) and fp32 (loose), and
`quantize_model` on tiny dense and DeepSeek models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models import build_model, quant
from nanoseek.models.config import DeepseekConfig, DenseConfig
from nanoseek.models.quant import (Int4Linear, Int8GroupLinear, Int8Linear, dequantize_int4, quantize_int4,
                                   quantize_int8, quantize_int8_groups, quantize_model)


def _linear(n_out, n_in, bias=True, seed=0, std=0.02):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(std=std)
        if bias:
            lin.bias.normal_(std=0.1)
    return lin


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_matches_kernel_math(y, x, w_deq, bias):
    """The kernels multiply bf16-rounded x by the dequantized weight, accumulate in fp32 and round the result
    to bf16: so y must equal that computation to within one bf16 rounding of the output (2^-8 relative)."""
    ref = F.linear(x.to(torch.bfloat16).float(), w_deq.float(), None)
    if bias is not None:
        y = y - bias
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())


# ---- int8 ----------------------------------------------------------------------------------------------

def test_quantize_int8_rounds_to_nearest_step():
    w = _linear(64, 96, bias=False).weight.detach()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (w - q.float() * s[:, None]).abs().max() <= s.max() / 2 * (1 + 1e-5)
    assert torch.equal(q.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))  # each row spans the range


@pytest.mark.parametrize("shape", [(3, 96), (2, 5, 96)])
def test_int8_linear_matches_dequantized_matmul(shape):
    lin = _linear(80, 96)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(*shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 80) and y.dtype == torch.float32
    _assert_matches_kernel_math(y.reshape(-1, 80), x.reshape(-1, 96), m.dequantize(), lin.bias.detach())


def test_int8_linear_close_to_fp32():
    # Per-row step s = max|w|/127 ≈ 3σ/127 for Gaussian rows, rounding error rms s/√12 ≈ 0.007σ: ≈ 0.7%
    # relative output error, plus ≈ 0.3% from bf16 activations, scales and outputs. 2% leaves ~2× margin.
    lin = _linear(256, 384, bias=False)
    x = torch.randn(16, 384)
    assert _rel(Int8Linear.from_linear(lin)(x), lin(x)) < 0.02


def test_int8_fallback_path_agrees_with_kernel(monkeypatch):
    lin = _linear(48, 64)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(4, 64)
    y_kernel = m(x)
    monkeypatch.setattr(quant, "_use_kernel", lambda x: False)  # what a non-CPU device runs
    y_fallback = m(x)
    torch.testing.assert_close(y_fallback, F.linear(x, m.dequantize(), lin.bias))
    assert _rel(y_kernel, y_fallback) < 0.01  # the kernel only adds bf16 rounding of x and y


# ---- int4 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_int4_round_trip(group):
    w = _linear(32, 256, bias=False).weight.detach()
    q, sz = quantize_int4(w, group)
    assert sz.shape == (256 // group, 32, 2) and q.min() >= 0 and q.max() <= 15
    step = sz[..., 0].t().repeat_interleave(group, dim=1)
    assert ((w - dequantize_int4(q, sz, group)).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_codes_and_matmul(group):
    lin = _linear(96, 256, seed=group)
    m = Int4Linear.from_linear(lin, group)
    q, sz = quantize_int4(lin.weight, group)
    assert torch.equal(m.codes(), q)  # the private packed layout reads back to the same codes
    torch.testing.assert_close(m.scales_and_zeros, sz.to(torch.bfloat16))
    x = torch.randn(2, 3, 256)
    y = m(x)
    assert y.shape == (2, 3, 96)
    _assert_matches_kernel_math(y.reshape(-1, 96), x.reshape(-1, 256), m.dequantize(), lin.bias.detach())


@pytest.mark.parametrize("group,bound", [(32, 0.10), (64, 0.115), (128, 0.13)])
def test_int4_linear_close_to_fp32(group, bound):
    # 15 steps span each group's min..max, ≈ 4.0σ / 4.6σ / 5.2σ for 32 / 64 / 128 Gaussian values, so the
    # rounding error rms is range/15/√12 ≈ 7.7% / 8.9% / 10% of σ, which is the relative output error.
    # Measured here: 7.6% / 8.8% / 9.8%; the bounds leave ~30% margin.
    lin = _linear(256, 512, bias=False)
    x = torch.randn(16, 512)
    assert _rel(Int4Linear.from_linear(lin, group)(x), lin(x)) < bound


def _snap_to_q4_1(w: torch.Tensor) -> torch.Tensor:
    """w rounded onto a GGUF Q4_1 grid: per row and block of 32, min + d·q with d = (max - min)/15, d and
    min in fp16 as the file stores them."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    lo = g.amin(-1, keepdim=True).half().float()
    d = ((g.amax(-1, keepdim=True) - lo) / 15).half().float()
    return (lo + d * torch.round((g - lo) / d).clamp(0, 15)).reshape(n, k)


def test_int4_g32_reproduces_a_q4_1_grid():
    # The model's source weights are Q4_1: requantizing them at group 32 finds the same grid, so the codes
    # are the file's codes and only the bf16 rounding of scale/zero is lost.
    w = _snap_to_q4_1(torch.randn(64, 128) * 0.02)
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    m = Int4Linear.from_linear(lin, 32)
    assert _rel(m.dequantize(), w) < 0.01
    x = torch.randn(8, 128)
    assert _rel(m(x), lin(x)) < 0.01


# ---- int8 with group scales (two int4 planes) -----------------------------------------------------------

def test_quantize_int8_groups_scales_are_bf16_exact():
    w = _linear(32, 128, bias=False).weight.detach()
    c, s = quantize_int8_groups(w, 32)
    assert s.shape == (4, 32) and torch.equal(s, s.bfloat16().float())
    assert c.abs().max() <= 127
    step = s.t().repeat_interleave(32, dim=1)
    assert ((w - c * step).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("shape", [(3, 128), (2, 4, 128)])
def test_int8_group_linear_codes_and_matmul(shape):
    lin = _linear(64, 128)
    m = Int8GroupLinear.from_linear(lin, 32)
    c, s = quantize_int8_groups(lin.weight, 32)
    assert torch.equal(m.codes(), c)
    torch.testing.assert_close(m.dequantize(), c * s.t().repeat_interleave(32, dim=1))
    x = torch.randn(*shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 64)
    # Two bf16-rounded partial results are summed, so allow two output roundings.
    ref = F.linear(x.reshape(-1, 128).bfloat16().float(), m.dequantize())
    torch.testing.assert_close((y - lin.bias).reshape(-1, 64), ref, rtol=2 ** -6, atol=2e-3 * ref.abs().max().item())


def test_int8_group_linear_close_to_fp32_and_beats_per_row_int8():
    # Group amax of 32 Gaussians ≈ 2.1σ → step 2.1σ/127, error rms ≈ 0.5% of σ; bf16 x and outputs add
    # ≈ 0.3%. Per-row int8 (amax over 384 values, ≈ 3σ) is ≈ 0.8%.
    lin = _linear(256, 384, bias=False)
    x = torch.randn(16, 384)
    err_group = _rel(Int8GroupLinear.from_linear(lin, 32)(x), lin(x))
    assert err_group < 0.01
    assert err_group < _rel(Int8Linear.from_linear(lin)(x), lin(x))


def test_int8_group_fallback_path_agrees_with_kernel(monkeypatch):
    lin = _linear(48, 64)
    m = Int8GroupLinear.from_linear(lin, 32)
    x = torch.randn(4, 64)
    y_kernel = m(x)
    monkeypatch.setattr(quant, "_use_kernel", lambda x: False)
    assert _rel(y_kernel, m(x)) < 0.01


def test_int4_fallback_path_agrees_with_kernel(monkeypatch):
    lin = _linear(48, 64)
    m = Int4Linear.from_linear(lin, 32)
    x = torch.randn(4, 64)
    y_kernel = m(x)
    monkeypatch.setattr(quant, "_use_kernel", lambda x: False)
    y_fallback = m(x)
    torch.testing.assert_close(y_fallback, F.linear(x, m.dequantize(), lin.bias))
    assert _rel(y_kernel, y_fallback) < 0.01


@pytest.mark.parametrize("kind", ["int8", "int8-group", "int4"])
def test_float64_input_takes_the_exact_path(kind):
    lin = _linear(48, 64)
    m = quant.quantize_linear(lin, kind)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, m.dequantize(torch.float64), lin.bias.double()))
    assert _rel(y, m(x.float())) < 0.01  # and agrees with the bf16 kernel


def test_int4_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError):
        Int4Linear(96, 64, group_size=64)  # K % group
    with pytest.raises(ValueError):
        Int4Linear(64, 40, group_size=32)  # N % 16


# ---- whole models --------------------------------------------------------------------------------------

def _dense(tie=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128)
    cfg.update(kw)
    m = build_model(DenseConfig(**cfg)).eval()
    with torch.no_grad():  # larger than default init, so logits are far from uniform and top-1 means something
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.1)
    return m


def _compare(model, qmodel, ids):
    with torch.no_grad():
        ref, out = model(ids), qmodel(ids)
    cos = F.cosine_similarity(out, ref, dim=-1).min().item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return cos, top1


def test_quantize_model_int8_tied_head():
    model = _dense(tie=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    qmodel = copy.deepcopy(model)
    summary = quantize_model(qmodel, "int8")
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    assert len(summary.int8) == 2 * 7 + 1 and not summary.int4 and not summary.skipped
    assert isinstance(qmodel.lm_head, Int8Linear)
    # The embedding is untouched and still float; the head has its own quantized copy.
    assert isinstance(qmodel.model.embed_tokens.weight, nn.Parameter)
    assert torch.equal(qmodel.model.embed_tokens.weight, emb)
    assert summary.bytes_after < summary.bytes_before
    ids = torch.randint(0, 256, (2, 32))
    cos, top1 = _compare(model, qmodel, ids)
    assert cos > 0.99 and top1 >= 0.85, (cos, top1)


def test_quantize_model_int4_on_q4_1_weights():
    # On random weights int4 is far from fp32 (≈ 8% error per linear compounds); on weights that come from a
    # Q4_1 file, as SmolLM2's do, int4 at group 32 is close to lossless, which is what this checks.
    model = _dense(tie=False)
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.weight.copy_(_snap_to_q4_1(m.weight))
    ids = torch.randint(0, 256, (2, 32))
    for head in ("int4", None):  # None: the int8-group head int4 mode defaults to
        qmodel = copy.deepcopy(model)
        summary = quantize_model(qmodel, "int4", group_size=32, head=head)
        assert not any(type(m) is nn.Linear for m in qmodel.modules())
        assert len(summary.int4) == 2 * 7 + (head == "int4")
        assert isinstance(qmodel.lm_head, Int4Linear if head == "int4" else Int8GroupLinear)
        cos, top1 = _compare(model, qmodel, ids)
        assert cos > 0.99 and top1 >= 0.85, (head, cos, top1)


def test_quantize_model_float_head_stays_tied():
    model = _dense(tie=True)
    summary = quantize_model(model, "int4", head="none")
    assert summary.skipped == ["lm_head"] and len(summary.int4) == 2 * 7
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_quantize_model_int4_falls_back_to_int8_where_group_does_not_divide():
    model = _dense(hidden_size=96, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    qmodel = copy.deepcopy(model)
    summary = quantize_model(qmodel, "int4", group_size=64)
    # K = 96 (q/k/v, gate/up, the head; o_proj's 4 heads × 24 too) is not a multiple of 64 → int8;
    # down_proj (K = 256) → int4.
    kinds = {name: type(qmodel.get_submodule(name)).__name__ for name in summary.int4 + summary.int8}
    assert kinds["model.layers.0.mlp.down_proj"] == "Int4Linear"
    assert kinds["model.layers.0.mlp.gate_proj"] == "Int8Linear"
    assert kinds["lm_head"] == "Int8Linear"
    with torch.no_grad():
        assert qmodel(torch.randint(0, 256, (1, 8))).isfinite().all()


def test_quantize_model_int8_group():
    model = _dense(tie=True)
    qmodel = copy.deepcopy(model)
    summary = quantize_model(qmodel, "int8-group")
    assert len(summary.int8_group) == 2 * 7 + 1 and not summary.int8 and not summary.int4
    cos, top1 = _compare(model, qmodel, torch.randint(0, 256, (2, 32)))
    assert cos > 0.99 and top1 >= 0.85, (cos, top1)


def test_quantize_model_none_and_bad_mode():
    model = _dense()
    summary = quantize_model(model, "none")
    assert summary.bytes_after == summary.bytes_before and type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError):
        quantize_model(model, "int3")


def test_quantize_deepseek_keeps_kv_b_proj_float_and_absorbed_decode_works():
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_group=2,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    qmodel = copy.deepcopy(model)
    summary = quantize_model(qmodel, "int8")
    assert summary.skipped == ["model.layers.0.self_attn.kv_b_proj", "model.layers.1.self_attn.kv_b_proj"]
    for layer in qmodel.model.layers:
        assert type(layer.self_attn.kv_b_proj) is nn.Linear
    assert isinstance(qmodel.model.layers[1].mlp.shared_experts.down_proj, Int8Linear)
    assert isinstance(qmodel.model.layers[1].mlp.experts.gate_up_proj, nn.Parameter)  # routed experts stay float

    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = model(ids)
        for layer in qmodel.model.layers:
            layer.self_attn.mode = "absorb"
        cache = qmodel.new_cache(1, 16)
        steps = [qmodel(ids[:, :4], torch.arange(4)[None], cache)]
        steps += [qmodel(ids[:, t:t + 1], torch.full((1, 1), t), cache) for t in range(4, 12)]
    out = torch.cat(steps, dim=1)
    assert F.cosine_similarity(out, ref, dim=-1).min() > 0.99
