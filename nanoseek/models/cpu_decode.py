"""Fused batch-1 CPU decode for dense (Llama / Qwen2) models: one native call per token.

Owns `CpuDecoder` (quantized copies of a dense model's weights in the layout of cpu_decode.cpp; `step`,
which runs one token of one row through the model in a single OpenMP parallel region, and `verify`, which runs
up to MAX_CHUNK consecutive tokens of one row the same way, reading each weight once for all of them: a
speculative verify at batch 1), `supported` (whether
this machine and model can use it) and the build of that kernel (g++ into a per-user cache, loaded with ctypes).

Why a native step: at batch 1 on a 2-core CPU, SmolLM2-135M's PyTorch int4 decode makes ~400 op calls per
token: 122 int4 matmuls (71% of the step in torch.profiler, each a separate OpenMP fork/join on bf16 copies of
its input), 30 attention calls (15%) and the glue between them, and trailed llama.cpp on the same GGUF
(0.72-0.76x). Here the token is one call and one parallel region (1.64x llama.cpp with int8 activations, about
1.5x with the int16 ones kept: benchmarks/results/decode-cpu-2026-12-06-1131.md). cpu_decode.cpp's header describes the kernel and its number format.

Numerics: weights use the same grid as `quant.Int4Linear` / `quant.Int8GroupLinear` (same codes, the same
bf16 scales and zeros), so the weights multiplied are identical to the PyTorch quantized path; activations are
rounded to int16 per group of 32 instead of to bf16 (int8, as llama.cpp rounds them, cost SmolLM2 20 points of
top-1 agreement with fp32; int16 agrees 99.2% against the PyTorch int4 path's 97.9%, teacher-forced, 384
tokens). So the logits differ slightly from the PyTorch quantized path's (tests/test_cpu_decode.py checks the
kernel against the same arithmetic written in PyTorch); a float model without quantization never takes this path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from nanoseek.machine import cpu_flags
from nanoseek.models.quant import quantize_int4, quantize_int8_groups

GROUP = 32
MAX_CHUNK = 8  # most tokens one call runs (cpu_decode.cpp's MAX_CHUNK): the fed token and up to 7 drafts
_SRC = Path(__file__).with_name("cpu_decode.cpp")
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512vnni", "-mfma"]
_NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
_I64 = ctypes.c_int64
_P = ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("codes", _P), ("bias", _P), ("n", _I64), ("k", _I64), ("bits", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("qkv", _Lin), ("o", _Lin), ("gate_up", _Lin), ("down", _Lin)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _I64), ("hidden", _I64), ("n_heads", _I64), ("n_kv", _I64), ("head_dim", _I64),
                ("inter", _I64), ("eps", ctypes.c_float), ("embed", _P), ("final_norm", _P), ("layers", _P),
                ("head", _Lin)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _P), ("n_tokens", _I64), ("pos", _I64), ("cos", _P), ("sin", _P), ("k_cache", _P), ("v_cache", _P),
                ("head_stride", _I64), ("pos_stride", _I64), ("logits", _P), ("work", _P), ("threads", _I64)]


def cpu_supported() -> bool:
    """An x86-64 CPU with AVX-512 VNNI, Linux, and a C++ compiler to build the kernel with."""
    return (platform.machine() == "x86_64" and shutil.which(os.environ.get("CXX", "g++")) is not None
            and all(f in cpu_flags() for f in _NEEDED_CPU_FLAGS))


def _library() -> ctypes.CDLL:
    """Compile cpu_decode.cpp once per source version into ~/.cache/nanoseek (a few seconds), then load it.
    torch is imported first, so the kernel's OpenMP calls bind to the libgomp torch already loaded and share
    its thread pool instead of starting a second one."""
    src = _SRC.read_bytes()
    cxx = os.environ.get("CXX", "g++")
    tag = hashlib.sha256(src + " ".join([cxx, *_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoseek" / "kernels"
    so = cache / f"cpu_decode-{tag}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / so.name
            subprocess.run([cxx, *_FLAGS, str(_SRC), "-o", str(out)], check=True, capture_output=True)
            os.replace(out, so)  # atomic: a concurrent build of the same source just wins or loses the rename
    lib = ctypes.CDLL(str(so))
    lib.decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step)]
    lib.decode_step.restype = ctypes.c_int
    lib.scratch_floats.argtypes = [ctypes.POINTER(_Model)]
    lib.scratch_floats.restype = _I64
    return lib


class _Packed:
    """One quantized matrix in the kernel's layout (see cpu_decode.cpp, `gemv_blocks`): rows padded to a
    multiple of 4, then per block of 4 rows and per 64 columns one record of codes, bf16 scales and (4-bit)
    bf16 zeros. Holds the tensors the `_Lin` struct points into."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, bits: int):
        n, k = w.shape
        pad = -n % 4
        w = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
        nb, chunks = (n + pad) // 4, k // 64
        if bits == 4:
            q, sz = quantize_int4(w, GROUP)  # identical to Int4Linear: same codes, bf16 scales and zeros
            s, z = sz[..., 0].t(), sz[..., 1].t()
            q = q.to(torch.uint8).reshape(nb, 4, chunks, 2, 32)
            codes = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(nb, chunks, 128)
            parts = [codes, self._per_chunk(s, nb, chunks), self._per_chunk(z, nb, chunks)]
        else:
            c, s = quantize_int8_groups(w, GROUP)  # identical to Int8GroupLinear
            codes = (c + 128).to(torch.uint8).reshape(nb, 4, chunks, 64).permute(0, 2, 1, 3).reshape(nb, chunks, 256)
            parts = [codes, self._per_chunk(s.t(), nb, chunks)]
        self.codes = torch.cat(parts, dim=-1).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.struct = _Lin(self.codes.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(), n, k, bits)

    @staticmethod
    def _per_chunk(v: torch.Tensor, nb: int, chunks: int) -> torch.Tensor:
        """[rows, groups] → bf16 bytes [blocks, chunks, 16]: per record, [row][its 2 groups]."""
        b = v.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(nb, 4, chunks, 2 * 2)
        return b.permute(0, 2, 1, 3).reshape(nb, chunks, 16)


def _weight(lin: nn.Module) -> torch.Tensor:
    if type(lin) is not nn.Linear:
        raise TypeError(f"CpuDecoder packs float nn.Linear weights (pack before quantize_model), got {type(lin)}")
    return lin.weight.detach().float()


def supported(model: nn.Module, quant: str) -> str | None:
    """None if `model` can decode through CpuDecoder with weights quantized as `quant`, else the reason."""
    from nanoseek.models.dense import DenseForCausalLM

    if quant not in ("int4", "int8-group"):
        return f"quantization {quant!r} (only int4 and int8-group)"
    if not isinstance(model, DenseForCausalLM):
        return f"{type(model).__name__} is not a dense Llama/Qwen2 model"
    p = model.model.embed_tokens.weight
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"weights on {p.device} in {p.dtype} (needs float32 on CPU)"
    cfg = model.config
    if cfg.hidden_size % 64 or cfg.intermediate_size % 64 or (cfg.num_attention_heads * cfg.head_dim) % 64 \
            or cfg.head_dim % 16:
        return "hidden/intermediate/attention widths not multiples of 64 (or head_dim of 16)"
    if not cpu_supported():
        return "this CPU lacks AVX-512 VNNI or no C++ compiler is installed"
    return None


class CpuDecoder:
    """Batch-1 decode of a dense model through cpu_decode.cpp. Build it from the float (optionally fused)
    model *before* `quantize_model` replaces the linears; it keeps its own quantized copy of every matrix and
    reads the embedding, norms and rotary tables from the model."""

    max_chunk = MAX_CHUNK  # most tokens `verify` takes

    def __init__(self, model: nn.Module, quant: str = "int4"):
        why = supported(model, quant)
        if why:
            raise ValueError(f"CpuDecoder: {why}")
        self.lib = _library()
        self.rotary = model.model.rotary  # not the model itself: no reference cycle through model.cpu_decoder
        cfg = model.config
        bits = 4 if quant == "int4" else 8
        self._keep: list = []

        def pack(*lins: nn.Module, bits: int = bits) -> _Lin:
            w = torch.cat([_weight(lin) for lin in lins])
            biases = [lin.bias for lin in lins]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach().float() if b is not None else w.new_zeros(lin.out_features) for b, lin in zip(biases, lins)])
            p = _Packed(w, bias, bits)
            self._keep.append(p)
            return p.struct

        def linears(mod: nn.Module, fused: str, parts: tuple[str, ...]) -> tuple[nn.Module, ...]:
            return (getattr(mod, fused),) if hasattr(mod, fused) else tuple(getattr(mod, n) for n in parts)

        layers = []
        for blk in model.model.layers:
            att, mlp = blk.self_attn, blk.mlp
            layers.append(_Layer(
                self._ptr(blk.input_layernorm.weight), self._ptr(blk.post_attention_layernorm.weight),
                pack(*linears(att, "qkv_proj", ("q_proj", "k_proj", "v_proj"))), pack(att.o_proj),
                pack(*linears(mlp, "gate_up_proj", ("gate_proj", "up_proj"))), pack(mlp.down_proj)))
        self._layers = (_Layer * len(layers))(*layers)
        # The head as quantize_model makes it: int8 groups for int4 models (see quantize_model's `head`).
        head = pack(model.lm_head, bits=8)
        self._m = _Model(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, self._ptr(model.model.embed_tokens.weight),
                         self._ptr(model.model.norm.weight), ctypes.addressof(self._layers), head)
        self.vocab = model.lm_head.out_features
        self.work = torch.empty(MAX_CHUNK * self.lib.scratch_floats(ctypes.byref(self._m)))
        self._cache_key = None

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _cache_arrays(self, rows) -> tuple:
        """Pointer arrays to every layer's K and V for row 0; rebuilt only when the cache was reallocated."""
        k0 = rows.layers[0].k
        key = (k0.data_ptr(), rows.layers[-1].k.data_ptr(), k0.stride(), rows.layers[-1].v.data_ptr())
        if key != self._cache_key:
            for layer in rows.layers:
                if layer.k.dtype != torch.float32 or layer.k.stride() != k0.stride() or layer.k.stride(-1) != 1:
                    raise ValueError("CpuDecoder needs float32 K/V caches of one layout")
            arr = ctypes.c_void_p * len(rows.layers)
            self._ks = arr(*[layer.k.data_ptr() for layer in rows.layers])
            self._vs = arr(*[layer.v.data_ptr() for layer in rows.layers])
            self._cache_key = key
        return self._ks, self._vs, k0.stride(1), k0.stride(2)

    def accepts(self, rows) -> bool:
        """A one-row view of a cache of K/V layers (what dense models allocate)."""
        return rows.batch == 1 and hasattr(rows.layers[0], "k")

    @torch.inference_mode()
    def step(self, token: int, pos: int, rows) -> torch.Tensor:
        """Write the token at `pos` of the one-row cache view `rows`; its logits [1, V]."""
        return self._run([token], pos, rows)

    @torch.inference_mode()
    def verify(self, tokens: list[int], start: int, rows) -> torch.Tensor:
        """Run up to MAX_CHUNK consecutive tokens of one row at positions start, start + 1, ... in one call,
        each attending to the cache before `start` and to the chunk's tokens up to itself, and write their K/V
        into `rows` as that many `step` calls would; their logits [T, V] (per token the same arithmetic as
        `step`, but every weight is read once for the whole chunk)."""
        if not 1 <= len(tokens) <= MAX_CHUNK:
            raise ValueError(f"CpuDecoder.verify takes 1 to {MAX_CHUNK} tokens, got {len(tokens)}")
        return self._run(tokens, start, rows)

    def _run(self, tokens: list[int], pos: int, rows) -> torch.Tensor:
        rot, n = self.rotary, len(tokens)
        if pos + n > rows.layers[0].k.shape[2]:
            raise ValueError(f"positions up to {pos + n - 1} do not fit the cache ({rows.layers[0].k.shape[2]})")
        if pos + n > rot.cos.shape[0]:
            rot.tables(torch.tensor([pos + n - 1]), torch.float32, pos + n)  # grows the tables
        ks, vs, head_stride, pos_stride = self._cache_arrays(rows)
        ids = (ctypes.c_int64 * n)(*tokens)
        logits = torch.empty(n, self.vocab)
        # cos/sin rows pos .. pos + n - 1 are consecutive: the tables are contiguous [positions, head_dim/2].
        st = _Step(ctypes.addressof(ids), n, pos, rot.cos[pos].data_ptr(), rot.sin[pos].data_ptr(),
                   ctypes.addressof(ks), ctypes.addressof(vs), head_stride, pos_stride, logits.data_ptr(),
                   self.work.data_ptr(), torch.get_num_threads())
        self.lib.decode_step(ctypes.byref(self._m), ctypes.byref(st))
        return logits


def attach(model: nn.Module, quant: str) -> str | None:
    """Give `model` a CpuDecoder (as `model.cpu_decoder`, which `engine.step.ModelRunner.decode` and `verify`
    use for single-row steps) if it and this machine support one; call on the float model before `quantize_model`.
    Returns None when attached, else why not. Inference only: the decoder keeps its own copy of the
    quantized weights, so a model whose weights change afterwards (training) must not have one."""
    why = supported(model, quant)
    if why is None:
        try:
            model.cpu_decoder = CpuDecoder(model, quant)
        except (OSError, subprocess.CalledProcessError) as e:  # no working compiler after all
            why = f"the kernel did not build: {e}"
    return why
