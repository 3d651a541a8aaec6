"""The `nanoseek` command: parses arguments, calls into the packages, maps errors to one line + exit code."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from nanoseek.errors import BadInputError, NanoseekError


def _model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:   # serve: repeatable, each NAME_OR_PATH or name=path; None until parsed means the default
        p.add_argument("--model", "-m", action="append", default=None,
                       help="model to serve (repeatable): a built-in name, a .gguf file, an HF directory, or "
                            "name=path to choose the served name; default smollm2-135m")
    else:
        p.add_argument("--model", "-m", default="smollm2-135m",
                       help="built-in name (see `nanoseek models`), a .gguf file, or an HF safetensors directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int8-group", "int4"],
                   help="weight-only quantization for decode (auto: int4 for ≤5-bit GGUF sources, else "
                        "int8-group, on CPU; none on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder blocks: faster decode after a ~20 s warm-up")
    p.add_argument("--speculative", default=None, action="append" if several else "store",
                   metavar="SPEC",
                   help="speculative decoding, lossless: mtp (the model's MTP module), ngram (prompt lookup, any "
                        "model), or draft=MODEL (a small model with the same tokenizer)"
                        + ("; NAME:SPEC for one served model, repeatable" if several else ""))
    p.add_argument("--draft-tokens", type=int, default=6, help="draft tokens verified per step, 1-7 (default 6)")
    p.add_argument("--no-native-decode", dest="native_decode", action="store_false",
                   help="decode quantized dense models through PyTorch instead of the fused native CPU step "
                        "(models/cpu_decode.py; used when the CPU has AVX-512 VNNI and g++ is installed)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: decode in static-shape steps replayed as CUDA graphs (one per batch "
                        "bucket); allocates the full KV cache up front. Ignored, with a warning, on CPU")


def _sampling_args(p: argparse.ArgumentParser, temperature: float | None) -> None:
    """temperature None: the model's recommended sampling (registry.sampling_defaults) for unset
    --temperature/--top-p/--top-k; a number: that temperature, top-p 1, top-k 0."""
    model_default = "default: the model's recommendation (see `nanoseek models`)"
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", "-t", type=float, default=temperature,
                   help="0 = greedy" + (f"; {model_default}" if temperature is None else ""))
    p.add_argument("--top-p", type=float, default=None if temperature is None else 1.0,
                   help=model_default if temperature is None else None)
    p.add_argument("--top-k", type=int, default=None if temperature is None else 0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _teacher_url_args(p: argparse.ArgumentParser, url_help: str) -> None:
    p.add_argument("--teacher-url", default=None, metavar="URL", help=url_help)
    p.add_argument("--teacher-key", default=None, help="API key for --teacher-url (Bearer)")
    p.add_argument("--teacher-model", default=None, help="model name to ask --teacher-url for")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="where keys and usage live (default: $NANOSEEK_HOME or ~/.nanoseek)")


def _params(a):
    from nanoseek.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, repetition_penalty=a.repetition_penalty,
                          seed=a.seed, stop=a.stop).validate()


def _session(a):
    from nanoseek.session import LoadOptions, Session

    return Session(LoadOptions(model=a.model, device=a.device, dtype=a.dtype, quant=a.quant, threads=a.threads,
                               compile=a.compile, speculative=a.speculative, draft_tokens=a.draft_tokens,
                               cuda_graphs=a.cuda_graphs, native_decode=a.native_decode))


def cmd_models(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanoseek.weights.registry import BUILTINS, list_builtins

    table = Table("name", "description", "chat sampling", "file")
    for name, desc, path in list_builtins():
        table.add_row(name, desc, BUILTINS[name].sampling.describe(), str(path) if path else "[red]not installed[/red]")
    Console().print(table)
    return 0


def cmd_generate(a) -> int:
    from nanoseek.chat_cli import print_stream

    params = _params(a)
    s = _session(a)
    t0 = time.perf_counter()
    if a.raw:
        out = s.complete([a.prompt], params, on_delta=lambda d: print(d.text, end="", flush=True))[0]
        print()
    else:
        think = {"on": True, "off": False, "auto": None}[a.think]
        out = print_stream(s, [{"role": "user", "content": a.prompt}], params, think).completion
    if a.stats:
        dt = time.perf_counter() - t0
        spec = ""
        st = s.engine.loop.stats()
        if st["speculative"]:
            rate = st["spec_acceptance_rate"]
            spec = (f", {st['speculative']} drafts accepted {0 if rate is None else rate:.0%}, "
                    f"{st['spec_tokens_per_step'] or 1:.2f} tokens per verify step")
        print(f"[{out.prompt_tokens} prompt + {len(out.token_ids)} generated tokens, "
              f"{len(out.token_ids) / max(dt, 1e-9):.1f} tok/s, finish: {out.finish_reason}{spec}]", file=sys.stderr)
    return 0


def _model_sampling(a) -> str:
    """Fill unset --temperature/--top-p/--top-k from the model's recommended sampling; returns a note on
    what is used and where it came from."""
    from nanoseek.weights.registry import sampling_defaults

    d = sampling_defaults(a.model)
    given = a.temperature is not None or a.top_p is not None or a.top_k is not None
    a.temperature = d.temperature if a.temperature is None else a.temperature
    a.top_p = d.top_p if a.top_p is None else a.top_p
    a.top_k = d.top_k if a.top_k is None else a.top_k
    used = f"temperature {a.temperature:g}, top-p {a.top_p:g}" + (f", top-k {a.top_k}" if a.top_k else "")
    return used + (" (your settings over " if given else " (") + f"the model's defaults from {d.source})"


def cmd_chat(a) -> int:
    from nanoseek.chat_cli import run_chat

    note = _model_sampling(a)
    params = _params(a)   # bad sampling arguments are refused before the model loads
    return run_chat(_session(a), params, system=a.system, think=a.think == "on", sampling_note=note)


def cmd_convert(a) -> int:
    from pathlib import Path

    if Path(a.output).suffix.lower() == ".gguf":  # anything we load → GGUF; otherwise GGUF → HF directory
        from nanoseek.weights.gguf_export import export_source

        print(export_source(a.input, a.output, quant=a.quant, tokenizer=a.tokenizer, ollama=a.ollama).summary())
        return 0
    from nanoseek.weights.gguf import gguf_to_hf

    out = gguf_to_hf(a.input, a.output)
    print(f"wrote {out}")
    return 0


def _gguf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m"],
                   help="GGUF tensor type (q4_k_m runs llama.cpp's quantizer: needs the bench extra)")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")


def _table(*columns, **kw):
    """A borderless rich table: the key and usage tables have nine columns and should fit 80 characters."""
    from rich import box
    from rich.table import Table

    return Table(*columns, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, **kw)


def _store(a):
    from nanoseek.serve.store import Store

    return Store(a.data_dir)


def cmd_keys_create(a) -> int:
    from rich.console import Console
    from rich.markup import escape

    with _store(a) as st:
        key_id, secret = st.create_key(a.name, rpm=a.rpm, tpm=a.tpm, budget_usd=a.budget)
    # The secret alone goes to stdout so `KEY=$(nanoseek keys create --name x)` works; the rest to stderr.
    err = Console(stderr=True)
    err.print(f"created key {key_id} ({escape(a.name)}) in {escape(str(st.path))}")
    print(secret, flush=True)
    err.print("[bold yellow]Save this secret now: only its hash is stored, so it won't be shown again.[/]")
    return 0


def cmd_keys_list(a) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Column

    with _store(a) as st:
        keys = st.list_keys()
        spent = {k.id: st.spent_usd(k.id) for k in keys}
    if not keys:
        print("no API keys (the server runs open until one exists; `nanoseek keys create --name NAME`)")
        return 0
    table = _table("id", "name", Column("prefix", no_wrap=True), "rpm", "tpm", "budget",
                   Column("spent", no_wrap=True), Column("created", no_wrap=True), "status")
    for k in keys:
        table.add_row(str(k.id), escape(k.name), k.prefix + "…", str(k.rpm or "-"), str(k.tpm or "-"),
                      "-" if k.budget_usd is None else f"${k.budget_usd:.2f}", f"${spent[k.id]:.4f}",
                      time.strftime("%Y-%m-%d", time.localtime(k.created_at)),
                      "[red]revoked[/red]" if k.revoked else "active")
    Console().print(table)
    return 0


def cmd_keys_revoke(a) -> int:
    with _store(a) as st:
        was_live = not st.find_key(a.key).revoked
        k = st.revoke_key(a.key)
    print(f"{'revoked' if was_live else 'already revoked'} key {k.id} ({k.name}, {k.prefix}…)")
    return 0


def cmd_usage(a) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Column

    with _store(a) as st:
        rows = st.usage_summary(key=a.key, since=a.since)
    if not rows:
        print("no usage recorded" + (f" since {a.since}" if a.since else ""))
        return 0
    counts = ("requests", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens",
              "reasoning_tokens")
    table = _table(Column("key", min_width=8), Column("model", no_wrap=True),
                   *(Column(h, justify="right") for h in ("reqs", "cache hit", "cache miss", "output", "reasoning",
                                                          "cost USD")), show_footer=True)
    for r in rows:
        key = "(no key)" if r.key_id is None else escape(r.key_name or str(r.key_id))
        table.add_row(key, escape(r.model), *(f"{getattr(r, c):,}" for c in counts), f"{r.cost_usd:.4f}")
    table.columns[0].footer = "total"
    for col, c in zip(table.columns[2:7], counts):
        col.footer = f"{sum(getattr(r, c) for r in rows):,}"
    table.columns[7].footer = f"{sum(r.cost_usd for r in rows):.4f}"
    Console().print(table)
    return 0


def _parse_model_specs(specs: list[str] | None, default: str) -> dict[str, str]:
    """--model values → {served name: what to load}. "name=path" names a model; a bare value serves under its
    own name (a built-in name, or the file/directory's name)."""
    from pathlib import Path

    out: dict[str, str] = {}
    for spec in specs or [default]:
        name, eq, source = spec.partition("=")
        if not eq:
            # A run's final/ is served under its run directory's name, so two fine-tunes can run side by side.
            from nanoseek.weights.registry import display_name

            name, source = (display_name(Path(spec)) if ("/" in spec or spec.endswith(".gguf")) else spec), spec
        if not name or not source:
            raise BadInputError(f"--model {spec!r}: expected NAME_OR_PATH or name=path")
        if name in out:
            raise BadInputError(f"--model: two models are served as {name!r}")
        out[name] = source
    return out


def serve_access(host: str):
    """(require_auth, GuardConfig) for a server bound to `host`. Never run an open server where others can
    reach it: off loopback (127.0.0.0/8, ::1, localhost) a key is required even before one exists (create one
    with `nanoseek keys create`). On loopback, without keys, the server trusts whoever reaches it, so it
    accepts only loopback Host names: a page elsewhere cannot reach it by DNS rebinding."""
    from nanoseek.serve.guard import GuardConfig, is_loopback_host

    loopback = is_loopback_host(host)
    return not loopback, GuardConfig(loopback_only=loopback)


def _speculative_per_model(values: list[str], served) -> dict[str, str]:
    """`--speculative SPEC` applies to every served model, `--speculative NAME:SPEC` to one (it wins)."""
    out: dict[str, str] = {}
    named = []
    for v in values:
        name, sep, spec = v.partition(":")
        if sep and not name.startswith("draft="):
            if name not in served:
                raise BadInputError(f"--speculative {v}: {name!r} is not a served model ({', '.join(served)})")
            named.append((name, spec))
        else:
            out.update(dict.fromkeys(served, v))
    out.update(named)
    return out


def cmd_serve(a) -> int:
    from nanoseek.engine.scheduler import Scheduler
    from nanoseek.serve.app import ServedModel, create_app
    from nanoseek.serve.server import ServerLimits, run
    from nanoseek.serve.store import Prices, Store, StoreLimits
    from nanoseek.session import LoadOptions, Session

    specs = _parse_model_specs(a.model, "smollm2-135m")
    unknown = set(a.reasoning_model) - set(specs)
    if unknown:
        raise BadInputError(f"--reasoning-model {', '.join(sorted(unknown))}: not a served model "
                            f"({', '.join(specs)})")
    given = {"header_timeout_s": a.header_timeout, "idle_timeout_s": a.idle_timeout,
             "max_connections": a.max_connections}
    try:
        limits = ServerLimits(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise BadInputError(f"serve: {e}") from None
    speculative = _speculative_per_model(a.speculative or [], specs)
    prices = Prices.load(a.prices) if a.prices else Prices()
    store = Store(a.data_dir, limits=StoreLimits(response_retention_s=a.response_retention_days * 86400))
    require_auth, guard = serve_access(a.host)
    served = {}
    try:
        for name, source in specs.items():
            # Session does the load + fuse + quantize that chat uses; the server keeps its model and tokenizer.
            s = Session(LoadOptions(model=source, device=a.device, dtype=a.dtype, quant=a.quant,
                                    threads=a.threads, compile=a.compile, speculative=speculative.get(name),
                                    draft_tokens=a.draft_tokens, cuda_graphs=a.cuda_graphs,
                                    native_decode=a.native_decode))
            sched = Scheduler(s.model, s.tokenizer, max_batch=a.max_batch, max_len=a.max_len,
                              prefix_cache_tokens=a.prefix_cache_tokens, drafter=s.drafter,
                              draft_tokens=a.draft_tokens,
                              runner=s.engine.runner if a.cuda_graphs else None).start()
            served[name] = ServedModel(name, s.tokenizer, sched, sched.max_len, reasoning=name in a.reasoning_model,
                                       prices=prices.for_model(name), root=source)
            print(f"loaded {name} from {source} in {s.load_s:.1f} s (context {sched.max_len}, "
                  f"{a.max_batch} rows)", file=sys.stderr)
        app = create_app(served, store, require_auth=require_auth, mirror_reasoning=a.mirror_reasoning,
                         guard=guard, docs=a.docs, isolate_prefix_cache=not a.shared_prefix_cache)
        if require_auth and not store.any_keys():
            print("nanoseek: warning: no API keys exist yet; every request will get 401 until you run "
                  "`nanoseek keys create --name NAME`", file=sys.stderr)
        run(app, a.host, a.port, limits)
    finally:
        for m in served.values():
            m.scheduler.stop(timeout=5)
        store.close()
    return 0


def cmd_data_prepare(a) -> int:
    from nanoseek.train.prepare import prepare

    m = prepare(a.inputs, a.tokenizer, a.out, val_fraction=a.val_fraction, text_field=a.text_field,
                workers=a.workers, shard_tokens=a.shard_tokens, doc_split=a.doc_split, fim_rate=a.fim_rate)
    total = 0
    for split, entries in m["splits"].items():
        tokens, docs = sum(e["tokens"] for e in entries), sum(e["docs"] for e in entries)
        total += tokens
        print(f"{split}: {tokens:,} tokens, {docs:,} documents, {len(entries)} shard(s)")
    print(f"wrote {a.out} ({m['dtype']}, vocab {m['vocab_size']:,}) in {m['seconds']:.1f} s, "
          f"{total / max(m['seconds'], 1e-9):,.0f} tokens/s")
    return 0


def cmd_tokenizer_train(a) -> int:
    from nanoseek.train.prepare import iter_documents
    from nanoseek.train.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(iter_documents(a.inputs, a.text_field, a.doc_split), a.vocab_size, a.out,
                          min_frequency=a.min_frequency)
    print(f"wrote {a.out}: {len(tok):,} tokens in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_pretrain(a) -> int:
    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import pretrain

    import os

    last = pretrain(load_config(a.config, a.set))
    ev = last.get("eval", {})
    if "eval_ce" in ev and os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        print(f"step {ev['step']}: held-out loss {ev['eval_ce']:.4f}")
    return 0


def cmd_export(a) -> int:
    from nanoseek.train.checkpoint import export_hf
    from nanoseek.train.finetune import weights_dtype

    if a.format == "gguf" or (a.format == "auto" and a.out.lower().endswith(".gguf")):
        from nanoseek.weights.gguf_export import export_source

        print(export_source(a.checkpoint, a.out, quant=a.quant, tokenizer=a.tokenizer, ollama=a.ollama).summary())
        return 0

    out = export_hf(a.checkpoint, a.out, dtype=weights_dtype(a.dtype), tokenizer=a.tokenizer)
    print(f"wrote {out}")
    return 0


def _text_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt / .jsonl (optionally .gz) / .parquet files, directories of them, "
                        "or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / .parquet / hf rows")
    p.add_argument("--doc-split", choices=["none", "blank-lines"], default="none",
                   help="none: a .txt file or a row is one document; blank-lines: split them into paragraphs")


def _task_kwargs(a) -> dict:
    """--task-arg KEY=VALUE pairs → constructor kwargs, values read as JSON when they parse (3, 0.5, true);
    --data, when given, as `path`."""
    import json

    out = {}
    for pair in a.task_arg:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise BadInputError(f"--task-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    if a.data is not None:
        out["path"] = a.data
    return out


def _task(a):
    """The task named by --task, built from --task-arg pairs and --data, with --tools when the command has
    them (multi-turn tool episodes, tasks/tools.py); also returns those arguments."""
    from nanoseek.tasks import get_task

    kwargs = _task_kwargs(a)
    task = get_task(a.task, **kwargs)
    if getattr(a, "tools", None):
        from nanoseek.tasks.tools import ToolTask

        task = ToolTask(task, tuple(t.strip() for t in a.tools.split(",") if t.strip()), a.max_turns)
    return task, kwargs


def cmd_eval(a) -> int:
    from nanoseek.evaluate import EvalConfig, evaluate, print_report, write_report

    task, kwargs = _task(a)
    cfg = EvalConfig(samples=a.samples, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                     greedy=not a.no_greedy, seed=a.seed, template=a.template, open_think=not a.no_open_think,
                     split=a.split, limit=a.limit, keep_samples=a.keep_samples).validate()
    if a.batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {a.batch_size}")
    problems = task.problems(cfg.split, cfg.limit)
    s = _session(a)
    s.engine.max_batch = a.batch_size
    report = evaluate(s.engine, s.tokenizer, task, cfg, problems, model_name=s.name, task_args=kwargs)
    print_report(report)
    if a.out:
        print(f"wrote {write_report(report, a.out)}")
    return 0


def _finetune_config(a, lr: float, schedule: str, log_every: int):
    """The TrainConfig of a fine-tuning command (sft, grpo, distill) from its `_run_args`."""
    from nanoseek.train.finetune import finetune_config

    return finetune_config(a.out, steps=a.steps, lr=lr, schedule=schedule, warmup_steps=a.warmup_steps,
                           grad_accum=a.grad_accum, seed=a.seed, device=a.device, ckpt_every=a.ckpt_every,
                           log_every=log_every, plots=not a.no_plots, log=a.log, final_dtype=a.dtype)


def cmd_sft(a) -> int:
    from nanoseek.train.lora import LoRAConfig
    from nanoseek.train.sft import run_sft

    lora = None
    if a.lora_r is not None:
        targets = tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()) if a.lora_targets else None
        lora = LoRAConfig(r=a.lora_r, alpha=a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora_r,
                          targets=targets, dropout=a.lora_dropout, seed=a.seed).validate()
    elif a.lora_targets or a.lora_alpha is not None or a.lora_dropout:
        raise BadInputError("--lora-alpha/--lora-targets/--lora-dropout need --lora-r (the LoRA rank)")
    # Adapters start at zero and are few: LoRA takes a larger lr than full fine-tuning (Hu et al. 2021 used
    # 2e-4 to 5e-4 for GPT-2/RoBERTa adapters).
    lr = a.lr if a.lr is not None else (2e-4 if lora else 2e-5)
    tcfg = _finetune_config(a, lr, "cosine", log_every=10)
    last = run_sft(a.model, a.data, tcfg, seq_len=a.seq_len, batch_size=a.batch_size, lora=lora)
    print(f"step {last.get('train', {}).get('step')}: loss {last.get('train', {}).get('loss', float('nan')):.4f}; "
          f"model written to {a.out}/final")
    return 0


def cmd_grpo(a) -> int:
    from nanoseek.train.grpo import GRPOConfig, run_grpo

    task, kwargs = _task(a)
    gcfg = GRPOConfig(group_size=a.group_size, prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, top_p=a.top_p, inner_updates=a.inner_updates, eps_low=a.eps_low,
                      eps_high=a.eps_high, beta=a.beta, scale_rewards=a.scale_rewards, aggregation=a.aggregation,
                      dynamic_sampling=a.dynamic_sampling, template=a.template, open_think=not a.no_open_think,
                      gen_batch=a.gen_batch, seed=a.seed, top_k=a.top_k, unbiased_kl=a.unbiased_kl,
                      offpolicy_threshold=a.offpolicy_mask, keep_sampling_mask=a.keep_sampling_mask,
                      keep_routing=a.keep_routing).validate()
    # Full fine-tuning of a trained model: constant lr after a short warmup and no weight decay (DAPO, Dr. GRPO).
    tcfg = _finetune_config(a, a.lr, "constant", log_every=1)
    last = run_grpo(a.model, task, gcfg, tcfg)
    rec = last.get("train", {})
    print(f"step {rec.get('step')}: reward {rec.get('reward', float('nan')):.3f}, accuracy "
          f"{rec.get('accuracy', float('nan')):.3f}; model written to {a.out}/final")
    return 0


def cmd_distill_traces(a) -> int:
    from nanoseek.train.distill import generate_traces, generate_traces_api

    task, kwargs = _task(a)
    problems = task.problems("train", a.limit)
    sampling = {"samples": a.samples, "max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p,
                "keep": a.keep, "seed": a.seed, "open_think": not a.no_open_think}
    if a.teacher_url:
        counts = generate_traces_api(a.teacher_url, a.teacher_key, a.teacher_model, task, problems, a.out,
                                     **sampling)
    else:
        s = _session(a)
        s.engine.max_batch = a.batch_size
        counts = generate_traces(s.engine, s.tokenizer, task, problems, a.out, **sampling)
    print(f"kept {counts['kept']} of {counts['completions']} completions ({counts['duplicates']} duplicates "
          f"dropped), covering {counts['problems_covered']} of {counts['problems']} problems; wrote {a.out}")
    return 0


def cmd_distill_train(a) -> int:
    from nanoseek.train.distill import run_distill

    last = run_distill(a.teacher, a.model, a.data, _finetune_config(a, a.lr, "cosine", log_every=10),
                       seq_len=a.seq_len, batch_size=a.batch_size, alpha=a.alpha, temperature=a.temperature)
    rec = last.get("train", {})
    print(f"step {rec.get('step')}: kl {rec.get('kl', float('nan')):.4f}; model written to {a.out}/final")
    return 0


def cmd_distill_onpolicy(a) -> int:
    from nanoseek.train.onpolicy import ChatPrompts, OnPolicyConfig, run_onpolicy

    if a.task is None and a.data is None:
        raise BadInputError("give the prompts with --task NAME or --data CHAT.jsonl")
    task = _task(a)[0] if a.task else ChatPrompts(a.data)
    cfg = OnPolicyConfig(prompts_per_step=a.prompts_per_step, samples=a.samples, max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, top_p=a.top_p, template=a.template,
                         open_think=not a.no_open_think, gen_batch=a.gen_batch, seed=a.seed).validate()
    last = run_onpolicy(a.teacher, a.model, task, cfg, _finetune_config(a, a.lr, "constant", log_every=1),
                        teacher_url=a.teacher_url, teacher_key=a.teacher_key, teacher_model=a.teacher_model)
    rec = last.get("train", {})
    print(f"step {rec.get('step')}: reverse kl {rec.get('kl', float('nan')):.4f}; model written to {a.out}/final")
    return 0


def cmd_recipe_r1(a) -> int:
    import dataclasses

    from nanoseek.train.recipe import DEFAULT_TASK_ARGS, preset, run_recipe, with_overrides

    kwargs = _task_kwargs(a)
    if not a.task_arg:
        kwargs = {**DEFAULT_TASK_ARGS.get(a.task, {}), **kwargs}
    cfg = preset(a.preset)
    cfg = dataclasses.replace(cfg, model=a.model, task=a.task, task_args=kwargs, out_dir=a.out or f"runs/r1-{a.task}",
                              device=a.device, seed=a.seed, plots=not a.no_plots, log=a.log)
    given = {"cold_start.data": a.sft_data, "cold_start.steps": a.sft_steps, "rl.steps": a.grpo_steps,
             "eval.problems": a.eval_problems, "distill.enabled": True if a.distill else None}
    given = {k: v for k, v in given.items() if v is not None}
    for text in a.set:
        from nanoseek.train.config import parse_override

        keys, value = parse_override(text)
        given[".".join(keys)] = value
    cfg = with_overrides(cfg, **given)
    card = run_recipe(cfg)
    print(card.read_text())
    print(f"wrote {card}")
    return 0


def _task_args(p: argparse.ArgumentParser) -> None:
    """--task, --data, --task-arg: what `_task` builds a task from (eval, grpo, distill traces)."""
    p.add_argument("--task", required=True, help="arithmetic, countdown, gsm8k or jsonl")
    p.add_argument("--data", default=None, help="jsonl file, or a folder with train.jsonl/test.jsonl (gsm8k, jsonl)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="task setting, e.g. digits=3 (repeatable)")


def _tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="multi-turn tool episodes with these tools: calculator, python (comma-separated; "
                        "python runs in a limited separate process, see nanoseek/sandbox.py)")
    p.add_argument("--max-turns", type=int, default=4, help="model turns per tool episode")


def _run_args(p: argparse.ArgumentParser, *, steps: int, lr: float | None, warmup: int, ckpt_every: int,
              lr_help: str = "peak lr") -> None:
    """The run settings every fine-tuning command shares (read back by `_finetune_config`)."""
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, final/ (HF format)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--warmup-steps", type=int, default=warmup)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the final/ weights (bfloat16 halves a 135M fine-tune's 517 MB); training and "
                        "checkpoints stay fp32")
    _log_arg(p)


def _log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", choices=["jsonl", "tensorboard", "wandb"], default="jsonl",
                   help="also log to TensorBoard or Weights & Biases (offline unless WANDB_MODE is set), beside "
                        "metrics.jsonl; needs `pip install 'nanoseek[tracking]'`")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-style models: run, chat, convert.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("models", help="list built-in models")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("generate", help="one-shot generation")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat template")
    p.add_argument("--think", choices=["auto", "on", "off"], default="auto", help="reasoning mode (R1 style)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    _model_args(p)
    _sampling_args(p, temperature=0.0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (/think, /reset, /system, /exit)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", choices=["on", "off"], default="off")
    _model_args(p)
    _sampling_args(p, temperature=None)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("convert", help="GGUF → Hugging Face directory, or (OUTPUT ending .gguf) a model → GGUF")
    p.add_argument("input", help="a .gguf file, or for a .gguf OUTPUT: an HF directory, .gguf or built-in name")
    p.add_argument("output", help="an HF directory to write, or a .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer for a GGUF output (default: the input's own)")
    _gguf_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("serve", help="DeepSeek/OpenAI-compatible HTTP API with continuous batching")
    _model_args(p, several=True)
    p.add_argument("--host", default="127.0.0.1", help="off loopback an API key is always required")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--reasoning-model", action="append", default=[], metavar="NAME",
                   help="an R1-style model: its <think> block goes to reasoning_content (repeatable)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (cache rows per model)")
    p.add_argument("--max-len", type=int, default=4096, help="context served per request (prompt + output)")
    p.add_argument("--prefix-cache-tokens", type=int, default=16384,
                   help="tokens of earlier requests' KV kept for reuse by prompts that start the same (0: off)")
    p.add_argument("--prices", default=None, help="a .toml/.json price file (USD per 1M tokens per model)")
    p.add_argument("--mirror-reasoning", action="store_true",
                   help="also send reasoning as `reasoning` (vLLM/Ollama's field) besides reasoning_content")
    # Defaults (None here) are ServerLimits' (serve/server.py), which the parser does not import: it pulls in
    # the server's dependencies.
    p.add_argument("--header-timeout", type=float, default=None, metavar="S",
                   help="seconds a client has to send a request's headers before the connection is closed "
                        "(default 10)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="seconds a kept-alive connection may wait for its next request (default 5)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections beyond which new ones get an immediate 503; kept below the "
                        "open-file limit (default 1000)")
    p.add_argument("--shared-prefix-cache", action="store_true",
                   help="let every key's prompts hit every other key's cached prefixes (faster for keys that "
                        "share system prompts); by default each key's cache is its own, so neither usage nor "
                        "latency tells one key what another sent")
    p.add_argument("--docs", action="store_true",
                   help="serve the interactive API docs at /docs and /redoc; their pages load Swagger UI and "
                        "ReDoc scripts from a CDN into the origin where the web app keeps your API key, so they "
                        "are off by default (/openapi.json is always served)")
    p.add_argument("--response-retention-days", type=float, default=30.0, metavar="DAYS",
                   help="how long POST /v1/responses keeps a stored response (store: true, the default) for "
                        "GET and previous_response_id; stored responses count against the key's storage quota")
    _store_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("keys", help="API keys for `nanoseek serve`: create, list, revoke")
    keys = p.add_subparsers(dest="keys_cmd", required=True)
    k = keys.add_parser("create", help="create a key and print its secret (once)")
    k.add_argument("--name", required=True, help="who or what the key is for")
    k.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    k.add_argument("--tpm", type=int, default=None, help="tokens per minute (default: unlimited)")
    k.add_argument("--budget", type=float, default=None, metavar="USD", help="spending cap (default: unlimited)")
    _store_args(k)
    k.set_defaults(fn=cmd_keys_create)
    k = keys.add_parser("list", help="list keys (never their secrets)")
    _store_args(k)
    k.set_defaults(fn=cmd_keys_list)
    k = keys.add_parser("revoke", help="revoke a key by id or prefix")
    k.add_argument("key", metavar="ID_OR_PREFIX")
    _store_args(k)
    k.set_defaults(fn=cmd_keys_revoke)

    p = sub.add_parser("usage", help="tokens and cost served, per key and model")
    p.add_argument("--key", default=None, help="only this key (id or prefix)")
    p.add_argument("--since", default=None, help="a date (2026-11-01) or an age (7d, 12h, 30m)")
    _store_args(p)
    p.set_defaults(fn=cmd_usage)

    p = sub.add_parser("eval", help="accuracy on a task: pass@1 over k samples, maj@k, greedy, with 95%% CIs")
    _task_args(p)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--samples", "-k", type=int, default=4, help="samples per problem (pass@1 averages them)")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--temperature", "-t", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="sampling seeds derive from it, the problem id and k")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy completion per problem")
    p.add_argument("--template", choices=["chat", "r1-zero", "plain"], default="chat",
                   help="chat: the model's chat template; r1-zero: DeepSeek-R1-Zero's plain prompt (base models)")
    p.add_argument("--no-open-think", action="store_true", help="don't end the prompt with <think>")
    p.add_argument("--batch-size", type=int, default=64, help="completions decoded together")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON")
    p.add_argument("--keep-samples", action="store_true", help="put every completion's text in the JSON")
    _model_args(p)
    _tool_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat jsonl ({messages}); loss on replies only")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, GGUF file or HF directory")
    p.add_argument("--data", required=True, help="jsonl: one {\"messages\": [...]} per line")
    _run_args(p, steps=200, lr=None, warmup=10, ckpt_every=100, lr_help="peak lr (default 2e-5; 2e-4 with --lora-r)")
    p.add_argument("--lora-r", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R instead of every weight; merged into final/")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (update × alpha/r; "
                   "default 2·r)")
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated linear names (default q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                        "down_proj — those the model has)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per micro-batch")
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("distill", help="R1-style distillation: teacher traces (then `sft`), or logit distillation")
    dist = p.add_subparsers(dest="distill_cmd", required=True)
    d = dist.add_parser("traces", help="sample a teacher on a task, keep correct well-formed replies as chat jsonl")
    _model_args(d)
    _task_args(d)
    d.add_argument("--limit", type=int, default=None, help="train problems to use (required for generated tasks)")
    d.add_argument("--samples", type=int, default=4, help="completions per problem")
    d.add_argument("--max-tokens", type=int, default=1024)
    d.add_argument("--temperature", type=float, default=0.6)
    d.add_argument("--top-p", type=float, default=0.95)
    d.add_argument("--keep", choices=["correct", "formatted"], default="correct")
    d.add_argument("--no-open-think", action="store_true")
    d.add_argument("--batch-size", type=int, default=64, help="completions decoded together")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="chat jsonl for `nanoseek sft --data`")
    _teacher_url_args(d, "an OpenAI-compatible API as the teacher instead of --model (e.g. https://api.deepseek.com "
                         "or http://127.0.0.1:8000/v1); traces are text, so any vocabulary works")
    d.set_defaults(fn=cmd_distill_traces)
    d = dist.add_parser("train", help="train a student toward a teacher's next-token distributions on chat jsonl")
    d.add_argument("--teacher", required=True, help="built-in name, GGUF file or HF directory (same tokenizer)")
    d.add_argument("--model", required=True, help="the student")
    d.add_argument("--data", required=True, help="chat jsonl (e.g. from `distill traces`)")
    _run_args(d, steps=200, lr=2e-5, warmup=10, ckpt_every=100)
    d.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term (1 − alpha on plain CE)")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--batch-size", type=int, default=8)
    d.set_defaults(fn=cmd_distill_train)
    d = dist.add_parser("onpolicy", help="on-policy distillation (DeepSeek-V4): the student samples, a teacher "
                                         "with the same tokenizer scores its tokens; per-token reverse KL")
    d.add_argument("--teacher", default=None, help="built-in name, GGUF file or HF directory (same tokenizer)")
    _teacher_url_args(d, "instead of --teacher: a nanoseek server (e.g. http://127.0.0.1:8000) scoring with its "
                         "top-20 prompt log-probs")
    d.add_argument("--model", required=True, help="the student")
    d.add_argument("--task", default=None, help="prompts from a task: arithmetic, countdown, gsm8k or jsonl")
    d.add_argument("--data", default=None, help="with --task: its jsonl file or folder; alone: chat jsonl whose "
                                                "messages (before the last reply) are the prompts")
    d.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="task setting, e.g. digits=3 (repeatable)")
    _run_args(d, steps=100, lr=1e-5, warmup=0, ckpt_every=50)
    d.add_argument("--prompts-per-step", type=int, default=8)
    d.add_argument("--samples", type=int, default=1, help="student completions per prompt")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--template", choices=["chat", "r1-zero", "plain"], default="chat")
    d.add_argument("--no-open-think", action="store_true")
    d.add_argument("--gen-batch", type=int, default=64, help="completions decoded together")
    d.set_defaults(fn=cmd_distill_onpolicy)

    p = sub.add_parser("grpo", help="GRPO reasoning RL with a task's rule-based reward (R1 recipe)")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, GGUF file or HF directory")
    _task_args(p)
    _run_args(p, steps=100, lr=1e-6, warmup=0, ckpt_every=50)   # steps: rollouts × inner updates
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--inner-updates", type=int, default=1, help="μ: optimizer steps per rollout")
    p.add_argument("--eps-low", type=float, default=0.2)
    p.add_argument("--eps-high", type=float, default=None, help="clip-higher (DAPO: 0.28); default eps-low")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL weight (0: no reference model)")
    p.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group")
    p.add_argument("--aggregation", choices=["grpo", "dapo", "dr_grpo"], default="dapo")
    p.add_argument("--dynamic-sampling", action="store_true", help="drop groups whose rewards are all equal")
    p.add_argument("--template", choices=["chat", "r1-zero", "plain"], default="chat")
    p.add_argument("--no-open-think", action="store_true")
    p.add_argument("--gen-batch", type=int, default=64, help="completions decoded together")
    p.add_argument("--top-k", type=int, default=0, help="rollout top-k (0: off)")
    _tool_args(p)
    v32 = p.add_argument_group("DeepSeek-V3.2 stability options (off by default)")
    v32.add_argument("--unbiased-kl", action="store_true", help="KL term ρ·k3, ρ = π_θ/π_old (with --beta > 0)")
    v32.add_argument("--offpolicy-mask", type=float, default=None, metavar="DELTA",
                     help="drop negative-advantage sequences whose mean log(π_old/π_θ) exceeds DELTA")
    v32.add_argument("--keep-sampling-mask", action="store_true",
                     help="log-probs over the rollout's top-p/top-k set (recomputed from π_old's logits)")
    v32.add_argument("--keep-routing", action="store_true",
                     help="MoE policies: replay the rollout's expert choices in the loss forward")
    p.set_defaults(fn=cmd_grpo)

    p = sub.add_parser("recipe", help="whole training recipes in one command (r1: cold-start SFT → GRPO → report)")
    rec = p.add_subparsers(dest="recipe_cmd", required=True)
    r = rec.add_parser("r1", help="DeepSeek-R1's recipe: cold-start SFT on format data, then GRPO; the same eval "
                                  "before and after each stage; a report card (report.md + PNGs). Re-run the "
                                  "same command to continue an interrupted run")
    r.add_argument("--model", default="smollm2-135m", help="built-in name, GGUF file or HF directory")
    _task_args(r)
    r.add_argument("--out", default=None, help="recipe directory (default runs/r1-TASK)")
    r.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: under 15 min on 2 cores for SmolLM2-135M; gpu: a real run on one GPU")
    r.add_argument("--sft-data", default=None, help="chat jsonl for the cold start (default: worked solutions "
                                                    "of the task's train problems)")
    r.add_argument("--sft-steps", type=int, default=None, help="cold-start SFT steps (preset's by default)")
    r.add_argument("--grpo-steps", type=int, default=None, help="GRPO rollouts (preset's by default)")
    r.add_argument("--eval-problems", type=int, default=None, help="held-out problems per eval (preset's)")
    r.add_argument("--distill", action="store_true",
                   help="then distil the GRPO model into a fresh copy of the base model two ways at the same "
                        "student compute, SFT on its traces and on-policy distillation, each evaluated (settings: "
                        "--set distill.KEY=VALUE); may be added to a finished run")
    r.add_argument("--device", default="auto")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one recipe setting, e.g. --set rl.grpo.group_size=8, --set cold_start.lr=2e-5, "
                        "--set eval.protocol.samples=4 (see nanoseek/train/recipe.py; repeatable)")
    r.add_argument("--no-plots", action="store_true")
    _log_arg(r)
    r.set_defaults(fn=cmd_recipe_r1)

    p = sub.add_parser("data", help="training data: token shards")
    data = p.add_subparsers(dest="data_cmd", required=True)
    d = data.add_parser("prepare", help="tokenize text / jsonl / parquet / hf datasets into token shards")
    _text_input_args(d)
    d.add_argument("--tokenizer", required=True,
                   help="a built-in model name, a .gguf file, or a tokenizer directory (`nanoseek tokenizer train`)")
    d.add_argument("--out", required=True, help="output directory (meta.json + shards)")
    d.add_argument("--val-fraction", type=float, default=0.005, help="share of documents (or tokens) held out")
    d.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU)")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file at most")
    d.add_argument("--fim-rate", type=float, default=0.1,
                   help="share of documents in fill-in-the-middle form (DeepSeek-V3: 0.1); tokenizers with FIM "
                        "tokens only")
    d.set_defaults(fn=cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with DeepSeek's special tokens")
    tk = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tk.add_parser("train", help="train on text files and save a directory AutoTokenizer loads")
    _text_input_args(t)
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge")
    t.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="pretrain a model from a TOML config (under torchrun for several GPUs)")
    p.add_argument("--config", required=True, help="a TOML file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=3e-4 (repeatable)")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("export", help="training checkpoint → Hugging Face directory (transformers, nanoseek serve) "
                                      "or GGUF file (llama.cpp, Ollama)")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint; for "
                                      "gguf, a fine-tuning run's final/ when it has one)")
    p.add_argument("out", metavar="OUT", help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--format", choices=["auto", "hf", "gguf"], default="auto",
                   help="auto: gguf when OUT ends in .gguf, else a Hugging Face directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="hf format only")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run recorded)")
    _gguf_args(p)
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NanoseekError as e:
        if args.debug:
            traceback.print_exc()
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
