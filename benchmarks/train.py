"""Training throughput: nanoseek's Trainer vs transformers, same model shape, batch and precision, one run;
and (`--archs TEXT`) loss curves and tokens/s of the tiny DeepSeek-V3, V3.2 and V4 presets on one text.

    .venv/bin/python benchmarks/train.py [--size auto|cpu|gpu] [--steps 10] [--warmup 3] [--compile]
                                         [--only moe dense] [--out benchmarks/results/train-DEVICE-DATE.md]
    .venv/bin/python benchmarks/train.py --archs /path/to/tinyshakespeare/input.txt [--presets tiny tiny-v32
        tiny-v4] [--arch-steps 150] [--batch 8] [--seq 128] [--out benchmarks/results/train-archs-cpu-DATE.md]

Architecture comparison (`--archs`): each preset (configs/NAME.toml: model, optimizer, lr schedule, V3.2's
indexer warm-up) trains for the same steps through `Trainer.train_step` on the same batches: the text's
UTF-8 bytes as tokens (vocabulary 256, so no tokenizer differs between runs), windows drawn by one seeded
generator from the first 95%; held-out CE on fixed windows of the last 5% every quarter of the run. tok/s is
per run (wall and process CPU time, the machine being shared). A PNG of the curves is written next to --out.

Two models: `small-moe` (DeepSeek-V3 MoE: MLA, 32 experts top-4 + 1 shared) and `small-dense` (its Llama twin
with the same active parameters), from configs/*.toml on a GPU (16 x 2048 tokens, bf16 autocast, as in
baselines.md). On CPU (`--size cpu`, the default without a GPU) both shrink to a tiny shape of the same
structure, fp32, so the script runs anywhere in a minute.

- nanoseek: `Trainer.train_step` exactly as `nanoseek pretrain` runs it (AdamW, fused on CUDA; clipping; for
  the MoE the sequence-wise balance loss and the router-bias update), grouped-GEMM experts.
- transformers: DeepseekV3ForCausalLM / LlamaForCausalLM built from the same config.json, AdamW (fused on CUDA),
  the same autocast, gradient clipping, fp32 cross-entropy — a plain loop, as baselines.md measured it.

tokens/s = batch·seq·steps / wall time of `steps` steps after `warmup` steps (CUDA synchronized).

MFU = tokens/s · 6·N_active / peak, the formula of baselines.md: N_active counts every parameter one token's
forward multiplies by — attention, dense MLPs, shared experts, the router, the top-k routed experts'
share (k/E of the expert weights) and the output head — but not the input embedding (a lookup). Attention's
T×T products are left out (they add 6·L·H·(d_qk + d_v)·T per token, ~12% more at T = 2048 here), as in the
baseline. `peak` is measured in this run: the best of a few large matmuls in the benchmark's precision
(bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ shapes


def model_configs(size: str):
    """(moe config, dense config, batch, seq) for the GPU presets or their tiny CPU versions."""
    from nanoseek.train.config import load_config

    moe = load_config(REPO / "configs" / "small-moe.toml")
    dense = load_config(REPO / "configs" / "small-dense.toml")
    if size == "gpu":
        return moe.model_config(49152, 0, 1), dense.model_config(49152, 0, 1), 16, 2048
    moe.model.update(hidden_size=128, num_hidden_layers=4, intermediate_size=320, num_attention_heads=4,
                     kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                     n_group=4, topk_group=2, num_experts_per_tok=4, moe_intermediate_size=64)
    mcfg = moe.model_config(4096, 0, 1)
    return mcfg, dense_twin(mcfg), 4, 256


def dense_twin(moe):
    """A Llama config touching as many parameters per token as the MoE `moe` (same width, depth, heads)."""
    from nanoseek.models.config import DenseConfig

    h, L, nh = moe.hidden_size, moe.num_hidden_layers, moe.num_attention_heads
    q = h * nh * moe.qk_head_dim if moe.q_lora_rank is None else (
        h * moe.q_lora_rank + moe.q_lora_rank * nh * moe.qk_head_dim)
    mla = (q + h * (moe.kv_lora_rank + moe.qk_rope_head_dim) + moe.kv_lora_rank * nh * (moe.qk_nope_head_dim
           + moe.v_head_dim) + nh * moe.v_head_dim * h)
    ffn = 3 * h * moe.moe_intermediate_size
    moe_ffn = ffn * (moe.n_shared_experts + moe.num_experts_per_tok) + moe.n_routed_experts * h
    active = L * mla + moe.first_k_dense_replace * 3 * h * moe.intermediate_size + (
        L - moe.first_k_dense_replace) * moe_ffn
    inter = round((active / L - 4 * h * h) / (3 * h) / 8) * 8
    return DenseConfig(arch="llama", vocab_size=moe.vocab_size, hidden_size=h, intermediate_size=inter,
                       num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nh,
                       max_position_embeddings=moe.max_position_embeddings, tie_word_embeddings=False,
                       bos_token_id=moe.bos_token_id, eos_token_id=moe.eos_token_id)


def active_params(model) -> int:
    from nanoseek.models.config import DeepseekConfig

    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    if isinstance(cfg, DeepseekConfig):
        idle = 1 - cfg.num_experts_per_tok / cfg.n_routed_experts
        n -= int(sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers()) * idle)
    return n


# ------------------------------------------------------------------------------------------------ runners


class RandomTokens:
    """A batch source of fixed random tokens (throughput does not depend on the text)."""

    def __init__(self, vocab: int, batch: int, seq: int, device):
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        self.batch = (t[:, :-1].contiguous(), t[:, 1:].contiguous())

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def nanoseek_step(mcfg, device, bf16: bool, batch: int, seq: int, compile: bool, tmp: str):
    from nanoseek.models import build_model
    from nanoseek.models.config import DeepseekConfig
    from nanoseek.train.checkpoint import model_spec
    from nanoseek.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from nanoseek.train.distributed import DistEnv
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import LanguageModeling, init_weights

    cfg = TrainConfig(model=model_spec(mcfg), data=DataConfig(seq_len=seq, batch_size=batch),
                      optim=OptimConfig(lr=3e-4, warmup_steps=0),
                      train=RunConfig(steps=10**6, precision="bf16" if bf16 else "fp32", compile=compile,
                                      out_dir=tmp, resume=False, plots=False))
    torch.manual_seed(0)
    model = build_model(mcfg)
    init_weights(model, 0.02)
    lam = mcfg.mtp_loss_weight if isinstance(mcfg, DeepseekConfig) else 0.0
    trainer = Trainer(cfg, model, LanguageModeling(lam), RandomTokens(mcfg.vocab_size, batch, seq, device),
                      env=DistEnv(device=device))
    return trainer.train_step


def transformers_step(mcfg, device, bf16: bool, batch: int, seq: int):
    import transformers

    from nanoseek.models.config import DeepseekConfig, config_to_hf

    hf = config_to_hf(mcfg)
    cls, conf = ((transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config)
                 if isinstance(mcfg, DeepseekConfig) else (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    torch.manual_seed(0)
    model = cls(conf.from_dict(hf)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda" or None)
    x, y = RandomTokens(mcfg.vocab_size, batch, seq, device).batch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def matmul_peak(device, dtype, n: int | None = None, repeats: int = 5, inner: int = 4) -> float:
    """Best FLOP/s over `repeats` timings of `inner` square n x n matmuls in `dtype` (benchmarks/gpu.py's MFU
    denominator too, with its own sizes)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - t0))
    return best


# ------------------------------------------------------------------------------------------------ archs


class TextWindows:
    """Batches (x, y) of `seq`+1-byte windows at random offsets of `data` (one seeded generator per run, so
    every run sees the same batches)."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int = 0):
        self.data, self.batch, self.seq = data, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        at = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=self.gen)
        w = torch.stack([self.data[i:i + self.seq + 1] for i in at.tolist()])
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def train_preset(preset: str, train_data, val_batches, steps: int, batch: int, seq: int, tmp: str):
    """One short run of configs/PRESET.toml; → (per-step records, eval records, wall s, CPU s, params)."""
    from nanoseek.models import build_model
    from nanoseek.models.config import DeepseekConfig
    from nanoseek.train.config import load_config
    from nanoseek.train.distributed import DistEnv
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import LanguageModeling, init_weights

    cfg = load_config(REPO / "configs" / f"{preset}.toml")
    cfg.data = dataclasses.replace(cfg.data, seq_len=seq, batch_size=batch)
    cfg.train = dataclasses.replace(cfg.train, steps=steps, out_dir=tmp, resume=False, plots=False,
                                    precision="fp32")
    mcfg = cfg.model_config(256, 0, 1)
    torch.manual_seed(cfg.train.seed)
    model = build_model(mcfg)
    init_weights(model, cfg.train.init_std)
    lam = mcfg.mtp_loss_weight if isinstance(mcfg, DeepseekConfig) else 0.0
    trainer = Trainer(cfg, model, LanguageModeling(lam), TextWindows(train_data, batch, seq),
                      eval_batches=lambda: val_batches, env=DistEnv(device=torch.device("cpu")))
    recs, evals, wall, cpu = [], [], 0.0, 0.0
    for step in range(1, steps + 1):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        recs.append(trainer.train_step())
        wall, cpu = wall + time.perf_counter() - wall0, cpu + time.process_time() - cpu0  # training steps only
        if step % max(1, steps // 4) == 0 or step == steps:
            evals.append(trainer.evaluate())
    if trainer.log is not None:
        trainer.log.close()
    return recs, evals, wall, cpu, sum(p.numel() for p in model.parameters())


def compare_archs(a) -> int:
    text = Path(a.archs).read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    cut = int(len(data) * 0.95)
    train_data, val_data = data[:cut], data[cut:]
    val = TextWindows(val_data, a.batch, a.seq, seed=1)
    val_batches = [val.next_batch() for _ in range(4)]
    torch.set_num_threads(a.threads)
    runs = {}
    for preset in a.presets:
        with tempfile.TemporaryDirectory() as tmp:
            runs[preset] = train_preset(preset, train_data, val_batches, a.arch_steps, a.batch, a.seq, tmp)
        recs, evals, wall, cpu, n = runs[preset]
        print(f"{preset}: final train CE {recs[-1]['ce']:.3f}, held-out CE {evals[-1]['eval_ce']:.3f}, "
              f"{wall:.0f} s wall, {cpu:.0f} s CPU", file=sys.stderr, flush=True)
    date = time.strftime("%Y-%m-%d-%H%M")
    out = Path(a.out or REPO / "benchmarks" / "results" / f"train-archs-cpu-{date}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for preset, (recs, evals, *_rest) in runs.items():
        line, = ax.plot([r["step"] for r in recs], [r["ce"] for r in recs], lw=0.8, alpha=0.6,
                        label=f"{preset} train CE")
        ax.plot([e["step"] for e in evals], [e["eval_ce"] for e in evals], "o-", color=line.get_color(),
                label=f"{preset} held-out CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"tiny presets on {Path(a.archs).name} (bytes), batch {a.batch}x{a.seq}")
    ax.legend(fontsize=7)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tokens = a.arch_steps * a.batch * a.seq
    lines = ["| preset | params | train CE (last 10 steps) | held-out CE by step | tok/s wall | tok/s CPU |",
             "|---|---:|---:|---|---:|---:|"]
    for preset, (recs, evals, wall, cpu, n) in runs.items():
        tail = sum(r["ce"] for r in recs[-10:]) / len(recs[-10:])
        ev = ", ".join(f"{e['step']}: {e['eval_ce']:.3f}" for e in evals)
        lines.append(f"| {preset} | {n / 1e6:.2f}M | {tail:.3f} | {ev} | {tokens / wall:,.0f} | {tokens / cpu:,.0f} |")
    table = "\n".join(lines)
    print(table)
    cmd = "python benchmarks/train.py " + " ".join(sys.argv[1:])
    out.write_text("\n".join([
        f"# Tiny V3 / V3.2 / V4 on the same bytes, {date}", "",
        f"- machine: {cpu_name()}, {a.threads} thread(s), torch {torch.__version__}; shared, so read tok/s CPU",
        (f"- {a.arch_steps} steps of batch {a.batch} x {a.seq} bytes ({tokens:,} tokens) per preset, fp32, "
         f"same batches for every preset; held-out CE on 4 fixed batches of the last 5%"),
        f"- command: `{cmd}`", f"- curves: {png.name}", "", table, ""]))
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time nanoseek with torch.compile'd blocks")
    ap.add_argument("--only", nargs="+", choices=["moe", "dense"], default=["moe", "dense"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--archs", metavar="TEXT", default=None,
                    help="compare the tiny V3 / V3.2 / V4 presets' loss curves on this text file instead")
    ap.add_argument("--presets", nargs="+", default=["tiny", "tiny-v32", "tiny-v4"])
    ap.add_argument("--arch-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.archs:
        return compare_archs(a)
    gpu = torch.cuda.is_available()
    size = a.size if a.size != "auto" else ("gpu" if gpu else "cpu")
    device = torch.device("cuda" if gpu else "cpu")
    bf16 = device.type == "cuda"
    steps = a.steps or (10 if size == "gpu" else 5)
    moe, dense, batch, seq = model_configs(size)
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    dev_name = torch.cuda.get_device_name() if gpu else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"{dev_name}: matmul peak {peak / 1e12:.2f} TFLOP/s; batch {batch} x {seq}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {steps} timed steps", file=sys.stderr)

    rows = []
    for name, mcfg in (("small-moe", moe), ("small-dense", dense)):
        if ("moe" if "moe" in name else "dense") not in a.only:
            continue
        from nanoseek.models import build_model

        with torch.device("meta"):
            n_active = active_params(build_model(mcfg))
        runs = [("nanoseek", False)] + ([("nanoseek + compile", True)] if a.compile else []) + [("transformers", None)]
        results = []
        for label, comp in runs:
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as tmp:
                if comp is None:
                    step = transformers_step(mcfg, device, bf16, batch, seq)
                else:
                    step = nanoseek_step(mcfg, device, bf16, batch, seq, comp, tmp)
                dt = timed(step, device, steps, a.warmup)
                del step
            tps = batch * seq * steps / dt
            mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
            results.append((label, tps, 6 * n_active * tps / peak, mem))
            print(f"{name:12s} {label:20s} {tps:12,.0f} tok/s", file=sys.stderr)
        base = next(r[1] for r in results if r[0] == "transformers")
        for label, tps, mfu, mem in results:
            rows.append((name, label, tps, tps / base, mfu, mem, n_active))

    by_model = {(r[0], r[1]): r[2] for r in rows}
    header = "| model | implementation | tokens/s | vs transformers | MFU (6·N_active) | peak GPU memory |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name, label, tps, ratio, mfu, mem, n_active in rows:
        lines.append(f"| {name} ({n_active / 1e6:.1f}M active) | {label} | {tps:,.0f} | {ratio:.2f}x | "
                     f"{100 * mfu:.1f}% | {'-' if mem is None else f'{mem:.1f} GiB'} |")
    if ("small-moe", "nanoseek") in by_model and ("small-dense", "nanoseek") in by_model:
        lines.append("")
        ratio = by_model[("small-moe", "nanoseek")] / by_model[("small-dense", "nanoseek")]
        lines.append(f"nanoseek MoE / dense tokens/s: {ratio:.2f}x")
    table = "\n".join(lines)
    print(table)
    shape = dataclasses.asdict(moe)
    date = time.strftime("%Y-%m-%d-%H%M")
    kind = "cpu" if not gpu else torch.cuda.get_device_name().split()[-1].lower().replace("/", "-")
    out = Path(a.out or REPO / "benchmarks" / "results" / f"train-{kind}-{date}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        f"# Training throughput: nanoseek vs transformers ({size} size)", "",
        f"- machine: {dev_name}, torch {torch.__version__}",
        f"- date: {date}; batch {batch} x {seq} tokens, {'bf16 autocast' if bf16 else 'fp32'}, "
        f"{steps} timed steps after {a.warmup}",
        f"- measured matmul peak: {peak / 1e12:.2f} TFLOP/s; MFU = tokens/s x 6·N_active / peak",
        f"- MoE shape: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['n_routed_experts']} experts top-{shape['num_experts_per_tok']}, vocab {shape['vocab_size']}",
        f"- command: `python benchmarks/train.py {' '.join(sys.argv[1:])}`", "", table, ""])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
