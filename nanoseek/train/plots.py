"""PNG plots of a run from its metrics.jsonl: loss (train and held-out), learning rate, tokens/s, and MoE load
balance (max/mean tokens per expert, per layer). matplotlib is imported only here, with the Agg backend, so
training never needs a display."""

from __future__ import annotations

from pathlib import Path

from nanoseek.train.loop import read_jsonl


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return []
    steps = [r["step"] for r in train]
    written = []

    def save(fig, name: str) -> None:
        out = run_dir / name
        tmp = out.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(out)
        written.append(out)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.get("ce", r["loss"]) for r in train], lw=1, label="train CE")
    if any("mtp" in r for r in train):
        ax.plot(steps, [r.get("mtp") for r in train], lw=1, alpha=0.7, label="train MTP CE")
    if evals and "eval_ce" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["eval_ce"] for r in evals], "o-", label="held-out CE")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="lr", title="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["tokens_per_s"] for r in train], lw=1)
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput (all ranks)")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    if "load_max_mean" in train[0]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(len(train[0]["load_max_mean"])):
            ax.plot(steps, [r["load_max_mean"][i] for r in train], lw=1, label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert load balance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, "load_balance.png")
    return written
