"""The R1 recipe's report card: report.md in the recipe's directory, with stages.png (pass@1 and its 95%
interval per stage, with the format rate) and grpo.png (reward, accuracy, format rate, KL, length per step).
Everything is read back from the files the stages wrote, so the card can be rebuilt at any time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.files import write_text_atomic
from nanoseek.machine import device_name
from nanoseek.train.loop import read_jsonl

STAGES = ("base", "sft", "grpo", "sft-traces", "onpolicy")
LABELS = {"base": "base model", "sft": "after cold-start SFT", "grpo": "after GRPO",
          "sft-traces": "student: SFT on teacher traces", "onpolicy": "student: on-policy distillation"}
DONE = ("sft", "grpo", "traces", "sft-traces", "onpolicy")   # the parts that leave a `.done` file


def read_evals(out: Path) -> dict[str, dict[str, Any]]:
    """The eval JSON of every stage evaluated so far, in STAGES order."""
    return {s: json.loads((out / "eval" / f"{s}.json").read_text())
            for s in STAGES if (out / "eval" / f"{s}.json").is_file()}


def read_done(out: Path) -> dict[str, dict[str, Any]]:
    """The `.done` record (seconds and counts) of every part that has finished."""
    return {s: json.loads((out / f"{s}.done").read_text()) for s in DONE if (out / f"{s}.done").is_file()}


def _train_log(run_dir: Path) -> list[dict[str, Any]]:
    """A stage's per-step training records ([] before it has logged any)."""
    path = run_dir / "metrics.jsonl"
    return [r for r in read_jsonl(path) if r.get("kind") == "train"] if path.is_file() else []


def _pct(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    lo, hi = m["ci95"]
    return f"{100 * m['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def plot_stages(evals: dict[str, dict[str, Any]], path: Path) -> Path | None:
    from nanoseek.train.plots import _plt, _save

    if not evals:
        return None
    plt = _plt()
    names = list(evals)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for j, (key, label) in enumerate((("strict/pass@1", "strict pass@1 (format-gated)"),
                                      ("answer/pass@1", "answer pass@1 (lenient)"))):
        xs = [i + (j - 1) * width for i in range(len(names))]
        vals = [evals[n]["metrics"][key]["value"] for n in names]
        err = [[v - evals[n]["metrics"][key]["ci95"][0] for n, v in zip(names, vals)],
               [evals[n]["metrics"][key]["ci95"][1] - v for n, v in zip(names, vals)]]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=label)
    ax.bar([i + width for i in range(len(names))], [evals[n]["stats"]["format_rate"] for n in names], width,
           label="format rate", color="0.7")
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names])
    ax.set(ylim=(0, 1.05), ylabel="share of problems", title="pass@1 per stage (95% intervals over problems)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _distill_lines(cfg, done: dict[str, dict]) -> list[str]:
    d = getattr(cfg, "distill", None)
    if d is None or not d.enabled:
        return []
    lines = [f"- distillation: teacher `{d.teacher}`, student `{d.student}`, each arm {d.steps} steps at lr {d.lr:g} "
             f"(cosine, {d.warmup_steps} warm-up): SFT on {d.sft_rows} packed rows of {d.seq_len} tokens per step "
             f"vs on-policy on {d.prompts_per_step} student completions of ≤{d.max_new_tokens} tokens per step"]
    if "traces" in done:
        t = done["traces"]
        lines.append(f"  - teacher traces: {t['kept']} correct, well-formed replies kept of {t['completions']} "
                     f"({t['problems_covered']} of {t['problems']} train problems), {t['seconds']:.0f} s")
    for name in ("sft-traces", "onpolicy"):
        if name in done:
            lines.append(f"  - {LABELS[name]}: {done[name]['seconds']:.0f} s, "
                         f"{done[name].get('student_tokens', 0):,} student tokens trained (padding included)")
    return lines


def write_report_card(out: Path, cfg, plots: bool = True) -> Path:
    from nanoseek.train.plots import plot_grpo

    out = Path(out)
    evals = read_evals(out)
    grpo_log, sft_log = _train_log(out / "grpo"), _train_log(out / "sft")
    images = []
    if plots:
        if plot_stages(evals, out / "stages.png"):
            images.append(("pass@1 per stage", "stages.png"))
        if plot_grpo(grpo_log, out / "grpo.png", title="GRPO per step (from the SFT model)"):
            images.append(("GRPO per step", "grpo.png"))
    done = read_done(out)
    protocol = cfg.eval.protocol
    first = next(iter(evals.values()), None)
    lines = [f"# R1 recipe report card: {cfg.model} on {cfg.task}", "",
             f"- task: `{cfg.task}` {json.dumps(cfg.task_args)}; machine: {device_name()}; training precision "
             f"{getattr(cfg, 'precision', 'auto')}",
             (f"- eval (the same at every stage): {first['stats']['problems'] if first else cfg.eval.problems} "
              f"held-out test problems, {protocol.samples} samples at T={protocol.temperature}, top-p "
              f"{protocol.top_p}, plus greedy, ≤{protocol.max_tokens} tokens, seed {protocol.seed}. `strict` = the "
              "reward's format-gated accuracy; `answer` = lenient answer extraction. Intervals: 95% over problems."),
             (f"- cold-start SFT: {cfg.cold_start.steps} steps, lr {cfg.cold_start.lr:g}, on "
              f"{cfg.cold_start.data or f'{cfg.cold_start.conversations} worked solutions of train problems'}"
              + (f" ({done['sft']['seconds']:.0f} s)" if "sft" in done else "")),
             (f"- GRPO: {cfg.rl.steps} rollouts of {cfg.rl.grpo.prompts_per_step} prompts × "
              f"{cfg.rl.grpo.group_size}, lr {cfg.rl.lr:g}, β {cfg.rl.grpo.beta:g}, ≤{cfg.rl.grpo.max_new_tokens} "
              f"new tokens, T {cfg.rl.grpo.temperature:g}"
              + (f" ({done['grpo']['seconds']:.0f} s)" if "grpo" in done else "")),
             *_distill_lines(cfg, done),
             "", "| stage | strict pass@1 | answer pass@1 | strict greedy | format rate | mean tokens | eval s |",
             "|---|---|---|---|---|---|---|"]
    for name, rep in evals.items():
        m, s = rep["metrics"], rep["stats"]
        lines.append(f"| {LABELS[name]} | {_pct(m.get('strict/pass@1'))} | {_pct(m.get('answer/pass@1'))} | "
                     f"{_pct(m.get('strict/greedy'))} | {100 * s['format_rate']:.1f}% | {s['mean_tokens']:.1f} | "
                     f"{s['generate_s']:.0f} |")
    if sft_log:
        first_ce, last_ce = sft_log[0].get("ce", float("nan")), sft_log[-1].get("ce", float("nan"))
        lines += ["", f"SFT CE on reply tokens: {first_ce:.3f} at step 1 → {last_ce:.3f} at step {sft_log[-1]['step']}."]
    if grpo_log:
        keys = [k for k in ("reward", "accuracy", "format", "kl", "completion_len", "frac_reward_zero_std")
                if any(k in r for r in grpo_log)]
        lines += ["", "GRPO per step (rollout statistics of the policy being trained):", "",
                  "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in grpo_log:
            lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-" for k in keys) + " |")
    lines += [""] + [f"![{alt}]({src})" for alt, src in images]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


