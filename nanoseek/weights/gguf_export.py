"""GGUF files out: a nanoseek model + its tokenizer → one file llama.cpp, Ollama and LM Studio run.

Owns the writing side of the llama.cpp format (the reading side, and the layout rules both share, live in
gguf.py): tensor names from the `gguf` library's own name map, hyperparameters under llama.cpp's keys, the
BPE vocabulary with its pre-tokenizer name, special ids and chat template, and quantization.

- Architectures: `llama`, `qwen2` (dense) and DeepSeek-V3 as llama.cpp's `deepseek2`, with MLA in the layout
  llama.cpp's MLA path reads (kv_b_proj split into k_b, transposed, and v_b) and experts packed [E, ...].
  MTP modules are left out: llama.cpp's deepseek2 MTP graph is GLM-4's (one block, q_lora required) and its
  own DeepSeek converter skips MTP too; inference does not need them.
- Quantization: f16 / bf16 / q8_0 / q4_0 / q4_1 from `gguf.quants`; q4_k_m by llama.cpp's own quantizer
  (llama-cpp-python) applied to our f16 file. A tensor whose rows a block cannot hold falls back per tensor
  (reported). Norms, biases and the router stay f32, as llama.cpp's converter keeps them.
- The tokenizer's split rule must be one llama.cpp knows: the pre-tokenizer is matched against the ones
  `gguf.pre_tokenizer_for` builds, and the written vocabulary is re-read and must encode a probe text to the
  same ids as the source tokenizer; otherwise the export stops before anything is written.
- Atomic: the file is written under a hidden temp name beside OUT and renamed into place, so an interrupted
  export never leaves a half file under the final name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.models.config import (
    DeepseekConfig,
    DeepseekV4Config,
    DeepseekV32Config,
    DenseConfig,
    ModelConfig,
)
from nanoseek.weights.gguf import build_tokenizer, permute_rows, pre_tokenizer_for

QUANTS: dict[str, Q | None] = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
                               "q4_k_m": None}  # None: llama.cpp's quantizer, from an f16 file
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
# Probe for the tokenizer check: digits of every run length, spaces, newlines, contractions, unicode.
PROBE_TEXT = ("Hello world! It's 2024: 1234567 apples, 3.14159 pies.\n\n  Indented\tline  \n"
              "Ünïcödé — 東京タワー 🙂👍🏽 I'll we've DON'T x=y+1;  ")
# pre-tokenizer names we can recognise in a transformers tokenizer (each a llama.cpp pre-type)
_KNOWN_PRE = ("llama-bpe", "qwen2", "smollm", "gpt-2")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_FIM = {"pre": ("<｜fim▁begin｜>", "<fim_prefix>", "<|fim_prefix|>"),
        "suf": ("<｜fim▁hole｜>", "<fim_suffix>", "<|fim_suffix|>"),
        "mid": ("<｜fim▁end｜>", "<fim_middle>", "<|fim_middle|>"),
        "pad": ("<fim_pad>", "<|fim_pad|>"), "rep": ("<repo_name>", "<|repo_name|>"),
        "sep": ("<file_sep>", "<|file_sep|>")}


@dataclass(frozen=True)
class Fallback:
    """A tensor written in another type than the one asked for."""

    name: str
    wanted: str
    got: str
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {self.wanted} → {self.got} ({self.why})"


@dataclass
class ExportResult:
    path: Path
    quant: str
    n_tensors: int
    fallbacks: list[Fallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    modelfile: Path | None = None

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.quant}, {self.n_tensors} tensors, "
                 f"{self.path.stat().st_size / 2**20:.1f} MiB)"]
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} tensor(s) in another type:")
            groups: dict[tuple[str, str, str], list[str]] = {}
            for f in self.fallbacks:
                groups.setdefault((f.wanted, f.got, f.why), []).append(f.name)
            lines += [f"  {wanted} → {got} ({why}): {_names(names)}" for (wanted, got, why), names in groups.items()]
        lines += [f"note: {n}" for n in self.notes]
        if self.modelfile:
            lines.append(f"wrote {self.modelfile}")
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    """Tensor names with their layers folded: blk.{0-29}.attn_q.weight."""
    layers: dict[str, list[int]] = {}
    for n in names:
        m = re.match(r"blk\.(\d+)\.(.*)$", n)
        key = f"blk.{{}}.{m.group(2)}" if m else n
        layers.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for key, ids in layers.items():
        if "{}" not in key:
            out.append(key)
            continue
        ids = sorted(ids)
        if len(ids) == 1:
            out.append(key.format(ids[0]))
            continue
        run = ids == list(range(ids[0], ids[-1] + 1))
        out.append(key.format("{" + (f"{ids[0]}-{ids[-1]}" if run else ",".join(map(str, ids))) + "}"))
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------------------
# Entry points


def export_source(spec: str | os.PathLike, out: str | os.PathLike, *, quant: str = "f16",
                  tokenizer: str | None = None, ollama: bool = False) -> ExportResult:
    """Export what `spec` names: a training run or checkpoint directory, a Hugging Face directory, a .gguf
    file or a built-in model. The tokenizer is the checkpoint's own (or the run's recorded one) unless
    `tokenizer` names another; none at all is an error, raised before anything is written."""
    _check_quant(quant)
    model, tok, name = _load(spec, tokenizer)
    return export_gguf(model, tok, out, quant=quant, name=name, ollama=ollama)


def export_gguf(model: torch.nn.Module, tokenizer, out: str | os.PathLike, *, quant: str = "f16",
                name: str | None = None, ollama: bool = False) -> ExportResult:
    _check_quant(quant)
    out = Path(out)
    cfg: ModelConfig = model.config
    if tokenizer is None:
        raise BadInputError(f"{name or 'model'}: no tokenizer, so the GGUF file could not be used; pass "
                            f"--tokenizer DIR")
    arch = _arch(cfg)
    vocab = _vocab(tokenizer, cfg)  # every tokenizer check runs before a byte is written
    llama_cpp = _llama_cpp(quant) if QUANTS[quant] is None else None
    result = ExportResult(out, quant, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if QUANTS[quant] is None:
            f16 = out.with_name(f".{out.name}.f16-{os.getpid()}")
            try:
                _write(model, cfg, arch, vocab, f16, "f16", name, result)
                _llama_quantize(llama_cpp, f16, tmp, quant, result)
            finally:
                f16.unlink(missing_ok=True)
        else:
            _write(model, cfg, arch, vocab, tmp, quant, name, result)
        os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise
    if ollama:
        from nanoseek.weights.ollama import write_modelfile

        result.modelfile = write_modelfile(out, tokenizer, cfg.max_position_embeddings)
    return result


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise BadInputError(f"--quant {quant!r} (choose from {', '.join(QUANTS)})")


def _load(spec, tokenizer: str | None):
    """(model in fp32, tokenizer or None, display name)."""
    from nanoseek.train.tokenizer import load_tokenizer

    path = Path(spec).expanduser()
    if (path / "final" / "config.json").is_file():
        # a fine-tuning run (sft, LoRA, grpo, distill): its product is final/, LoRA adapters merged
        spec = path = path / "final"
    is_run = path.is_dir() and ((path / "meta.json").is_file() or (path / "checkpoints").is_dir())
    if is_run:
        from nanoseek.train.checkpoint import load_model as load_checkpoint

        model, _, meta = load_checkpoint(path, torch.float32)
        _arch(model.config)  # an architecture llama.cpp cannot run is the first thing to say
        tok_spec = tokenizer or meta.get("tokenizer")
        if not tok_spec:
            raise BadInputError(f"{path}: the checkpoint records no tokenizer, so its GGUF file could not be "
                                f"used; pass --tokenizer DIR")
        return model, load_tokenizer(tok_spec), path.resolve().name
    from nanoseek.weights.registry import load_model

    loaded = load_model(spec)
    tok = load_tokenizer(tokenizer) if tokenizer else loaded.tokenizer
    if tok is None:
        raise BadInputError(f"{loaded.path}: no tokenizer files, so its GGUF file could not be used; pass "
                            f"--tokenizer DIR")
    return loaded.model, tok, loaded.name.removesuffix(".gguf")


def _arch(cfg: ModelConfig) -> gguf.MODEL_ARCH:
    if isinstance(cfg, (DeepseekV32Config, DeepseekV4Config)):
        # V3.2 would load as deepseek2 with its lightning indexer dropped: a different (dense) model
        kind = "deepseek_v32" if isinstance(cfg, DeepseekV32Config) else "deepseek_v4"
        raise UnsupportedError(f"architecture {kind!r} has no llama.cpp equivalent (its sparse/compressed attention "
                               f"is not in llama.cpp); GGUF export supports llama, qwen2, deepseek_v3")
    if isinstance(cfg, DeepseekConfig):
        if cfg.scoring_func == "softmax" and cfg.n_group > 1:
            # llama.cpp ranks groups by their two best scores (V3's rule); V2's softmax ranks by the best one
            raise UnsupportedError("DeepSeek-V2 softmax routing with expert groups: llama.cpp's deepseek2 ranks "
                                   "groups differently, so it cannot run this model")
        return gguf.MODEL_ARCH.DEEPSEEK2
    if isinstance(cfg, DenseConfig) and cfg.arch in ("llama", "qwen2"):
        return gguf.MODEL_ARCH.LLAMA if cfg.arch == "llama" else gguf.MODEL_ARCH.QWEN2
    raise UnsupportedError(f"architecture {getattr(cfg, 'arch', type(cfg).__name__)!r} has no llama.cpp "
                           f"equivalent (GGUF export supports llama, qwen2, deepseek_v3)")


# ---------------------------------------------------------------------------------------------------------
# The file


def _write(model, cfg: ModelConfig, arch: gguf.MODEL_ARCH, vocab: dict[str, Any], path: Path, quant: str,
           name: str | None, result: ExportResult) -> None:
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        w.add_name(name or "nanoseek model")
        w.add_description("exported by nanoseek")
        w.add_file_type(_FILE_TYPE[quant])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, cfg)
        for key, value in vocab.items():
            _add(w, key, value)
        n = 0
        for gname, t in _tensors(model, cfg, arch, result):
            data, qtype = _encode(gname, t, quant, cfg, result)
            w.add_tensor(gname, data, raw_dtype=qtype)
            n += 1
        result.n_tensors = n
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _add(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def _hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_freq_base(cfg.rope.theta)
    if isinstance(cfg, DenseConfig):
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        # llama.cpp runs MLA as MQA over the latent: one kv head of kv_lora + rope (values: kv_lora)
        w.add_head_count_kv(1)
        w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a single q projection (llama.cpp requires the key)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
    r = cfg.rope
    if r.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(r.factor)
    elif r.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings or cfg.max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
        if isinstance(cfg, DeepseekConfig) and r.mscale_all_dim:
            if r.mscale not in (None, r.mscale_all_dim):
                raise UnsupportedError(f"YaRN mscale {r.mscale} ≠ mscale_all_dim {r.mscale_all_dim}: llama.cpp's "
                                       f"deepseek2 has one factor for both")
            w.add_rope_scaling_yarn_log_mul(0.1 * r.mscale_all_dim)  # llama.cpp divides the 0.1 back out
    elif r.rope_type not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise UnsupportedError(f"rope type {r.rope_type!r} in a GGUF export")


# ---- tensors ----------------------------------------------------------------------------------------------


def _tensors(model, cfg: ModelConfig, arch: gguf.MODEL_ARCH, result: ExportResult):
    """(llama.cpp name, float32 tensor in torch order) for every weight, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp ties the head by leaving output.weight out
    if any(k.startswith("mtp.") for k in state):
        result.notes.append("MTP modules left out: llama.cpp's deepseek2 does not run DeepSeek's MTP "
                            "(its converter skips them too); inference does not need them")
    if cfg.rope.rope_type == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_factors(cfg)
    for key, t in state.items():
        if key.startswith("mtp."):
            continue
        t = t.detach().float()
        for hf, piece in _hf_pieces(key, t, cfg):
            gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedError(f"tensor {key!r} has no llama.cpp name for {gguf.MODEL_ARCH_NAMES[arch]}")
            yield gname, piece


def _hf_pieces(key: str, t: torch.Tensor, cfg: ModelConfig):
    """Our tensor as the transformers-named piece(s) llama.cpp wants, in its row order."""
    if isinstance(cfg, DenseConfig):
        if cfg.arch == "llama" and re.search(r"\.self_attn\.[qk]_proj\.(weight|bias)$", key):
            heads = cfg.num_attention_heads if ".q_proj." in key else cfg.num_key_value_heads
            t = permute_rows(t, heads)  # ggml's llama rope turns adjacent pairs
        yield key, t
        return
    h, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if key.endswith("experts.gate_up_proj"):  # [E, 2I, H], gate rows first; llama.cpp packs [E, ...] too
        gate, up = t.chunk(2, dim=1)
        yield key.replace("gate_up_proj", "gate_proj.weight"), gate
        yield key.replace("gate_up_proj", "up_proj.weight"), up
    elif key.endswith("experts.down_proj"):
        yield key + ".weight", t
    elif key.endswith("e_score_correction_bias"):
        yield key.replace("e_score_correction_bias", "e_score_correction.bias"), t
    elif key.endswith("kv_b_proj.weight"):
        kv = t.view(h, nope + v, cfg.kv_lora_rank)
        yield key.replace("kv_b_proj", "k_b_proj"), kv[:, :nope].transpose(1, 2).contiguous()
        yield key.replace("kv_b_proj", "v_b_proj"), kv[:, nope:].contiguous()
    elif not cfg.rope_interleave and re.search(r"self_attn\.(q_proj|q_b_proj)\.weight$", key):
        # rotate-half rope rows → the adjacent pairs of ggml's NORM rope, per head, rope part only
        q = t.view(h, nope + rope, -1).clone()
        q[:, nope:] = permute_rows(q[:, nope:].reshape(h * rope, -1), h).view(h, rope, -1)
        yield key, q.view_as(t)
    elif not cfg.rope_interleave and key.endswith("kv_a_proj_with_mqa.weight"):
        kv = t.clone()
        kv[cfg.kv_lora_rank:] = permute_rows(kv[cfg.kv_lora_rank:], 1)
        yield key, kv
    else:
        yield key, t


def _llama3_factors(cfg: DenseConfig) -> torch.Tensor:
    """Llama 3.1 rope scaling as llama.cpp reads it: a per-frequency divisor tensor (what its converter writes)."""
    r, dim = cfg.rope, cfg.head_dim
    inv = 1.0 / r.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * torch.pi / inv
    orig = r.original_max_position_embeddings or 8192
    smooth = ((orig / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)).clamp(0, 1)
    return (1.0 / ((1 - smooth) / r.factor + smooth)).float()


def _encode(name: str, t: torch.Tensor, quant: str, cfg: ModelConfig, result: ExportResult
            ) -> tuple[np.ndarray, Q]:
    """The bytes for one tensor and their ggml type, falling back per tensor where the type cannot hold it."""
    arr = t.numpy()
    keep_f32 = (arr.ndim <= 1 or name.startswith("rope_freqs")
                or ".ffn_gate_inp." in name)  # the router: llama.cpp keeps it f32 (routing flips are costly)
    if keep_f32:
        return arr.astype(np.float32), Q.F32
    want = QUANTS[quant] or Q.F16
    head = name == "output.weight" or (name == "token_embd.weight" and cfg.tie_word_embeddings)
    if head and want in (Q.Q4_0, Q.Q4_1):
        # llama.cpp's quantize also keeps the output head above 4 bits: it decides every next token
        result.fallbacks.append(Fallback(name, want.name, "Q8_0", "output head"))
        want = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    if arr.shape[-1] % block:
        why = f"rows of {arr.shape[-1]} do not fill blocks of {block}"
        result.fallbacks.append(Fallback(name, want.name, "F16", why))
        want = Q.F16
    if want == Q.F16:
        return arr.astype(np.float16), Q.F16
    return gguf.quants.quantize(arr, want), want


def _llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError as e:
        raise UnsupportedError(f"--quant {quant} needs llama.cpp's quantizer: pip install 'nanoseek[bench]' "
                               f"(llama-cpp-python; import failed: {e})") from None
    return llama_cpp


def _llama_quantize(llama_cpp, src: Path, dst: Path, quant: str, result: ExportResult) -> None:
    """K-quants: gguf 0.19 cannot make them, so llama.cpp's own quantizer runs on our f16 file."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_FILE_TYPE[quant])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise BadInputError(f"llama.cpp's quantizer failed on {src.name} (return code {rc})")
    from nanoseek.weights.gguf import GGUFFile

    with GGUFFile(src) as g:
        kept_f32 = {n for n, info in g.tensors.items() if info.qtype == Q.F32}  # ours on purpose (router, ...)
    with GGUFFile(dst) as g:  # llama.cpp falls back by itself (rows not divisible by 256); say where it did
        for n, info in g.tensors.items():
            if len(info.shape) >= 2 and info.qtype not in (Q.Q4_K, Q.Q6_K) and n not in kept_f32:
                why = (f"rows of {info.shape[-1]} do not fill blocks of 256" if info.shape[-1] % 256
                       else "llama.cpp's choice")
                result.fallbacks.append(Fallback(n, "Q4_K", info.qtype.name, why))


# ---- tokenizer --------------------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer) -> str:
    """The llama.cpp `tokenizer.ggml.pre` that splits text as this transformers tokenizer does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedError(f"{type(tokenizer).__name__}: GGUF export needs a fast (tokenizers) BPE tokenizer")
    ours = _signature(json.loads(backend.to_str()).get("pre_tokenizer"))
    for name in _KNOWN_PRE:
        if ours == _signature(json.loads(_pre_json(name))):
            return name
    raise UnsupportedError(f"the tokenizer's pre-tokenizer {json.dumps(ours)[:200]} matches no llama.cpp "
                           f"pre-type ({', '.join(_KNOWN_PRE)}); a GGUF would tokenize differently. Retrain it "
                           f"with `nanoseek tokenizer train` (now llama-bpe)")


def _pre_json(name: str) -> str:
    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer_for(name)
    return json.dumps(json.loads(tk.to_str())["pre_tokenizer"])


def _signature(pre: Any) -> Any:
    """What decides the split: drop offset-only settings (trim_offsets) that tokenizers serialize too."""
    if isinstance(pre, dict):
        return {k: _signature(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_signature(v) for v in pre]
    return pre


def _looks_control(token: str) -> bool:
    # llama.cpp's converter rule: chat markup like <|im_start|> / <｜User｜> is control even when the
    # tokenizer does not flag it special
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _vocab(tokenizer, cfg: ModelConfig) -> dict[str, Any]:
    """tokenizer.* metadata, checked: it is re-read the way llama.cpp reads it and must encode a probe text
    to the same ids as the source tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not any(t.get("type") == "ByteLevel" for t in _walk(spec.get("decoder"))):
        raise UnsupportedError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    pre = pre_tokenizer_name(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= cfg.vocab_size:
        raise BadInputError(f"the tokenizer has id {max(by_id)} but the model's vocabulary is {cfg.vocab_size}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        tok = by_id.get(i)
        if tok is None:  # embedding rows the tokenizer never produces (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(_TOKEN_CONTROL if added[i].get("special") or _looks_control(tok) else _TOKEN_USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(_TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id,
           "unknown": tokenizer.unk_token_id}
    eos_all = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if ids["eos"] is None:
        ids["eos"] = eos_all[0]
    # end of turn: a second stop id of the model (SmolLM2's <|im_end|> beside <|endoftext|>), else eos itself
    ids["eot"] = next((e for e in eos_all if e is not None and e != ids["eos"]), ids["eos"])
    vocab = tokenizer.get_vocab()
    for kind, names in _FIM.items():
        ids[f"fim_{kind}"] = next((vocab[n] for n in names if n in vocab), None)
    for kind, i in ids.items():
        if i is not None:
            meta[f"tokenizer.ggml.{kind}_token_id"] = int(i)
    from nanoseek.train.tokenizer import bos_to_prepend

    meta["tokenizer.ggml.add_bos_token"] = bos_to_prepend(tokenizer) is not None
    meta["tokenizer.ggml.add_eos_token"] = False
    if getattr(tokenizer, "chat_template", None):
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    _check_round_trip(meta, tokenizer)
    return meta


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _check_round_trip(meta: dict[str, Any], tokenizer) -> None:
    """Rebuild the tokenizer from the metadata (our model of llama.cpp's reading) and compare encodings."""
    again = build_tokenizer(SimpleNamespace(metadata=meta, path=Path("<export>")))
    want = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    got = again.encode(PROBE_TEXT, add_special_tokens=False)
    if want != got:
        raise UnsupportedError(f"the exported vocabulary tokenizes differently from the source tokenizer "
                               f"(pre-tokenizer {meta['tokenizer.ggml.pre']!r}): {want[:12]} vs {got[:12]}")
