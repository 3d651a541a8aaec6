"""The `nanoseek` command: parses arguments, calls into the packages, maps errors to one line + exit code."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from nanoseek.errors import NanoseekError


def _model_args(p: argparse.ArgumentParser) -> None:
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
