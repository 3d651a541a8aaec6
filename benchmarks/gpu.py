"""The GPU proof (issue 15): decode, training MFU and GRPO on one GPU, each figure beside its anchor
(transformers or TRL on the same shape) measured in the same run, written to ONE result file.

Device call (one ~10-minute call on an H100; Python 3.12, torch 2.11, transformers 5.17 there, no network).
Before it, here: `bash benchmarks/gpu_wheels.sh` (trl 1.16.0, datasets, dill, multiprocess into the ignored
.gpu_wheels/, ~2 MB). Then one `run` with carry [".gpu_wheels"], timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl ; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 ; python3 benchmarks/gpu.py --budget-s 520 --out-dir $OUT 2>&1 | tee $OUT/gpu-log.txt

Then copy $OUT/gpu-*.md into benchmarks/results/. (PYTHONPATH=$PWD makes nanoseek importable even if the
editable install fails offline.) `--smoke` runs every section at tiny sizes on CPU in well under a minute
(tests/test_gpu_prep.py runs it): it proves the script has no import or shape errors, not its figures.

Sections, in priority order (the file is rewritten after each figure, so a cut run keeps what it measured;
`--budget-s` skips what would not fit):
  0. GPU name, torch/transformers versions, the bf16 dense-GEMM peak measured now (the MFU denominator), and
     a correctness check: greedy tokens of the CUDA-graph decode equal the eager loop's (dense and MLA/MoE).
  1. Decode, SmolLM2-135M shape (hidden 576, 30 layers, 9 heads / 3 KV, tied), random bf16 weights,
     128-token prompts, 256 new tokens, EOS never ends a row: nanoseek (CUDA graphs) vs transformers
     `generate`, batch 1 and 256 first, then 16 and 64. Decode tok/s = tokens after each row's first /
     (total time - time to the last row's first token); all prompts prefill in the first step.
  2. Training, batch 16 x 2048, bf16 autocast, fused AdamW: SmolLM2 shape, configs/small-moe and its dense twin
     configs/small-dense; nanoseek's Trainer step vs a plain transformers loop (benchmarks/train.py's runners).
     MFU = 6 N_active tok/s / peak; causal attention FLOPs (3 L H (d_qk + d_v) T per token) reported apart.
  3. GRPO step, SmolLM2 shape, random weights, a synthetic tokenizer, arithmetic prompts, 8 prompts x G=8,
     256 completion tokens, beta = 0: nanoseek (rollouts with CUDA graphs) vs TRL 1.16 GRPOTrainer (no vLLM).
  4. Where a target is missed: the top 3 kernels by GPU time (torch.profiler) of that workload.
  5. Extra: decode at batch 1 and 256 with CUDA graphs over torch.compile'd blocks (kernel fusion).
  6. Extra: small-moe decode at batch 64, CUDA graphs vs eager (the MoE static path on a real GPU).
Peak GPU memory (torch.cuda.max_memory_allocated) is recorded for every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# This checkout's nanoseek and benchmarks/train.py's runners, whatever else is installed.
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
TARGETS = {"decode_b1": 1500.0, "decode_b256": 40000.0, "train_dense_x": 3.5, "train_moe_x": 4.0, "grpo_x": 5.0}


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    """The result file, rewritten whole after each figure (atomic replace), sections in the order measured."""

    path: Path
    header: list[str]
    sections: dict[str, list[str]] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)

    def add(self, section: str, line: str) -> None:
        self.sections.setdefault(section, []).append(line)
        print(f"[{section}] {line}", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        parts = list(self.header)
        for name, lines in self.sections.items():
            parts += ["", f"## {name}", "", *lines]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(parts) + "\n")
        tmp.replace(self.path)


@dataclass
class Run:
    """What every section needs: device, dtype, sizes (full or smoke), the clock and the report."""

    dev: torch.device
    smoke: bool
    report: Report
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    peak_flops: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if self.cuda else "-"


def section(run: Run, name: str, need_s: float):
    """Run a section's body unless fewer than `need_s` seconds are left; an error is reported, not raised,
    so the next section still runs."""

    @contextlib.contextmanager
    def guard():
        if run.left() < need_s:
            run.report.add(name, f"skipped: {run.left():.0f} s left of the budget, this section needs ~{need_s:.0f} s")
            yield False
            return
        try:
            yield True
        except Exception as e:  # record and go on: a cut or broken section must not lose the others
            tb = traceback.format_exc().strip().splitlines()[-12:]
            run.report.add(name, f"FAILED: {type(e).__name__}: {e}\n\n```\n" + "\n".join(tb) + "\n```")
        finally:
            run.reset_memory()

    return guard()


# ------------------------------------------------------------------------------------------------ models


def smollm_config(smoke: bool, context: int):
    from nanoseek.models.config import DenseConfig

    if smoke:
        return DenseConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                           tie_word_embeddings=True, eos_token_id=0)
    return DenseConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=context,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def random_model(cfg, run: Run, std: float = 0.02):
    from nanoseek.models import build_model

    torch.manual_seed(0)
    with torch.device(run.dev):
        model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=std)
    return model.to(run.dtype).eval()


def n_active(model) -> int:
    """benchmarks/train.py's count (no input embedding, k/E of the routed experts), plus a tied head, whose
    matmul every token pays although its weight is the embedding's (baselines.md's 134.5M for SmolLM2)."""
    from train import active_params

    n = active_params(model)
    if getattr(model.config, "tie_word_embeddings", False):
        n += model.lm_head.weight.numel()
    return n


# ------------------------------------------------------------------------------------------------ 0. setup


def matmul_peak(run: Run) -> float:
    """benchmarks/train.py's measurement, at this script's sizes."""
    from train import matmul_peak as peak

    return peak(run.dev, run.dtype, n=256 if run.smoke else 8192, repeats=3 if run.smoke else 8, inner=10)


def graphs_match(run: Run) -> None:
    """Greedy tokens through the captured static step equal the eager loop's, fp32 (TF32 off): 7 requests
    through 4 rows, joining and leaving, chunked prefill, for a dense and an MLA/MoE model."""
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.graphs import EagerCapture, GraphRunner
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.models import build_model
    from nanoseek.models.config import DeepseekConfig, DenseConfig

    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4] * 13, [30], list(range(5, 16)), [2, 2], [7]]
    max_tokens = [12, 5, 40, 9, 20, 3, 60]
    cfgs = {
        "dense": DenseConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96),
        "mla+moe": DeepseekConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=12,
                                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                                  n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                  max_position_embeddings=96)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, cfg in cfgs.items():
            torch.manual_seed(0)
            model = build_model(cfg)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(std=0.3)
            model = model.to(run.dev).eval()
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
            plain = [c.token_ids for c in Engine(model, max_batch=4, prefill_chunk=4).generate(prompts, params)]
            eng = Engine(model, max_batch=4, prefill_chunk=4, cuda_graphs=True)
            if not run.cuda:  # CPU: the same runner with "capture" = keep the callable
                eng.runner = GraphRunner(model, backend=EagerCapture(), min_window=8)
            static = [c.token_ids for c in eng.generate(prompts, params)]
            kind = type(eng.runner).__name__
            shapes = getattr(eng.runner, "graphs", [])
            same = static == plain
            run.report.add("0. setup", f"- decode through {kind} ({len(shapes)} captured shapes) gives the eager "
                                       f"loop's greedy tokens, {name}: **{'yes' if same else 'NO'}**")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ------------------------------------------------------------------------------------------------ 1. decode


def decode_nanoseek(model, prompts, new: int, run: Run, graphs: bool, compile: bool = False):
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.graphs import EagerCapture, GraphRunner
    from nanoseek.engine.sampling import SamplingParams

    b = len(prompts)
    eng = Engine(model, max_batch=b, prefill_chunk=b * len(prompts[0]), cuda_graphs=graphs, compile=compile)
    if graphs and not run.cuda:
        eng.runner = GraphRunner(model, backend=EagerCapture())
    p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    eng.generate(prompts, p)  # warm-up at full length: captures every (batch, window) graph the run meets
    run.reset_memory()
    run.sync()
    outs = eng.generate(prompts, p)
    run.sync()
    ttft = max(o.first_token_s for o in outs)
    tokens = sum(len(o.token_ids) - 1 for o in outs)
    return tokens / (outs[0].total_s - ttft), run.peak_memory(), eng


def hf_model(cfg, run: Run):
    import transformers

    from nanoseek.models.config import DeepseekConfig, config_to_hf

    hf = config_to_hf(cfg)
    cls, conf = ((transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config)
                 if isinstance(cfg, DeepseekConfig) else (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    torch.manual_seed(0)
    return cls(conf.from_dict(hf)).to(run.dev, run.dtype).eval()


def decode_transformers(model, prompts, new: int, run: Run):
    ids = torch.tensor(prompts, device=run.dev)
    mask = torch.ones_like(ids)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, min_new_tokens=2, max_new_tokens=2, **kw)
        run.reset_memory()
        run.sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, min_new_tokens=1, max_new_tokens=1, **kw)
        run.sync()
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, min_new_tokens=new, max_new_tokens=new, **kw)
        run.sync()
        total = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    return len(prompts) * (n - 1) / (total - ttft), run.peak_memory()


@dataclass
class DecodeBench:
    run: Run
    prompt_len: int
    new: int
    model: object = None
    hf: object = None
    results: dict = field(default_factory=dict)

    def setup(self):
        cfg = smollm_config(self.run.smoke, self.prompt_len + self.new + 1)
        self.model = random_model(cfg, self.run)
        self.model.fuse()
        self.cfg = cfg

    def prompts(self, b: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(b)
        return torch.randint(3, self.cfg.vocab_size, (b, self.prompt_len), generator=g).tolist()

    def measure(self, b: int) -> None:
        name = "1. decode"
        if b == 1 and "eager" not in self.results:
            tps, mem, _ = decode_nanoseek(self.model, self.prompts(1), self.new, self.run, graphs=False)
            self.results["eager"] = tps
            self.run.report.add(name, f"| 1 | nanoseek eager (no graphs) | {tps:,.0f} | | {mem} |")
        try:
            tps, mem, _ = decode_nanoseek(self.model, self.prompts(b), self.new, self.run, graphs=True)
            self.run.report.add(name, f"| {b} | nanoseek, CUDA graphs | {tps:,.0f} | | {mem} |")
        except Exception as e:  # keep a nanoseek figure (eager) and the error to fix
            self.run.report.add(name, f"| {b} | nanoseek, CUDA graphs | FAILED: {type(e).__name__}: "
                                      f"{str(e)[:300]} | | |")
            traceback.print_exc()
            self.run.reset_memory()
            tps, mem, _ = decode_nanoseek(self.model, self.prompts(b), self.new, self.run, graphs=False)
            self.run.report.add(name, f"| {b} | nanoseek eager (graphs failed) | {tps:,.0f} | | {mem} |")
        if self.hf is None:
            self.hf = hf_model(self.cfg, self.run)
        ref, ref_mem = decode_transformers(self.hf, self.prompts(b), self.new, self.run)
        self.results[b] = (tps, ref)
        target = TARGETS.get(f"decode_b{b}")
        verdict = "" if target is None else (f" (target ≥ {target:,.0f}: {'met' if tps >= target else 'MISSED'})")
        if target is not None and tps < target:
            self.run.report.misses.append(f"decode_b{b}")
        self.run.report.add(name, f"| {b} | transformers generate | {ref:,.0f} | nanoseek {tps / ref:.1f}x"
                                  f"{verdict} | {ref_mem} |")


# ------------------------------------------------------------------------------------------------ 2. train


def train_configs(smoke: bool):
    """(name, config, batch, seq): SmolLM2 shape, small-moe, small-dense (its dense twin)."""
    from train import model_configs

    moe, dense, batch, seq = model_configs("cpu" if smoke else "gpu")
    smol = smollm_config(smoke, seq)
    if smoke:
        batch, seq = 2, 64
    return [("SmolLM2-135M shape", smol, batch, seq), ("configs/small-moe", moe, batch, seq),
            ("configs/small-dense", dense, batch, seq)]


def attn_flops_per_token(cfg, seq: int) -> float:
    """Causal attention's matmuls, forward + backward: 3 · L · H · (d_qk + d_v) · T per token."""
    from nanoseek.models.config import DeepseekConfig

    if isinstance(cfg, DeepseekConfig):
        dqk, dv = cfg.qk_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.head_dim
    return 3 * cfg.num_hidden_layers * cfg.num_attention_heads * (dqk + dv) * seq


def train_one(run: Run, cfg, batch: int, seq: int, which: str):
    from train import nanoseek_step, timed, transformers_step

    steps, warmup = (1, 1) if run.smoke else (8, 3)
    run.reset_memory()
    with tempfile.TemporaryDirectory() as tmp:
        if which == "transformers":
            step = transformers_step(cfg, run.dev, run.cuda, batch, seq)
        else:
            step = nanoseek_step(cfg, run.dev, run.cuda, batch, seq, False, tmp)
        dt = timed(step, run.dev, steps, warmup)
        mem = run.peak_memory()
        return batch * seq * steps / dt, mem, step


def train_section(run: Run, profile_misses: list):
    from nanoseek.models import build_model

    name = "2. training"
    dense_tps = moe_tps = None
    for label, cfg, batch, seq in train_configs(run.smoke):
        if run.left() < (10 if run.smoke else 45):
            run.report.add(name, f"| {label} | skipped: {run.left():.0f} s left | | | | |")
            continue
        with torch.device("meta"):
            n = n_active(build_model(cfg))
        attn = attn_flops_per_token(cfg, seq)
        row = {}
        for which in ("nanoseek", "transformers"):
            try:
                tps, mem, step = train_one(run, cfg, batch, seq, which)
            except Exception as e:
                run.report.add(name, f"| {label} | {which} | FAILED: {type(e).__name__}: {str(e)[:300]} | | | |")
                continue
            row[which] = tps
            mfu = 6 * n * tps / run.peak_flops
            with_attn = (6 * n + attn) * tps / run.peak_flops
            ratio = f"{tps / row['transformers']:.2f}x" if which == "transformers" and "nanoseek" in row else ""
            run.report.add(name, f"| {label} ({n / 1e6:.1f}M active) | {which} | {tps:,.0f} | {100 * mfu:.1f}% "
                                 f"({100 * with_attn:.1f}% with attention) | {mem} | {ratio} |")
            if which == "nanoseek":
                keep_step = step
            del step
        if "nanoseek" in row and "transformers" in row:
            x = row["nanoseek"] / row["transformers"]
            key = "train_moe_x" if "moe" in label else "train_dense_x"
            run.report.add(name, f"| {label} | nanoseek / transformers | **{x:.2f}x** (target ≥ {TARGETS[key]}x: "
                                 f"{'met' if x >= TARGETS[key] else 'MISSED'}) | | | |")
            if x < TARGETS[key]:
                profile_misses.append((f"train {label}", keep_step))
        if "nanoseek" in row:
            if "small-moe" in label:
                moe_tps = row["nanoseek"]
            if "small-dense" in label:
                dense_tps = row["nanoseek"]
    if moe_tps and dense_tps:
        run.report.add(name, f"\nnanoseek MoE tok/s ÷ dense twin tok/s (equal active parameters): "
                             f"**{moe_tps / dense_tps:.2f}** (target ≥ 0.85)")


# ------------------------------------------------------------------------------------------------ 3. GRPO


def synthetic_tokenizer(vocab: int):
    """A byte-level tokenizer with `vocab` ids (256 bytes, ChatML specials, then fillers that decode to
    `<fN>`), built offline: the H100 has no hub access and random weights need no real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = specials + sorted(byte_chars)
    words += [f"<f{i}>" for i in range(vocab - len(words))]
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=template)


def grpo_model_dir(run: Run, root: Path, a) -> Path:
    from nanoseek.weights.hf import save_hf

    cfg = smollm_config(run.smoke, 2048 if not run.smoke else 256)
    tok = synthetic_tokenizer(cfg.vocab_size)
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = None
    model = random_model(cfg, Run(torch.device("cpu"), True, run.report, 0)).float()
    path = save_hf(model, root / "hf", tokenizer=tok)
    tok.save_pretrained(path)
    return path


def grpo_nanoseek(path: Path, task, a, out: Path, run: Run) -> list[float]:
    from grpo import nanoseek_steps  # benchmarks/grpo.py, as on CPU

    return nanoseek_steps(str(path), task, out, group_size=a.group_size, prompts=a.prompts, steps=a.grpo_steps,
                          max_new_tokens=a.grpo_tokens, device=run.dev.type, cuda_graphs=run.cuda)


def grpo_trl(path: Path, task, a, out: Path, run: Run) -> list[float]:
    from grpo import trl_steps  # benchmarks/grpo.py: the same TRL configuration as the CPU comparison

    return trl_steps(path, task, out, group_size=a.group_size, prompts=a.prompts, steps=a.grpo_steps,
                     max_new_tokens=a.grpo_tokens, cuda=run.cuda)


def grpo_section(run: Run, a) -> None:
    from nanoseek.tasks import get_task

    name = "3. GRPO"
    task = get_task("arithmetic")
    n = a.group_size * a.prompts
    with tempfile.TemporaryDirectory(prefix="nanoseek-gpu-grpo-") as tmp:
        tmp = Path(tmp)
        path = grpo_model_dir(run, tmp, a)
        run.reset_memory()
        ours = grpo_nanoseek(path, task, a, tmp / "nanoseek", run)
        med = statistics.median(ours[1:] or ours)
        run.report.add(name, f"| nanoseek | {med:.2f} | {n / med:.1f} | {json.dumps([round(x, 2) for x in ours])} "
                             f"| {run.peak_memory()} | |")
        run.reset_memory()
        try:
            import trl
        except ImportError as e:
            run.report.add(name, f"| TRL GRPOTrainer | not run: {e} (carry .gpu_wheels, see the docstring) | | | | |")
            return
        theirs = grpo_trl(path, task, a, tmp / "trl", run)
        ref = statistics.median(theirs[1:] or theirs)
        x = ref / med
        if x < TARGETS["grpo_x"]:
            run.report.misses.append("grpo")
        run.report.add(name, f"| TRL {trl.__version__} GRPOTrainer (no vLLM) | {ref:.2f} | {n / ref:.1f} | "
                             f"{json.dumps([round(t, 2) for t in theirs])} | {run.peak_memory()} | "
                             f"nanoseek **{x:.2f}x** "
                             f"(target ≥ 5x: {'met' if x >= TARGETS['grpo_x'] else 'MISSED'}) |")


# ------------------------------------------------------------------------------------------------ 4. profiles


def top_kernels(run: Run, fn, k: int = 3) -> str:
    """The k kernels (CUDA) or operators (CPU) with the most self time over one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=acts) as prof:
        fn()
        run.sync()
    events = prof.key_averages()

    def dev_time(e):
        if run.cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    total = sum(dev_time(e) for e in events) or 1
    top = sorted(events, key=dev_time, reverse=True)[:k]
    return "; ".join(f"`{e.key[:80]}` {dev_time(e) / 1e3:.1f} ms ({100 * dev_time(e) / total:.0f}%)" for e in top)


# ------------------------------------------------------------------------------------------------ main


def block_host_missing() -> None:
    """Smoke only: make the packages the H100 lacks unimportable, so the smoke run proves the script and the
    nanoseek code it runs do not need them (trl/datasets are imported only by the TRL anchor, which is
    skipped when they are missing)."""
    for name in ("gguf", "fastapi", "math_verify", "uvicorn", "pydantic", "nh3", "latex2mathml", "mdit_py_plugins",
                 "llama_cpp", "openai"):
        sys.modules[name] = None  # `import name` now raises ImportError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, not figures")
    ap.add_argument("--budget-s", type=float, default=520.0, help="stop starting sections past this many seconds")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batches (default 1 256 16 64)")
    ap.add_argument("--grpo-steps", type=int, default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        block_host_missing()
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    date = time.strftime("%Y-%m-%d")
    # The chip's model number names the file (NVIDIA H100 80GB HBM3 -> h100), else the whole name.
    chip = next((w for w in gpu.split() if re.fullmatch(r"[A-Z]{1,2}\d{2,4}[A-Za-z]*", w)), gpu)
    slug = "smoke" if a.smoke else chip.lower() if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9.-]+", "-", slug.lower())
    import transformers

    report = Report(Path(a.out_dir) / f"gpu-{slug}-{date}.md", [
        f"# The GPU proof: nanoseek beside its anchors on {gpu}", "",
        (f"- GPU: {gpu}; torch {torch.__version__}; transformers {transformers.__version__}; Python "
         f"{platform.python_version()}; date {time.strftime('%Y-%m-%d %H:%M %Z')}"),
        f"- command: `python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- every figure's anchor ran in this same run on this same GPU; random weights, bf16"
        + (" (SMOKE: tiny shapes on CPU, fp32: the figures mean nothing)" if a.smoke else "")])
    run = Run(dev, a.smoke, report, a.budget_s)
    a.group_size, a.prompts = (2, 2) if a.smoke else (8, 8)
    a.grpo_tokens = 8 if a.smoke else 256
    a.grpo_steps = a.grpo_steps or (2 if a.smoke else 3)
    batches = a.batches or ([1, 4] if a.smoke else [1, 256, 16, 64])
    profile_misses: list = []

    with section(run, "0. setup", 0) as ok:
        if ok:
            run.peak_flops = matmul_peak(run)
            report.add("0. setup", f"- measured {'bf16' if run.cuda else 'fp32'} dense-GEMM peak: "
                                   f"**{run.peak_flops / 1e12:.3g} TFLOP/s** (the MFU denominator)")
            graphs_match(run)

    bench = DecodeBench(run, 16 if a.smoke else 128, 8 if a.smoke else 256)
    head = ["| batch | implementation | decode tok/s | vs transformers | peak GPU memory |", "|---|---|---|---|---|"]
    report.sections["1. decode"] = [(f"SmolLM2-135M shape, random weights, {bench.prompt_len}-token prompts, "
                                     f"{bench.new} new tokens, greedy, EOS ignored."), "", *head]
    done = set()

    def train_and_grpo() -> None:
        """Sections 2 and 3, run once: after decode's batch 1 and 256, before its other batches."""
        if done:
            return
        done.add(True)
        report.sections["2. training"] = [
            "batch " + ("2 x 64 (smoke)" if a.smoke else "16 x 2048") + ", bf16 autocast, fused AdamW. "
            "MFU = 6·N_active·tok/s ÷ the peak above.", "",
            "| model | implementation | tokens/s | MFU | peak GPU memory | ratio |", "|---|---|---|---|---|---|"]
        with section(run, "2. training", 30 if a.smoke else 60) as ok:
            if ok:
                train_section(run, profile_misses)
        report.sections["3. GRPO"] = [
            (f"{a.prompts} prompts x G={a.group_size}, ≤{a.grpo_tokens} completion tokens, beta 0, arithmetic "
             "prompts, synthetic tokenizer, random weights; median step after the first."), "",
            "| implementation | s / step | completions / s | per-step s | peak GPU memory | ratio |",
            "|---|---|---|---|---|---|"]
        with section(run, "3. GRPO", 20 if a.smoke else 90) as ok:
            if ok:
                grpo_section(run, a)

    for i, b in enumerate(batches):
        if i == 2:
            train_and_grpo()
        with section(run, "1. decode", 5 if a.smoke else 40) as ok:
            if ok:
                if bench.model is None:
                    bench.setup()
                bench.measure(b)
    train_and_grpo()

    # 4. profiles of missed targets (decode: 20 bare decode steps, graphed and eager; training: one step)
    for miss in list(report.misses):
        if miss.startswith("decode_b") and bench.model is not None:
            b = int(miss[len("decode_b"):])
            profile_misses[:0] = [(f"decode batch {b}, 20 steps, {'CUDA graphs' if g else 'eager'}",
                                   decode_steps(bench, b, graphs=g)) for g in (True, False)]
    for label, fn in (profile_misses[:1] if a.smoke else profile_misses):  # smoke: the profiler path, once
        with section(run, "4. profiles of missed targets", 10 if a.smoke else 25) as ok:
            if ok:
                report.add("4. profiles of missed targets", f"- {label}: {top_kernels(run, fn)}")
    if a.smoke and not profile_misses:  # exercise the profiler path once
        with section(run, "4. profiles of missed targets", 5) as ok:
            if ok:
                top = top_kernels(run, decode_steps(bench, 1, graphs=True))
                report.add("4. profiles of missed targets", f"- smoke check: {top}")
    profile_misses.clear()

    # 5. After the profiles, since it compiles the shared decode model's blocks in place.
    with section(run, "5. extra: decode with compiled blocks", 10 if a.smoke else 150) as ok:
        if ok and bench.model is not None:
            for i, b in enumerate([1] if a.smoke else [1, 256]):
                t = time.perf_counter()
                # compile once (the blocks stay compiled); CPU compile takes minutes: smoke skips it
                tps, mem, _ = decode_nanoseek(bench.model, bench.prompts(b), bench.new, run, graphs=True,
                                              compile=i == 0 and not a.smoke)
                report.add("5. extra: decode with compiled blocks",
                           f"- batch {b}: CUDA graphs + torch.compile'd blocks {tps:,.0f} tok/s "
                           f"(warm-up{' and compile' if i == 0 else ''} {time.perf_counter() - t:.0f} s), "
                           f"peak {mem}")
    with section(run, "6. extra: MoE decode", 10 if a.smoke else 40) as ok:
        if ok:
            moe_decode(run, a)
    report.add("end", f"- wall time {time.perf_counter() - run.t0:.0f} s")
    print(f"wrote {report.path}", file=sys.stderr)
    return 0


def decode_steps(bench: DecodeBench, b: int, graphs: bool):
    """A callable running 20 bare decode steps of batch `b` (the model's step without the loop around it),
    after a short generate that captures the graphs it replays."""
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.graphs import EagerCapture, GraphRunner
    from nanoseek.engine.sampling import SamplingParams

    run = bench.run
    eng = Engine(bench.model, max_batch=b, prefill_chunk=b * bench.prompt_len, cuda_graphs=graphs)
    if graphs and not run.cuda:
        eng.runner = GraphRunner(bench.model, backend=EagerCapture())
    eng.generate(bench.prompts(b), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    runner = eng.runner
    pos = bench.prompt_len + 8
    rows = runner.cache.rows(0, b) if isinstance(runner, GraphRunner) else \
        bench.model.new_cache(b, bench.prompt_len + bench.new + 1)

    def steps():
        with torch.inference_mode():
            for _ in range(20):
                runner.decode([5] * b, [pos] * b, rows)

    return steps


def moe_decode(run: Run, a) -> None:
    from train import model_configs

    moe = model_configs("cpu" if run.smoke else "gpu")[0]
    prompt, new, b = (16, 8, 4) if run.smoke else (128, 128, 64)
    moe.max_position_embeddings = prompt + new + 1
    moe.num_nextn_predict_layers = 0
    model = random_model(moe, run, std=0.02)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, moe.vocab_size, (b, prompt), generator=g).tolist()
    for graphs in (False, True):
        tps, mem, _ = decode_nanoseek(model, prompts, new, run, graphs=graphs)
        run.report.add("6. extra: MoE decode", f"- configs/small-moe, batch {b}, {prompt}+{new} tokens, "
                                               f"{'CUDA graphs (static all-experts MoE)' if graphs else 'eager'}: "
                                               f"{tps:,.0f} tok/s, peak {mem}")


if __name__ == "__main__":
    sys.exit(main())
