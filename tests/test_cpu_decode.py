"""The fused native decode step (models/cpu_decode.py) against a PyTorch model doing the same arithmetic:
identical quantized weights, activations rounded to int16 per group of 32, everything else fp32. Skipped on
CPUs without AVX-512 VNNI (or without g++)."""

import pytest
import torch
from torch import nn

from nanoseek.engine.step import ModelRunner
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.models.cpu_decode import CpuDecoder, attach, cpu_supported
from nanoseek.models.quant import quantize_int4, quantize_int8_groups, quantize_model

pytestmark = pytest.mark.skipif(not cpu_supported(), reason="needs AVX-512 VNNI and g++")


class _RefLinear(nn.Module):
    """What the kernel computes for one matrix, in float64 from the same codes and bf16 scales:
    y = Σ_g s·d_g·(u_g · q_g) + (z - off·s)·Σ_{k∈g} x_k, with q = round(x·32767/max|x_g|) in fp32."""

    def __init__(self, lin: nn.Linear, bits: int):
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        if bits == 4:
            q, sz = quantize_int4(w, 32)
            s, z, u, off = sz[..., 0].t(), sz[..., 1].t(), q, 8.0
        else:
            c, s = quantize_int8_groups(w, 32)
            s, u, off = s.t(), c + 128, 128.0
            z = torch.zeros_like(s)
        s, z = s.bfloat16().double(), z.bfloat16().double()
        self.u, self.s, self.m = u.double().reshape(n, k // 32, 32), s, z - off * s
        self.bias = None if lin.bias is None else lin.bias.detach().double()

    def forward(self, x):
        xg = x.float().reshape(-1, self.u.shape[1], 32)
        amax = xg.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
        q = torch.round(xg * inv).double()
        d = (amax / 32767.0).double()
        y = torch.einsum("ngk,tgk->tng", self.u, q * d) * self.s + self.m * xg.double().sum(-1)[:, None, :]
        y = y.sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y.float().reshape(*x.shape[:-1], -1)


def _model(arch: str) -> nn.Module:
    cfg = DenseConfig(arch=arch, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=arch == "qwen2",
                      tie_word_embeddings=arch == "llama")
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _reference(model: nn.Module, quant: str) -> nn.Module:
    """A copy of the float `model` whose linears compute as the kernel does (the head always 8-bit)."""
    ref = build_model(model.config).eval()
    ref.load_state_dict(model.state_dict())
    bits = 4 if quant == "int4" else 8
    for name, mod in list(ref.named_modules()):
        for attr, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, attr, _RefLinear(child, 8 if attr == "lm_head" else bits))
    return ref


@pytest.mark.parametrize("arch,quant", [("llama", "int4"), ("qwen2", "int4"), ("llama", "int8-group")])
@torch.inference_mode()
def test_native_step_matches_its_arithmetic_in_pytorch(arch, quant):
    model = _model(arch)
    ref = _reference(model, quant)
    model.fuse()  # fused qkv / gate_up must pack to the same rows as the separate linears
    dec = CpuDecoder(model, quant)
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    errors = []  # relative to the largest value: logits and each layer's K and V, at each step
    for t in range(9, 17):  # each step from the same (reference-written) cache
        want_cache, got_cache = ref.new_cache(1, 40), ref.new_cache(1, 40)
        for c in (want_cache, got_cache):
            ref(ids[:, :t], torch.arange(t)[None], c)
        want = ref(ids[:, t:t + 1], torch.tensor([[t]]), want_cache)[:, -1]
        got = dec.step(int(ids[0, t]), t, got_cache.rows(0, 1))
        errors.append(((got - want).abs().max() / want.abs().max()).item())
        for w, g in zip(want_cache.layers, got_cache.layers):  # the K/V it wrote at t
            for want_kv, got_kv in ((w.k[:, :, t], g.k[:, :, t]), (w.v[:, :, t], g.v[:, :, t])):
                errors.append(((got_kv - want_kv).abs().max() / want_kv.abs().max()).item())
    # Summation order differs (fp32), so an activation that sits on a rounding boundary to int16 can round the
    # other way in one of them (~0.4% of the logits' range measured); otherwise they agree to ~1e-6.
    assert max(errors) < 1e-2, errors
    assert sorted(errors)[len(errors) * 3 // 4] < 1e-4, errors


@torch.inference_mode()
def test_runner_takes_native_step_for_one_row_only():
    model = _model("llama")
    model.fuse()
    assert attach(model, "int4") is None
    assert attach(_model("llama"), "none") is not None  # float models never get one
    quantize_model(model, "int4")
    runner = ModelRunner(model)
    cache = model.new_cache(2, 32)
    runner.prefill([5, 6, 7], 0, cache.rows(0, 1))
    calls = []
    step = model.cpu_decoder.step
    model.cpu_decoder.step = lambda *a: calls.append(a) or step(*a)
    one = runner.decode([8], [3], cache.rows(0, 1))
    assert len(calls) == 1 and one.shape == (1, 256)
    # The PyTorch int4 path agrees with it closely (they differ only in how activations are rounded).
    runner.decode([8, 9], [3, 0], cache.rows(0, 2))
    assert len(calls) == 1
    torch_one = model(torch.tensor([[8]]), torch.tensor([[3]]), cache.rows(0, 1))[:, -1]
    assert (one - torch_one).abs().max() < 0.05 * torch_one.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.inference_mode()
def test_native_verify_equals_sequential_steps(arch):
    """verify(T tokens) = T calls of step on a copy of the cache: the same logits, greedy picks and K/V."""
    model = _model(arch)
    model.fuse()
    dec = CpuDecoder(model, "int4")
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = model.new_cache(1, 32)
    for p in range(9):  # a prompt written by single steps
        dec.step(ids[p], p, cache.rows(0, 1))
    for n in (1, 2, 5, 8):
        want_cache, got_cache = model.new_cache(1, 32), model.new_cache(1, 32)
        for c in (want_cache, got_cache):
            for w, src in zip(c.layers, cache.layers):
                w.k.copy_(src.k), w.v.copy_(src.v)
        chunk = ids[9:9 + n]
        want = torch.cat([dec.step(tok, 9 + i, want_cache.rows(0, 1)) for i, tok in enumerate(chunk)])
        got = dec.verify(chunk, 9, got_cache.rows(0, 1))
        assert got.shape == (n, 256)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        for w, g in zip(want_cache.layers, got_cache.layers):
            torch.testing.assert_close(g.k, w.k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g.v, w.v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        dec.verify(ids[:9], 9, cache.rows(0, 1))  # more than MAX_CHUNK tokens


@torch.inference_mode()
def test_runner_verify_takes_native_chunk_for_one_row_only():
    model = _model("llama")
    model.fuse()
    assert attach(model, "int4") is None
    quantize_model(model, "int4")
    runner = ModelRunner(model)
    cache = model.new_cache(2, 32)
    for r in range(2):
        runner.prefill([5, 6, 7], 0, cache.rows(r, 1))
    calls = []
    verify = model.cpu_decoder.verify
    model.cpu_decoder.verify = lambda *a: calls.append(a) or verify(*a)
    one = runner.verify(torch.tensor([[8, 9, 10]]), torch.tensor([[3, 4, 5]]), cache.rows(0, 1))
    assert len(calls) == 1 and calls[0][:2] == ([8, 9, 10], 3) and one.shape == (1, 3, 256)
    runner.verify(torch.tensor([[8, 9], [8, 9]]), torch.tensor([[3, 4], [3, 4]]), cache.rows(0, 2))
    runner.verify(torch.tensor([[8, 9]]), torch.tensor([[3, 5]]), cache.rows(1, 1))  # not consecutive
    assert len(calls) == 1
    # The PyTorch int4 path on the same tokens agrees closely (only the activations' rounding differs).
    torch_one = model(torch.tensor([[8, 9, 10]]), torch.tensor([[3, 4, 5]]), cache.rows(0, 1))
    assert (one - torch_one).abs().max() < 0.05 * torch_one.abs().max()
