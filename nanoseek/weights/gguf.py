"""GGUF files in: llama.cpp metadata → a transformers config, GGUF tensors → transformers names, and the
vocabulary → a `PreTrainedTokenizerFast`. Handles the `llama`, `qwen2` and `deepseek2` (DeepSeek-V2/V3, MLA +
MoE, as llama.cpp lays it out: split k_b/v_b, packed experts) architectures. Also owns the llama.cpp layout
rules the exporter (gguf_export.py) inverts: q/k row order and the `tokenizer.ggml.pre` split regexes.

The header is parsed here, once, by `GGUFFile`: `gguf.GGUFReader` builds a numpy view for every string of a
string array, which costs ~3 s for a 49k vocabulary plus merges, and transformers' GGUF path reads the file
several times over. The `gguf` package still supplies the ggml type table and the dequantizers.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from nanoseek.errors import BadInputError, NanoseekError, NotFoundError, UnsupportedError
from nanoseek.models.config import ModelConfig, config_from_hf
from nanoseek.weights.hf import assemble, save_hf, to_nanoseek_names

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # llama.cpp's, used unless `general.alignment` says otherwise

# GGUF metadata value types: fixed-width scalars by struct code; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores dimensions fastest-first, i.e. reversed)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF header (metadata dict + tensor table) over a read-only memory map of the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise NotFoundError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise BadInputError(f"{self.path}: is a directory, expected a .gguf file")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap refuses empty files
            raise BadInputError(f"{self.path}: empty file, not a GGUF file") from None
        except OSError as e:
            raise BadInputError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            try:
                self.metadata, self.tensors = self._parse()
            except (struct.error, OverflowError, MemoryError, IndexError) as e:
                raise BadInputError(f"{self.path}: truncated or corrupt GGUF header ({e})") from None
            except UnicodeDecodeError:
                raise BadInputError(f"{self.path}: corrupt GGUF header (a string is not valid UTF-8)") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a tensor view is still alive; the map closes when it is collected
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    # ---- header -------------------------------------------------------------------------------------------
    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        buf, size = self._map, len(self._map)
        if buf[:4] != GGUF_MAGIC:
            raise BadInputError(f"{self.path}: not a GGUF file (bad magic bytes {bytes(buf[:4])!r})")
        version = _U32.unpack_from(buf, 4)[0]
        if version & 0xFFFF == 0 and version:
            raise UnsupportedError(f"{self.path}: big-endian GGUF files")
        if version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        # Every entry takes at least 8 bytes, so a count beyond that is garbage, not a huge model.
        if n_tensors > size // 8 or n_kv > size // 8:
            raise BadInputError(f"{self.path}: corrupt GGUF header (claims {n_tensors} tensors, {n_kv} keys)")
        pos, meta = 24, {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            vtype = _U32.unpack_from(buf, pos)[0]
            meta[key], pos = self._value(pos + 4, vtype, key)

        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            ndim = _U32.unpack_from(buf, pos)[0]
            if ndim > 8:
                raise BadInputError(f"{self.path}: corrupt tensor table ({name!r} has {ndim} dimensions)")
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            infos.append((name, tuple(reversed(dims)), qtype, offset))

        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise BadInputError(f"{self.path}: general.alignment={align!r} is not a power of two")
        data_start = -(-pos // align) * align
        tensors: dict[str, TensorInfo] = {}
        for name, shape, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has ggml type id {raw_type}, "
                                       f"unknown to gguf") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape and shape[-1] % block:
                raise BadInputError(f"{self.path}: tensor {name!r} rows of {shape[-1]} do not fill "
                                    f"{qtype.name} blocks of {block}")
            nbytes = math.prod(shape) // block * type_size
            start = data_start + offset
            if start + nbytes > size:
                raise BadInputError(f"{self.path}: truncated: tensor {name!r} needs bytes up to {start + nbytes} "
                                    f"but the file has {size}")
            if name in tensors:
                raise BadInputError(f"{self.path}: tensor {name!r} appears twice")
            tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
        return meta, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        n = _U64.unpack_from(self._map, pos)[0]
        end = pos + 8 + n
        if end > len(self._map):
            raise struct.error(f"string at byte {pos} runs past the end of the file")
        return self._map[pos + 8:end].decode("utf-8"), end

    def _value(self, pos: int, vtype: int, key: str) -> tuple[Any, int]:
        buf = self._map
        if vtype in _SCALARS:
            fmt = "<" + _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise BadInputError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALARS:
            width = struct.calcsize(_SCALARS[etype])
            if pos + count * width > len(buf):
                raise struct.error(f"array {key!r} runs past the end of the file")
            arr = np.frombuffer(buf, dtype=np.dtype("<" + _SCALARS[etype]), count=count, offset=pos)
            return arr.tolist(), pos + count * width
        if etype == _STRING:
            if count > len(buf) // 8:
                raise struct.error(f"array {key!r} claims {count} strings")
            # The vocabulary and merges live here: one tight loop over bytes slices, ~50 ms for 100k strings.
            out: list[str] = []
            append, unpack = out.append, _U64.unpack_from
            for _ in range(count):
                n = unpack(buf, pos)[0]
                pos += 8
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
            if pos > len(buf):
                raise struct.error(f"array {key!r} runs past the end of the file")
            return out, pos
        if etype == _ARRAY:  # each element is itself (element type, count, values)
            out = []
            for _ in range(count):
                v, pos = self._value(pos, _ARRAY, key)
                out.append(v)
            return out, pos
        raise BadInputError(f"{self.path}: metadata {key!r} is an array of unknown type {etype}")

    # ---- tensors ------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """Dequantized float32 tensor in torch order."""
        info = self.tensors[name]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        q = info.qtype
        if q == GGMLQuantizationType.F32:
            arr = raw.view(np.float32).reshape(info.shape).copy()  # copy: the map is read-only
        elif q == GGMLQuantizationType.F16:
            arr = raw.view(np.float16).reshape(info.shape).astype(np.float32)
        else:
            block, type_size = GGML_QUANT_SIZES[q]
            byte_shape = (*info.shape[:-1], info.shape[-1] // block * type_size)
            try:
                arr = gguf_dequantize(raw.reshape(byte_shape), q)
            except NotImplementedError:
                raise UnsupportedError(f"{self.path}: tensor {name!r} is stored as {q.name}, which gguf cannot "
                                       f"dequantize") from None
            arr = np.asarray(arr, dtype=np.float32).reshape(info.shape)
        return torch.from_numpy(arr)


# ---- config -----------------------------------------------------------------------------------------------
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek2": "DeepseekV3ForCausalLM"}
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func (gguf.ExpertGatingFuncType)


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The transformers config.json dict this GGUF's metadata describes."""
    arch = g.architecture
    if arch is None:
        raise BadInputError(f"{g.path}: GGUF metadata has no general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{g.path}: GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    meta = g.metadata

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is ...:
            raise BadInputError(f"{g.path}: metadata is missing {arch}.{key}")
        if isinstance(value, list):  # per-layer values (llama.cpp allows them); we need them uniform
            if len(set(value)) != 1:
                raise UnsupportedError(f"{g.path}: {arch}.{key} differs between layers")
            value = value[0]
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", None) or hidden // heads
    rot = get("rope.dimension_count", None)
    if arch != "deepseek2" and rot is not None and rot != head_dim:
        raise UnsupportedError(f"{g.path}: partial rotary embeddings (rope dims {rot} of head dim {head_dim})")
    if "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    else:
        vocab = get("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")  # chat models end turns with EOT; stop on either
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": get("context_length", 4096),
        "rope_parameters": _rope(g, get),
        # llama.cpp ties the head by simply not writing output.weight
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [eos, eot] if eot is not None and eos is not None and eot != eos else eos,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if arch == "llama":
        d["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        d["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    if arch == "deepseek2":
        d.update(_deepseek2(g, get, heads, rot))
    return d


def _deepseek2(g: GGUFFile, get, heads: int, rot: int | None) -> dict[str, Any]:
    """MLA and MoE hyperparameters. llama.cpp stores MLA as MQA over the latent (key_length = kv_lora + rope,
    head_count_kv = 1); the per-head sizes live in the *_mla keys (files older than the k_b/v_b split kept
    them in key_length/value_length)."""
    if rot is None:
        raise BadInputError(f"{g.path}: metadata is missing deepseek2.rope.dimension_count")
    kv_lora = get("attention.kv_lora_rank")
    qk = get("attention.key_length_mla", None)
    v = get("attention.value_length_mla", None)
    if qk is None or v is None:
        qk, v = get("attention.key_length"), get("attention.value_length")
    gating = get("expert_gating_func", 1)  # llama.cpp's default for files without it: V2's softmax
    if gating not in _GATING:
        raise UnsupportedError(f"{g.path}: deepseek2.expert_gating_func={gating} (supported: 1 softmax, 2 sigmoid)")
    if get("expert_count", 0) == 0:
        raise UnsupportedError(f"{g.path}: a deepseek2 file without routed experts")
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_key_value_heads": heads, "head_dim": None,
        "q_lora_rank": get("attention.q_lora_rank", 0) or None, "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": qk - rot, "qk_rope_head_dim": rot, "v_head_dim": v,
        # ggml's NORM rope turns adjacent pairs: DeepSeek's own (interleaved) weight layout
        "rope_interleave": True,
        "moe_intermediate_size": get("expert_feed_forward_length"),
        "n_routed_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
        "n_shared_experts": get("expert_shared_count", 0),
        "n_group": get("expert_group_count", 0) or 1, "topk_group": get("expert_group_used_count", 0) or 1,
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", False)), "scoring_func": _GATING[gating],
        "first_k_dense_replace": get("leading_dense_block_count", 0),
        "num_nextn_predict_layers": 0,
    }


def _rope(g: GGUFFile, get) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    kind = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None) or get("rope.scale_linear", None)
    if kind is None and factor not in (None, 1.0):
        kind = "linear"  # older files wrote only rope.scale_linear
    if kind in ("linear", "yarn") and not factor:
        raise BadInputError(f"{g.path}: rope scaling type {kind!r} without a rope.scaling.factor")
    if kind == "linear":
        rope.update(rope_type="linear", factor=float(factor))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=float(factor),
                    original_max_position_embeddings=get("rope.scaling.original_context_length", None))
        for ours, theirs in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")):
            if get(theirs, None) is not None:
                rope[ours] = float(get(theirs))
        if g.architecture == "deepseek2" and get("rope.scaling.yarn_log_multiplier", None) is not None:
            # convert_hf_to_gguf writes 0.1·mscale_all_dim here (llama.cpp divides the 0.1 back out)
            rope["mscale_all_dim"] = rope["mscale"] = float(get("rope.scaling.yarn_log_multiplier")) / 0.1
    elif kind not in (None, "none"):
        raise UnsupportedError(f"{g.path}: rope scaling type {kind!r} (supported: linear, yarn, llama3)")
    if "rope_freqs.weight" in g.tensors:
        rope.update(_llama3_rope(g, rope["rope_theta"]))
    return rope


def _llama3_rope(g: GGUFFile, theta: float) -> dict[str, Any]:
    """Llama 3.1+ files carry their rope scaling as a per-frequency divisor tensor, not as metadata.

    Every released Llama 3.x uses low/high frequency factors 1 and 4 over an 8192-token original context;
    only `factor` varies (8 for 3.1, 32 for 3.2), and it is the tensor's largest entry. Rebuild those
    parameters and check they reproduce the tensor exactly, rather than trust a guess."""
    divisors = g.tensor("rope_freqs.weight").double()
    dim = 2 * divisors.numel()
    factor, low, high, orig = float(divisors.max()), 1.0, 4.0, 8192
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv
    smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)
    expect = 1.0 / ((1 - smooth) / factor + smooth)
    if not torch.allclose(divisors, expect, rtol=1e-4, atol=1e-4):
        raise UnsupportedError(f"{g.path}: rope_freqs.weight does not match Llama-3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}


# ---- tensors ----------------------------------------------------------------------------------------------
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # deepseek2 (MLA, MoE)
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate.e_score_correction",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# Packed [E, ...] expert tensors: yielded per expert (transformers' names), which to_nanoseek_names re-packs.
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_SKIP = {"rope_freqs.weight"}  # folded into the config by _llama3_rope


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a llama.cpp tensor name, or None when there is none."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        if parts[2] == "exp_probs_b":  # transformers: a buffer named ..._bias, not a .bias
            return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}_{kind}"
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{kind}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order for the `llama` architecture.

    transformers rotates the two halves of each head (`rotate_half`); ggml's rope rotates adjacent pairs.
    So llama.cpp's converter interleaves each head's halves, rows [a0..a{d/2-1}, b0..] → [a0, b0, a1, b1, ...].
    Viewing each head as (d/2, 2) and transposing to (2, d/2) puts the halves back."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `unpermute_rows`: transformers' rotate-half row order → ggml's adjacent pairs."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensors(g: GGUFFile, hf: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(transformers name, float32 tensor, file) for every weight, dequantized one at a time."""
    permute = g.architecture == "llama"
    halves: dict[str, dict[str, torch.Tensor]] = {}  # deepseek2 k_b / v_b, joined back into kv_b
    for name in g.tensors:
        if name in _SKIP:
            continue
        stem, _, kind = name.rpartition(".")
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _EXPERTS and kind == "weight":
            for e, w in enumerate(g.tensor(name)):
                yield f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERTS[parts[2]]}.weight", w, g.path
            continue
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in ("attn_k_b", "attn_v_b") and kind == "weight":
            pair = halves.setdefault(parts[1], {})
            pair[parts[2]] = g.tensor(name)
            if len(pair) == 2:
                del halves[parts[1]]
                yield f"model.layers.{parts[1]}.self_attn.kv_b_proj.weight", _join_kv_b(**pair), g.path
            continue
        target = hf_name(name)
        if target is None:
            raise BadInputError(f"{g.path}: unexpected tensor {name!r} for GGUF architecture {g.architecture!r}")
        t = g.tensor(name)
        if permute and ".attn_q." in name:
            t = unpermute_rows(t, hf["num_attention_heads"])
        elif permute and ".attn_k." in name:
            t = unpermute_rows(t, hf["num_key_value_heads"])
        yield target, t, g.path
    if halves:
        layer, pair = next(iter(halves.items()))
        raise BadInputError(f"{g.path}: blk.{layer} has {next(iter(pair))}.weight without its other half")


def _join_kv_b(attn_k_b: torch.Tensor, attn_v_b: torch.Tensor) -> torch.Tensor:
    """llama.cpp's k_b [H, kv_lora, nope] (stored transposed for the absorbed product) and v_b [H, v, kv_lora]
    → transformers' kv_b_proj [H·(nope + v), kv_lora]."""
    kv_lora = attn_v_b.shape[-1]
    return torch.cat([attn_k_b.transpose(1, 2), attn_v_b], dim=1).reshape(-1, kv_lora)


def _count_weights(g: GGUFFile) -> int:
    """How many (transformers-named) tensors hf_tensors yields: for the progress bar."""
    n = 0
    for name, info in g.tensors.items():
        stem = name.rpartition(".")[0]
        if name in _SKIP or stem.endswith(".attn_v_b"):
            continue
        n += info.shape[0] if stem.rpartition(".")[2] in _EXPERTS else 1
    return n


# ---- tokenizer --------------------------------------------------------------------------------------------
# llama.cpp's `tokenizer.ggml.pre` names the split regex the vocabulary was trained with. These are the
# families we know; anything else gets GPT-2's regex (the ByteLevel default), as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
# Pre-tokenizers that isolate every digit before the GPT-2 regex (llama.cpp's SMOLLM/STARCODER group).
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_CONTROL, _USER_DEFINED = 3, 4


def pre_tokenizer_for(pre: str):
    """The `tokenizers` pre-tokenizer that splits text as llama.cpp does for `tokenizer.ggml.pre` = `pre`
    (GPT-2's byte-level regex for names outside the families above, as transformers does)."""
    from tokenizers import Regex, pre_tokenizers

    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable-character table: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(g: GGUFFile):
    """A PreTrainedTokenizerFast for the vocabulary in this file's metadata (None if it has none)."""
    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        return _transformers_tokenizer(g)
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    byte_char = _byte_alphabet()
    alphabet = set(byte_char.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind_) in enumerate(zip(tokens, types)):
        # Normal byte-level tokens are already spelled in the byte alphabet; control / user-defined ones are
        # matched as raw text (added tokens), so they keep their spelling. A stray normal token outside
        # the alphabet is respelled byte by byte so BPE can still reach it.
        if kind_ not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(byte_char[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise BadInputError(f"{g.path}: inconsistent tokenizer vocabulary/merges ({e})") from None
    tk.pre_tokenizer = pre_tokenizer_for(meta.get("tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    added = [AddedToken(tok, special=t == _CONTROL, normalized=False)
             for tok, t in zip(tokens, types) if t in (_CONTROL, _USER_DEFINED)]
    tk.add_tokens(added)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kw = {k: v for k, v in (("bos_token", token("bos")), ("eos_token", token("eos")), ("unk_token", token("unknown")),
                            ("pad_token", token("padding"))) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=meta.get("tokenizer.chat_template"),
                                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                                   add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                                   clean_up_tokenization_spaces=False, **kw)


def _transformers_tokenizer(g: GGUFFile):
    """Sentencepiece-style vocabularies (tokenizer.ggml.model "llama", "t5", ...): transformers' converter
    already rebuilds these (normalizer, byte fallback, merges from scores); use it rather than redo it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
    except Exception as e:  # transformers raises ValueError/KeyError/... for vocabularies it cannot build
        raise UnsupportedError(f"{g.path}: cannot build a tokenizer for tokenizer.ggml.model="
                               f"{g.metadata.get('tokenizer.ggml.model')!r} ({type(e).__name__}: {e})") from None


# ---- public API -------------------------------------------------------------------------------------------
def gguf_tokenizer(path: str | os.PathLike):
    with GGUFFile(path) as g:
        tok = build_tokenizer(g)
    if tok is None:
        raise NotFoundError(f"{g.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is missing)")
    return tok


def block_weight_bits(path: str | os.PathLike) -> float:
    """Storage bits per weight of the file's transformer-block matrices (the smallest, e.g. Q4_1 → 5.0):
    tells callers how much precision a re-quantization for fast decode can drop without losing anything."""
    from gguf import GGML_QUANT_SIZES

    with GGUFFile(path) as g:
        bits = [GGML_QUANT_SIZES[t.qtype][1] * 8 / GGML_QUANT_SIZES[t.qtype][0]
                for n, t in g.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    return min(bits) if bits else 32.0


def load_gguf(path: str | os.PathLike, dtype=torch.float32, device="cpu"
              ) -> tuple[torch.nn.Module, ModelConfig, Any]:
    """Model (dequantized to `dtype` on `device`), its config, and its tokenizer (None if the file has none)."""
    with GGUFFile(path) as g:
        hf = hf_config(g)
        try:
            cfg = config_from_hf(hf)
            named = hf_tensors(g, hf)
            total = _count_weights(g)
            model = assemble(cfg, to_nanoseek_names(cfg, named), dtype=dtype, device=device, total=total,
                             desc=f"loading {g.path.name}")
        except NanoseekError as e:
            if str(g.path) in str(e):
                raise
            raise type(e)(f"{g.path}: {e}") from None
        return model, cfg, build_tokenizer(g)


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Convert a GGUF file to a Hugging Face directory (config.json, safetensors, tokenizer files)."""
    model, _, tok = load_gguf(path, dtype=dtype)
    return save_hf(model, out_dir, tokenizer=tok)
