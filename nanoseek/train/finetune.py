"""Fine-tuning an existing model (SFT, GRPO): load it trainable, and write the result where serve/eval load it."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.weights.hf import save_hf
from nanoseek.weights.registry import LoadedModel, load_model


def load_trainable(spec: str, device) -> LoadedModel:
    """A built-in name, GGUF file or HF directory, loaded in fp32 with every weight trainable. Loaders hand
    out frozen and possibly memory-mapped tensors; training updates owned copies instead."""
    loaded = load_model(spec)
    loaded.model.to(device)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.data = p.data.clone()
            p.requires_grad_(True)
    return loaded


def save_final(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """`<out_dir>/final`: a Hugging Face directory with the tokenizer, for `nanoseek eval/serve --model`."""
    return save_hf(loaded.model, Path(out_dir) / "final", tokenizer=loaded.tokenizer)
