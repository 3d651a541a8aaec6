"""Fine-tuning an existing model (SFT, GRPO): load it trainable, and write the result where serve/eval load it."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.train.lora import merge_lora
from nanoseek.weights.hf import save_hf
from nanoseek.weights.registry import LoadedModel, load_model


def finetune_config(out_dir: str, *, steps: int, lr: float, schedule: str = "cosine", warmup_steps: int = 10,
                    grad_accum: int = 1, seed: int = 0, device: str = "auto", ckpt_every: int = 100,
                    log_every: int = 10, plots: bool = True, log: str = "jsonl", final_dtype: str = "float32",
                    precision: str = "auto"):
    """The TrainConfig of a fine-tuning run (sft, grpo, distill, the recipe's stages): no weight decay,
    clipping at 1, no periodic held-out eval, the last two checkpoints kept."""
    from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
    from nanoseek.train.tracking import check_kind

    check_kind(log)
    weights_dtype(final_dtype)
    return TrainConfig(optim=OptimConfig(lr=lr, schedule=schedule, warmup_steps=warmup_steps, weight_decay=0.0,
                                         grad_clip=1.0),
                       train=RunConfig(steps=steps, grad_accum=grad_accum, seed=seed, device=device,
                                       out_dir=str(out_dir), log_every=log_every, eval_every=0,
                                       ckpt_every=ckpt_every, keep_last=2, plots=plots, log=log,
                                       final_dtype=final_dtype, precision=precision))


def weights_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` for written weights (final/, `nanoseek export`): float32, bfloat16, float16."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        from nanoseek.errors import BadInputError

        raise BadInputError(f"--dtype {name!r}: expected {', '.join(table)}")
    return table[name]


def load_trainable(spec: str, device) -> LoadedModel:
    """A built-in name, GGUF file or HF directory, loaded in fp32 with every weight trainable. Loaders hand
    out frozen and possibly memory-mapped tensors; training updates owned copies instead."""
    loaded = load_model(spec)
    if len(getattr(loaded.model, "mtp", ())):
        # Fine-tuning objectives train the main model only (R1's SFT and RL never use MTP): unused MTP
        # modules would leave parameters without gradients (which DDP rejects) and MoE layers that never
        # run. Dropped here, and from the config, so final/ is a consistent checkpoint without them.
        loaded.model.mtp = torch.nn.ModuleList()
        loaded.model.config.num_nextn_predict_layers = 0
    loaded.model.to(device)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.data = p.data.clone()
            p.requires_grad_(True)
    return loaded


def fit_and_save(trainer, loaded: LoadedModel, env) -> dict:
    """Run the Trainer, then write `<out_dir>/final`: a Hugging Face directory with the tokenizer, which
    `nanoseek eval/serve/generate --model` load; LoRA adapters merged. Collective under torchrun; rank 0 writes."""
    from nanoseek.train import distributed as D

    last = trainer.fit()
    # LoRA adapters are folded into the base weights first, so `final` is a plain model (the checkpoints
    # keep the adapters for resuming).
    merge_lora(loaded.model)
    if env.is_main:
        # Training is over (its checkpoints keep fp32), so casting the model itself costs no copy.
        model = loaded.model.to(weights_dtype(trainer.cfg.train.final_dtype))
        save_hf(model, Path(trainer.cfg.train.out_dir) / "final", tokenizer=loaded.tokenizer)
    D.barrier()
    return last
