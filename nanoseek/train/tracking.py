"""Experiment tracking beside metrics.jsonl (which is always written): TensorBoard or Weights & Biases,
chosen by `train.log` / `--log`. Both are optional (`pip install 'nanoseek[tracking]'`), imported only when
asked for, and work offline: TensorBoard writes event files under RUN/tensorboard, and wandb runs in offline
mode (files under RUN/wandb, `wandb sync` uploads them later) unless WANDB_MODE says otherwise.

Every numeric field of a record is logged at the record's step, as `train/<key>` or `eval/<key>`; a list
(per-layer expert load) becomes one series per entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from nanoseek.errors import BadInputError, UnsupportedError

KINDS = ("jsonl", "tensorboard", "wandb")


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_kind(kind: str) -> None:
    """A known kind whose package is installed: checked before a model loads, so a missing extra costs nothing."""
    import importlib.util

    if kind not in KINDS:
        raise BadInputError(f"train.log {kind!r}: expected {', '.join(KINDS)}")
    if kind in PACKAGES and importlib.util.find_spec(PACKAGES[kind]) is None:
        raise _missing(kind, PACKAGES[kind])


def _missing(kind: str, package: str) -> UnsupportedError:
    return UnsupportedError(f"--log {kind} needs the {package} package: pip install 'nanoseek[tracking]'")


def scalars(record: dict[str, Any], labels: list[str] | None = None) -> dict[str, float]:
    """The record's numbers as {'train/loss': 2.3, 'train/load_max_mean/layer 1': 1.2, ...}."""
    kind = record.get("kind", "train")
    out = {}
    for k, v in record.items():
        if k in ("kind", "step"):
            continue
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[f"{kind}/{k}"] = float(v)
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                name = labels[i] if labels and len(labels) == len(v) else str(i)
                out[f"{kind}/{k}/{name}"] = float(x)
    return out


class Tracker:
    """One backend; `log(record)` for every record metrics.jsonl gets, `close()` at the end."""

    def __init__(self, kind: str, run_dir: Path, config: dict[str, Any], labels: list[str] | None = None):
        check_kind(kind)
        self.kind, self.labels = kind, labels
        self._tb = self._wandb = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _missing(kind, "tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise _missing(kind, "wandb") from None
            os.environ.setdefault("WANDB_MODE", "offline")   # local files unless the user asks to upload
            # One id per run directory, so a resumed run continues the same wandb run.
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanoseek"), name=run_dir.name,
                                     id=run_id, resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record, self.labels), int(record.get("step", 0))
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
