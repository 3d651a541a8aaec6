"""Training checkpoints: atomic save, keep-last-N, exact resume, and export to a Hugging Face directory.

A run directory holds `checkpoints/step_XXXXXXXX/`, each with
  model.safetensors  full fp32 weights under nanoseek's parameter names, router biases included (buffers)
  trainer.pt         optimizer states, schedule step, data position, RNG states of every rank
  meta.json          step, the model config (`model`), the training config, the tokenizer directory
A checkpoint is written into a hidden temp directory and renamed into place (os.replace), so a process killed
mid-save leaves either the previous checkpoint or the new one, never half of one; stale temp dirs are cleared
on the next start. Weights and optimizer state are gathered to full tensors with torch.distributed's
state-dict API, which works the same for a plain module, DDP and FSDP2; rank 0 writes. Resuming from a
shared filesystem, every rank reads the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.models.config import DeepseekConfig, DeepseekV4Config, DeepseekV32Config, ModelConfig
from nanoseek.train import distributed as D

_STEP = re.compile(r"^step_(\d{8})$")
PREFIX = "lm."  # the training root wraps the language model as `lm` (see loop.LMForward)


def _full():
    """Full (unsharded) tensors on CPU: what one file per checkpoint needs, for every wrapping."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_spec(cfg: ModelConfig) -> dict[str, Any]:
    """A model config as a [model] table (what train.config.build_model_config reads back)."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, DeepseekConfig):
        d["arch"] = "deepseek_v32" if isinstance(cfg, DeepseekV32Config) else "deepseek_v3"
    elif isinstance(cfg, DeepseekV4Config):
        d["arch"] = "deepseek_v4"
    return d


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- save


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def clear_stale(run_dir: str | os.PathLike) -> None:
    """Remove temp dirs left by a save that was killed."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def save(run_dir: str | os.PathLike, step: int, root: nn.Module, optimizers: list, state: dict[str, Any],
         meta: dict[str, Any], tied: bool, keep_last: int, env: D.DistEnv) -> Path | None:
    """Collective: every rank calls it. `state` is this rank's trainer state (RNG etc.); all ranks' states
    are stored, indexed by rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(root, options=_full())
    optim_sd = get_optimizer_state_dict(root, optimizers, options=_full())
    states = D.all_gather_objects(state)
    out = None
    if env.is_main:
        ckpt_root = Path(run_dir) / "checkpoints"
        ckpt_root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k[len(PREFIX):]: v.detach().contiguous() for k, v in model_sd.items()}
        if tied:  # one tensor under two names: safetensors stores it once
            weights.pop("lm_head.weight", None)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save({"step": step, "optimizer": optim_sd, "ranks": states}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
        final = ckpt_root / name
        if final.exists():  # re-saving a step after a resume: move the old copy aside first
            old = ckpt_root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for _, p in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        out = final
    D.barrier()
    return out


# ------------------------------------------------------------------------------------------------- load


def read_meta(path: Path) -> dict[str, Any]:
    f = path / "meta.json"
    if not f.is_file():
        raise NotFoundError(f"{f}: no such file (not a nanoseek checkpoint directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{f}: not valid JSON ({e})") from None


def read_weights(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    f = path / "model.safetensors"
    if not f.is_file():
        raise NotFoundError(f"{f}: no such file")
    try:
        sd = load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise BadInputError(f"{f}: cannot read ({e})") from None
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def restore(path: Path, root: nn.Module, optimizers: list, tied: bool, env: D.DistEnv) -> dict[str, Any]:
    """Load weights and optimizer state into the (wrapped) training root; returns this rank's trainer state
    plus `step`. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = read_weights(path, tied)
    set_model_state_dict(root, {PREFIX + k: v for k, v in weights.items()}, options=_full())
    try:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise BadInputError(f"{path / 'trainer.pt'}: cannot read ({e})") from None
    set_optimizer_state_dict(root, optimizers, trainer["optimizer"], options=_full())
    ranks = trainer["ranks"]
    if len(ranks) != env.world_size:
        # The data position is rank-independent; RNG streams are per rank and cannot be re-split.
        print(f"nanoseek: note: {path} was saved by {len(ranks)} rank(s), resuming on {env.world_size}: "
              "RNG states restart from rank 0's")
    mine = dict(ranks[env.rank] if env.rank < len(ranks) else ranks[0])
    mine["step"] = trainer["step"]
    return mine


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, model config, meta) from a checkpoint directory or a run directory (its newest checkpoint)."""
    from nanoseek.models import build_model
    from nanoseek.train.config import build_model_config

    path = resolve(path)
    meta = read_meta(path)
    cfg = build_model_config(meta["model"], where=f"{path / 'meta.json'} model")
    model = build_model(cfg)
    sd = read_weights(path, cfg.tie_word_embeddings)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise BadInputError(f"{path / 'model.safetensors'}: does not match its meta.json model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype).eval(), cfg, meta


def resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or directory")
    if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        return path
    newest = latest(path)
    if newest is None:
        raise NotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints/")
    return newest


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
              tokenizer: str | None = None) -> Path:
    """Write a transformers-loadable directory (config.json, safetensors, tokenizer) from a checkpoint.

    The tokenizer is the one the run recorded (its data's tokenizer), unless `tokenizer` names another."""
    from nanoseek.weights.hf import save_hf

    model, cfg, meta = load_model(checkpoint, dtype)
    tok_dir = tokenizer or meta.get("tokenizer")
    tok = None
    if tok_dir:
        from nanoseek.train.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)  # a directory, a .gguf file or a built-in name, as `data prepare` took
    return save_hf(model, out_dir, tokenizer=tok)
