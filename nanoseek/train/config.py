"""Typed training configuration: `TrainConfig` loaded from a TOML file plus dotted command-line overrides.

A config file has the sections [model], [data], [optim] and [train]. [model] holds `arch` ("deepseek_v3",
"deepseek_v4" or "llama") and any field of the matching model config (nanoseek.models.config); everything else maps onto the
dataclasses below. TOML has no null: the string "none" stands for it. `--set optim.lr=3e-4` overrides one
field; the value is read as TOML (so `--set train.compile=true` is a bool and `--set data.path=/x` a string).
Unknown sections or keys raise BadInputError naming the file and the key, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.models.config import (DeepseekConfig, DeepseekV4Config, DeepseekV32Config, DenseConfig, ModelConfig,
                                    RopeConfig)

ARCHS = {"deepseek_v3": DeepseekConfig, "deepseek_v32": DeepseekV32Config, "llama": DenseConfig,
         "deepseek_v4": DeepseekV4Config}


@dataclass
class DataConfig:
    path: str = ""  # a directory made by `nanoseek data prepare` (meta.json + shards)
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per rank
    eval_split: str = "val"
    tokenizer: str | None = None  # tokenizer dir for export; default: the one recorded in the data's meta.json


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw", or "muon" (Muon for 2-D hidden matrices, AdamW for the rest)
    lr: float = 3e-4  # AdamW learning rate (peak)
    muon_lr: float | None = None  # default: lr (updates are scaled to AdamW's RMS, Moonlight §2.2)
    muon_momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)  # V3 §4.2
    eps: float = 1e-8
    weight_decay: float = 0.1  # V3 §4.2; applied to matrices only, never to norms or biases
    grad_clip: float = 1.0  # V3 §4.2; 0 disables clipping
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # floor of the decay as a fraction of the peak
    decay_frac: float = 0.2  # wsd: the final fraction of steps spent decaying
    fused: str = "auto"  # "auto" (fused AdamW on CUDA), "on", "off"


@dataclass
class RunConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False  # torch.compile each decoder block
    parallel: str = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard per block) when launched by torchrun
    init_std: float = 0.02  # normal init of every matrix (V3 used 0.006 at its scale)
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic eval (a final eval still runs when a val split exists)
    eval_batches: int = 20
    ckpt_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 3
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    plots: bool = True
    # DeepSeek-V3.2 (DSA): the first N steps train only the lightning indexer toward the dense attention
    # (V3.2 report §2.1.1, dense warm-up); ignored by models without DSA
    indexer_warmup_steps: int = 0
    final_dtype: str = "float32"  # fine-tuning: the dtype final/ is written in (bfloat16 halves its size)
    log: str = "jsonl"  # metrics.jsonl always; "tensorboard" or "wandb" (offline unless WANDB_MODE says) beside it


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "deepseek_v3"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int | None = None, bos_id: int | None = None,
                     eos_id: int | None = None) -> ModelConfig:
        """The model's typed config; vocab size and special ids come from the data unless [model] sets them."""
        return build_model_config(self.model, vocab_size, bos_id, eos_id)


def build_model_config(spec: dict[str, Any], vocab_size: int | None = None, bos_id: int | None = None,
                       eos_id: int | None = None, where: str = "[model]") -> ModelConfig:
    spec = dict(spec)
    arch = spec.pop("arch", "deepseek_v3")
    if arch not in ARCHS:
        raise BadInputError(f"{where} arch {arch!r}: expected one of {', '.join(ARCHS)}")
    cls = ARCHS[arch]
    rope = RopeConfig(**_only(spec.pop("rope", {}) or {}, RopeConfig, f"{where}.rope"))
    if cls is DeepseekV4Config and "compress_rope" in spec:  # V4's second rotary (compressed layers)
        spec["compress_rope"] = RopeConfig(**_only(spec["compress_rope"] or {}, RopeConfig, f"{where}.compress_rope"))
    known = {f.name for f in dataclasses.fields(cls)} - {"rope"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(unknown)} for arch {arch!r}")
    if vocab_size is not None:
        spec.setdefault("vocab_size", vocab_size)
    if bos_id is not None:
        spec.setdefault("bos_token_id", bos_id)
    if eos_id is not None:
        spec.setdefault("eos_token_id", eos_id)
    # TOML has no null: the string "none" stands for it (e.g. q_lora_rank = "none": one full-rank q_proj).
    spec = {k: None if v == "none" else v for k, v in spec.items()}
    if cls is DenseConfig:
        spec.setdefault("arch", arch)
    try:
        return cls(rope=rope, **spec)
    except TypeError as e:
        raise BadInputError(f"{where}: {e}") from None


def _only(d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return d


def _section(cls: type, d: Any, where: str):
    if not isinstance(d, dict):
        raise BadInputError(f"{where} must be a table, got {type(d).__name__}")
    kw = _only(d, cls, where)
    out = {}
    for k, v in kw.items():
        default = getattr(cls(), k)
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        want = type(default)
        if default is not None and not isinstance(v, want) and not (want is float and isinstance(v, int)):
            raise BadInputError(f"{where} {k}: expected {want.__name__}, got {type(v).__name__} {v!r}")
        out[k] = v
    return cls(**out)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' → (['optim', 'lr'], 3e-4). Values are TOML; anything that is not becomes a string
    (so `train.parallel=fsdp` and `data.path=/data/x` need no quotes)."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise BadInputError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    unknown = sorted(set(raw) - {"model", "data", "optim", "train"})
    if unknown:
        raise BadInputError(f"{where}: unknown section(s) {', '.join(unknown)} (expected model, data, optim, train)")
    model = raw.get("model", {"arch": "deepseek_v3"})
    if not isinstance(model, dict):
        raise BadInputError(f"{where} [model] must be a table")
    cfg = TrainConfig(model=dict(model),
                      data=_section(DataConfig, raw.get("data", {}), f"{where} [data]"),
                      optim=_section(OptimConfig, raw.get("optim", {}), f"{where} [optim]"),
                      train=_section(RunConfig, raw.get("train", {}), f"{where} [train]"))
    build_model_config(cfg.model, vocab_size=cfg.model.get("vocab_size", 256), where=f"{where} [model]")  # validate
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file and apply `section.key=value` overrides on top."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise BadInputError(f"--set {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return config_from_dict(raw, str(path))
