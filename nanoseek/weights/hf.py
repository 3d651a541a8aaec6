"""Hugging Face checkpoints in and out: safetensors directories (sharded or not) + config.json.

Loading builds the model on the meta device and assigns tensors one at a time as they are read, so peak
RAM stays near the model's size. Names are transformers'; the only translations are the expert layout
(per-expert files ↔ packed [E, …] parameters), MTP modules (model.layers.{N+k} ↔ mtp.{k}) and FP8
block-quantized weights (dequantized with their `weight_scale_inv`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, DeepseekV4Config, ModelConfig, config_from_hf, config_to_hf
from nanoseek.models.layers import Rotary
from nanoseek.progress import progress_bar

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.embed_tokens\.weight$|shared_head\.head\.weight$)")
FP8_BLOCK = 128


def read_config(path: Path) -> tuple[dict, ModelConfig]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise NotFoundError(f"{cfg_file}: no config.json in the checkpoint directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{cfg_file}: not valid JSON ({e})") from None
    return raw, config_from_hf(raw)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise BadInputError(f"{index}: malformed shard index ({e})") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise NotFoundError(f"{index}: lists shards that are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"{path}: no *.safetensors files")
    return files


def _block_scales(keys: list[str]) -> dict[str, str]:
    """{FP8 weight name: its block-scale tensor's name} among one file's tensor names."""
    scales = {k[: -len("_scale_inv")]: k for k in keys if k.endswith("weight_scale_inv")}
    # DeepSeek's own checkpoints (V4) name the block scale of `x.weight` `x.scale`
    scales.update({k[: -len("scale")] + "weight": k for k in keys
                   if k.endswith(".scale") and k[: -len("scale")] + "weight" in keys})
    return scales


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                scales = _block_scales(keys)
                skip = set(scales.values())
                for k in keys:
                    if k in skip:
                        continue
                    t = st.get_tensor(k)
                    if k in scales:
                        t = dequantize_fp8_blocks(t, st.get_tensor(scales[k]))
                    yield k, t, f
        except SafetensorError as e:
            raise BadInputError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise BadInputError(f"{f}: cannot read ({e})") from None


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's FP8 weights carry one fp32 scale per 128x128 block (V3 §3.3.1)."""
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return w.float() * s[: w.shape[0], : w.shape[1]]


def to_nanoseek_names(cfg: ModelConfig, named: Iterable[tuple[str, torch.Tensor, object]]
                      ) -> Iterator[tuple[str, torch.Tensor, object]]:
    """Translate transformers names (either expert layout) to ours, packing per-expert tensors."""
    if isinstance(cfg, DeepseekV4Config):
        yield from v4_to_nanoseek_names(cfg, named)
        return
    n_layers = cfg.num_hidden_layers
    pending: dict[str, dict] = {}
    n_experts = cfg.n_routed_experts if isinstance(cfg, DeepseekConfig) else 0
    for name, t, src in named:
        if _IGNORED.search(name) and not name.startswith("model.embed_tokens"):
            continue
        m = _EXPERT.match(name)
        if m:
            packed = _pack_experts(pending, m.group(1), int(m.group(2)), m.group(3), t, n_experts,
                                   ("gate", "up", "down"))
            if packed is not None:
                yield from (_rename(f"{m.group(1)}.gate_up_proj", n_layers, packed[0], src),
                            _rename(f"{m.group(1)}.down_proj", n_layers, packed[1], src))
            continue
        yield _rename(name, n_layers, t, src)
    _all_packed(pending, n_experts)


def _pack_experts(pending: dict[str, dict], prefix: str, j: int, kind: str, t: torch.Tensor, n: int,
                  names: tuple[str, str, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Collect expert j's `kind` tensor of the experts at `prefix`; once all 3·n have arrived, our packed
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]), else None. `names`: the checkpoint's gate, up, down."""
    slot = pending.setdefault(prefix, {})
    slot[(j, kind)] = t
    if len(slot) != 3 * n:
        return None
    del pending[prefix]
    gate, up, down = names
    return (torch.stack([torch.cat([slot[(e, gate)], slot[(e, up)]]) for e in range(n)]),
            torch.stack([slot[(e, down)] for e in range(n)]))


def _all_packed(pending: dict[str, dict], n: int) -> None:
    """After the last tensor: refuse experts left incomplete by _pack_experts."""
    if pending:
        prefix = next(iter(pending))
        raise BadInputError(f"{prefix}: only {len(pending[prefix])} of {3 * n} expert tensors present")


def _rename(name: str, n_layers: int, t: torch.Tensor, src) -> tuple[str, torch.Tensor, object]:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= n_layers:
        return f"mtp.{int(m.group(1)) - n_layers}.{m.group(2)}", t, src
    return name, t, src


def assemble(cfg: ModelConfig, named: Iterable[tuple[str, torch.Tensor, object]], *, dtype=torch.float32,
             device="cpu", total: int | None = None, desc: str = "loading") -> torch.nn.Module:
    """Build a model for `cfg` and fill it from (nanoseek name, tensor, source) triples.

    Every parameter must arrive exactly once with the shape the config implies; otherwise a BadInputError
    names the source file and the tensor."""
    with torch.device("meta"):
        model = build_model(cfg)
    expected = dict(model.state_dict(keep_vars=True))
    if getattr(cfg, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    seen: set[str] = set()
    with progress_bar(desc, total) as advance:
        for name, t, src in named:
            advance()
            if name not in expected:
                if isinstance(cfg, DeepseekConfig) and name.startswith("mtp.") and not cfg.num_nextn_predict_layers:
                    continue  # MTP weights present but the config does not ask for MTP: inference skips them
                raise BadInputError(f"{src}: unexpected tensor {name!r} for this {type(cfg).__name__}")
            want = expected[name]
            if tuple(t.shape) != tuple(want.shape):
                raise BadInputError(f"{src}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                                    f"{tuple(want.shape)}")
            # fp32 as in the reference: the router's selection bias, and DSA's index-head weights (they scale
            # every index score, and near-equal scores must rank the same); integer buffers (V4's tid2eid hash
            # table) keep their dtype
            keep_fp32 = name.endswith(("e_score_correction_bias", "indexer.weights_proj.weight"))
            t = t.to(device=device, dtype=(torch.float32 if keep_fp32 else dtype) if t.is_floating_point() else None)
            _assign(model, name, t)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise BadInputError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.tie_weights()
    _rebuild_rotary(model, device)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def _rebuild_rotary(model: torch.nn.Module, device) -> None:
    """Non-persistent rotary tables were created on meta; compute them for real (every table: V4 has two)."""
    with torch.device(device):
        for rot in model.modules():
            if isinstance(rot, Rotary):
                rot._build(rot.max_positions)


def load_hf(path: str | os.PathLike, dtype=torch.float32, device="cpu") -> tuple[torch.nn.Module, ModelConfig]:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or directory")
    raw, cfg = read_config(path)
    if isinstance(cfg, DeepseekV4Config):
        refuse_fp4_experts(raw)
    files = safetensors_files(path)
    total, names = _scan(files)
    if isinstance(cfg, DeepseekConfig) and cfg.num_nextn_predict_layers:
        # transformers writes the MTP depth into config.json but no MTP weights: keep only what exists.
        cfg.num_nextn_predict_layers = sum(
            1 for k in range(cfg.num_nextn_predict_layers)
            if f"model.layers.{cfg.num_hidden_layers + k}.eh_proj.weight" in names)
    model = assemble(cfg, to_nanoseek_names(cfg, iter_safetensors(files)), dtype=dtype, device=device,
                     total=total, desc=f"loading {path.name}")
    return model, cfg


def _scan(files: list[Path]) -> tuple[int, set[str]]:
    """Tensor count (for the progress bar) and names, reading headers only."""
    try:
        names: set[str] = set()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                skip = set(_block_scales(keys).values())  # what iter_safetensors folds into its weight
                names.update(k for k in keys if k not in skip)
        return len(names), names
    except SafetensorError as e:
        raise BadInputError(f"corrupt or truncated safetensors file among {[str(f) for f in files]} ({e})") from None


def to_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict in the per-expert layout transformers' save_pretrained writes (and the hub uses)."""
    cfg = model.config
    v4 = isinstance(cfg, DeepseekV4Config)
    gate, up, down = _V4_EXPERT_LEAVES if v4 else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if v4:
            name = _v4_hub_name(name)
        elif name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            name = f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e, w in enumerate(t):
                g, u = w.chunk(2, dim=0)
                # clones: safetensors refuses tensors that share storage
                out[f"{prefix}.{e}.{gate}.weight"] = g.clone()
                out[f"{prefix}.{e}.{up}.weight"] = u.clone()
            continue
        if name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.{down}.weight"] = w.clone()
            continue
        out[name] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_hf(model: torch.nn.Module, path: str | os.PathLike, tokenizer=None,
            max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json + safetensors (sharded past `max_shard_bytes`) atomically: a temp dir, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = to_hf_state(model)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if size and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = config_to_hf(model.config)
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        hf["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- DeepSeek-V4 names -------------------------------------------------------------------------------------
# DeepSeek's checkpoint names (which transformers' save_pretrained also writes for V4) → ours. Ours are
# transformers' in-memory names, except that the indexer is `self_attn.indexer` (its compressor `.comp`).
_V4_LAYER_RENAMES = [
    (r"^attn\.attn_sink$", "self_attn.sinks"),
    (r"^attn\.indexer\.compressor\.", "self_attn.indexer.comp."),
    (r"^attn\.indexer\.wq_b\.", "self_attn.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "self_attn.indexer.weights_proj."),
    (r"^attn\.", "self_attn."),
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^ffn\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^ffn\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^ffn\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
    (r"^ffn\.", "mlp."),
    (r"^hc_(attn|ffn)_(fn|base|scale)$", r"\1_hc.\2"),
]
_V4_LEAF_RENAMES = {"wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv": "kv_proj", "wgate": "gate_proj", "wo_a": "o_a_proj",
                    "wo_b": "o_b_proj", "q_norm": "q_a_norm", "norm": "kv_norm", "ape": "position_bias"}
_V4_TOP = {"embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
           "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
           "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
           "hc_head_scale": "model.hc_head.hc_scale", "hc_head.hc_fn": "model.hc_head.hc_fn",
           "hc_head.hc_base": "model.hc_head.hc_base", "hc_head.hc_scale": "model.hc_head.hc_scale"}
_V4_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_V4_EXPERT_LEAVES = ("w1", "w3", "w2")  # DeepSeek's per-expert gate, up, down
_FP4_DTYPES = {torch.int8, torch.uint8} | ({torch.float4_e2m1fn_x2} if hasattr(torch, "float4_e2m1fn_x2") else set())


def refuse_fp4_experts(raw: dict) -> None:
    """V4 ships its routed experts as FP4 (e2m1 pairs packed in a byte, a ue8m0 scale per 32 values); not loaded."""
    q = raw.get("quantization_config") or {}
    dt = raw.get("expert_dtype") or (q.get("expert_dtype") if isinstance(q, dict) else None)
    if dt is not None and "fp4" in str(dt).lower():
        raise UnsupportedError(f"quantization_config.expert_dtype={dt!r}: FP4-packed experts (ue8m0 scales) are not "
                               "supported; use a bf16 or FP8 checkpoint")


def _v4_local(name: str) -> str:
    """One name inside a layer (`attn.wq_a.weight`) → ours (`self_attn.q_a_proj.weight`)."""
    for pat, rep in _V4_LAYER_RENAMES:
        new = re.sub(pat, rep, name)
        if new != name:
            name = new
            break
    parts = name.split(".")
    if parts[0] == "self_attn":
        parts = [_V4_LEAF_RENAMES.get(p, p) for p in parts]
    return ".".join(parts)


def v4_to_nanoseek_names(cfg: DeepseekV4Config, named):
    pending: dict[str, dict] = {}
    e = cfg.n_routed_experts
    for name, t, src in named:
        bare = name.removeprefix("model.")
        if bare.startswith("mtp.") or bare.startswith("layers.") and int(bare.split(".")[1]) >= cfg.num_hidden_layers:
            continue  # MTP modules: not built (transformers skips them too)
        if bare in _V4_TOP:
            yield _V4_TOP[bare], t, src
            continue
        m = re.match(r"^layers\.(\d+)\.(.*)$", bare)
        if not m:
            yield name, t, src  # assemble() names it as unexpected
            continue
        full = f"model.layers.{m.group(1)}.{_v4_local(m.group(2))}"
        x = _V4_EXPERT.match(full)
        if x:
            if t.dtype in _FP4_DTYPES:
                raise UnsupportedError(f"{src}: {name} is FP4-packed ({t.dtype}); quantization_config.expert_dtype "
                                       "fp4 (ue8m0 scales) is not supported")
            packed = _pack_experts(pending, x.group(1), int(x.group(2)), x.group(3), t, e, _V4_EXPERT_LEAVES)
            if packed is not None:
                yield f"{x.group(1)}.gate_up_proj", packed[0], src
                yield f"{x.group(1)}.down_proj", packed[1], src
            continue
        yield full, t, src
    _all_packed(pending, e)


def _v4_hub_name(name: str) -> str:
    """One of our V4 state-dict names → the name transformers' save_pretrained writes (DeepSeek's)."""
    m = _LAYER.match(name)
    if m:
        return f"model.layers.{m.group(1)}.{_v4_hub_local(m.group(2))}"
    return "head.weight" if name == "lm_head.weight" else name


def _v4_hub_local(name: str) -> str:
    """The inverse of _v4_local, checked by construction: try the hub spellings until one maps back."""
    for cand in _v4_hub_candidates(name):
        if _v4_local(cand) == name:
            return cand
    raise ValueError(f"no DeepSeek-V4 checkpoint name for {name!r}")


def _v4_hub_candidates(name: str):
    rev_leaf = {v: k for k, v in _V4_LEAF_RENAMES.items()}
    fixed = {"self_attn.sinks": "attn.attn_sink", "mlp.gate.e_score_correction_bias": "ffn.gate.bias"}
    if name in fixed:
        yield fixed[name]
    m = re.match(r"^(attn|ffn)_hc\.(fn|base|scale)$", name)
    if m:
        yield f"hc_{m.group(1)}_{m.group(2)}"
    heads = [("self_attn.indexer.comp.", "attn.indexer.compressor."), ("self_attn.indexer.q_b_proj.", "attn.indexer.wq_b."),
             ("self_attn.indexer.weights_proj.", "attn.indexer.weights_proj."), ("self_attn.", "attn."),
             ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "ffn_norm."),
             ("mlp.shared_experts.gate_proj.", "ffn.shared_experts.w1."),
             ("mlp.shared_experts.down_proj.", "ffn.shared_experts.w2."),
             ("mlp.shared_experts.up_proj.", "ffn.shared_experts.w3."), ("mlp.", "ffn.")]
    for ours, hub in heads:
        if name.startswith(ours):
            rest = name[len(ours):].split(".")
            rest = [rev_leaf.get(p, p) for p in rest] if hub.startswith("attn") else rest
            yield hub + ".".join(rest)
    yield name
# --- end DeepSeek-V4 names ---------------------------------------------------------------------------------
