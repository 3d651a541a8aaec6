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


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


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
                               compile=a.compile))


def cmd_models(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanoseek.weights.registry import list_builtins

    table = Table("name", "description", "file")
    for name, desc, path in list_builtins():
        table.add_row(name, desc, str(path) if path else "[red]not installed[/red]")
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
        print(f"[{out.prompt_tokens} prompt + {len(out.token_ids)} generated tokens, "
              f"{len(out.token_ids) / max(dt, 1e-9):.1f} tok/s, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from nanoseek.chat_cli import run_chat

    return run_chat(_session(a), _params(a), system=a.system, think=a.think == "on")


def cmd_convert(a) -> int:
    from nanoseek.weights.gguf import gguf_to_hf

    out = gguf_to_hf(a.input, a.output)
    print(f"wrote {out}")
    return 0


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
            name, source = (Path(spec).name if ("/" in spec or spec.endswith(".gguf")) else spec), spec
        if not name or not source:
            raise BadInputError(f"--model {spec!r}: expected NAME_OR_PATH or name=path")
        if name in out:
            raise BadInputError(f"--model: two models are served as {name!r}")
        out[name] = source
    return out


def cmd_serve(a) -> int:
    import ipaddress

    import uvicorn

    from nanoseek.engine.scheduler import Scheduler
    from nanoseek.serve.app import ServedModel, create_app
    from nanoseek.serve.store import Prices, Store
    from nanoseek.session import LoadOptions, Session

    specs = _parse_model_specs(a.model, "smollm2-135m")
    unknown = set(a.reasoning_model) - set(specs)
    if unknown:
        raise BadInputError(f"--reasoning-model {', '.join(sorted(unknown))}: not a served model "
                            f"({', '.join(specs)})")
    prices = Prices.load(a.prices) if a.prices else Prices()
    store = Store(a.data_dir)
    try:
        loopback = ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = a.host == "localhost"
    # Never run an open server where others can reach it: off loopback a key is required even before one
    # exists (create one with `nanoseek keys create`).
    require_auth = not loopback
    served = {}
    try:
        for name, source in specs.items():
            # Session does the load + fuse + quantize that chat uses; the server keeps its model and tokenizer.
            s = Session(LoadOptions(model=source, device=a.device, dtype=a.dtype, quant=a.quant,
                                    threads=a.threads, compile=a.compile))
            sched = Scheduler(s.model, s.tokenizer, max_batch=a.max_batch, max_len=a.max_len,
                              prefix_cache_tokens=a.prefix_cache_tokens).start()
            served[name] = ServedModel(name, s.tokenizer, sched, sched.max_len, reasoning=name in a.reasoning_model,
                                       prices=prices.for_model(name), root=source)
            print(f"loaded {name} from {source} in {s.load_s:.1f} s (context {sched.max_len}, "
                  f"{a.max_batch} rows)", file=sys.stderr)
        app = create_app(served, store, require_auth=require_auth, mirror_reasoning=a.mirror_reasoning)
        if require_auth and not store.any_keys():
            print("nanoseek: warning: no API keys exist yet; every request will get 401 until you run "
                  "`nanoseek keys create --name NAME`", file=sys.stderr)
        uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    finally:
        for m in served.values():
            m.scheduler.stop(timeout=5)
        store.close()
    return 0


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
    _sampling_args(p, temperature=0.7)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("convert", help="GGUF → Hugging Face safetensors directory")
    p.add_argument("input")
    p.add_argument("output")
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
