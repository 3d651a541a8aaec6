"""PNG plots of a run from its metrics.jsonl, each showing what its objective optimises:

- pretrain: next-token CE and the MTP term as separate lines (the logged `loss` adds λ·MTP and the MoE
  balance term, so CE is the figure that compares with the held-out CE);
- sft: CE on reply tokens; distill: the KL being optimised, with the CE beside it;
- grpo: `grpo.png` — reward, accuracy, format rate, KL to the reference, completion length and the clipped
  surrogate loss, per step (a policy-gradient loss is not a quality measure; the reward is);
plus learning rate, tokens/s and, for MoE models, expert load balance labelled with model layer indices.
matplotlib is imported only here, with the Agg backend, so training never needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanoseek.train.loop import read_jsonl

# What each objective's loss.png shows: (metric key, label) pairs, the optimised quantity first.
LOSS_LINES = {
    "pretrain": (("ce", "train CE (next token)"), ("mtp", "train MTP CE (λ-weighted in the loss)")),
    "sft": (("ce", "train CE (reply tokens)"),),
    "distill": (("kl", "train KL(teacher ‖ student) · τ² (optimised)"), ("ce", "train CE (reply tokens)")),
}
GRPO_PANELS = (("reward", "reward"), ("accuracy", "accuracy (strict)"), ("format", "format rate"),
               ("kl", "KL to reference (k3)"), ("completion_len", "completion length (tokens)"),
               ("loss", "clipped surrogate loss (minimised)"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_grpo(train: Sequence[dict[str, Any]], path: Path, title: str = "GRPO") -> Path | None:
    """Reward, accuracy, format rate, KL, length and loss per step, one panel each (those the log has)."""
    panels = [(k, label) for k, label in GRPO_PANELS if any(k in r for r in train)]
    if not train or not panels:
        return None
    plt = _plt()
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in train if key in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", lw=1, ms=3)
        if key in ("reward", "accuracy", "format"):
            ax.set_ylim(-0.05, 1.05)
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir: str | Path, objective: str = "pretrain", moe_labels: Sequence[str] | None = None) -> list[Path]:
    plt = _plt()
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return []
    steps = [r["step"] for r in train]
    written = []

    if objective == "grpo":
        out = plot_grpo(train, run_dir / "grpo.png")
        written += [out] if out else []
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in LOSS_LINES.get(objective, (("loss", "train loss"),)):
            if any(key in r for r in train):
                ax.plot(steps, [r.get(key) for r in train], lw=1, label=label)
        if evals and "eval_ce" in evals[0]:
            ax.plot([r["step"] for r in evals], [r["eval_ce"] for r in evals], "o-", label="held-out CE")
        ax.set(xlabel="step", ylabel="nats/token", title=f"{objective}: what it optimises")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, run_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="lr", title="learning rate")
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "lr.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["tokens_per_s"] for r in train], lw=1)
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput (all ranks)")
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "throughput.png"))

    if "load_max_mean" in train[0]:
        n = len(train[0]["load_max_mean"])
        labels = list(moe_labels) if moe_labels and len(moe_labels) == n else [f"MoE {i}" for i in range(n)]
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(n):
            ax.plot(steps, [r["load_max_mean"][i] for r in train], lw=1, label=labels[i])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert load balance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(_save(fig, run_dir / "load_balance.png"))
    return written
