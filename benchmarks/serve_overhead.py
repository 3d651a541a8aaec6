"""What HTTP costs the engine: the same workload through `nanoseek serve` and on its Scheduler in-process.

`nanoseek serve` runs the engine loop in its own thread and the HTTP/SSE work on uvicorn's asyncio loop in the
same process (serve/bridge.py). A separate engine process would isolate the loop from the GIL at the price of
shipping every token across a pipe. This script measures whether the thread costs anything worth that: output
tok/s of C concurrent streams (fixed prompt and reply lengths, EOS ignored) through HTTP, and of C threads
submitting the same number of requests straight to a Scheduler over the same model, quantization and batch.

    python benchmarks/serve_overhead.py [--concurrency 16] [--requests 32] [--prompt-tokens 128] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serve import machine_line, run_level, served_model, start_server, tokens_per_word, warm_up, write_atomic


def in_process(model: str, concurrency: int, n: int, prompt_tokens: int, max_tokens: int, seed: int) -> float:
    """Output tok/s of n requests from `concurrency` threads on a Scheduler loaded the way serve loads it."""
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.engine.scheduler import Scheduler
    from nanoseek.session import LoadOptions, Session

    s = Session(LoadOptions(model=model))
    sched = Scheduler(s.model, s.tokenizer, max_batch=concurrency, max_len=prompt_tokens + max_tokens + 64).start()
    rng = random.Random(seed)
    vocab = s.engine.vocab_size
    prompts = iter([[rng.randrange(100, vocab) for _ in range(prompt_tokens)] for _ in range(n)])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    lock, done = threading.Lock(), []

    def worker():
        while True:
            with lock:
                p = next(prompts, None)
            if p is None:
                return
            done.append(len(sched.submit(p, params).result().token_ids))

    try:
        warm = [sched.submit([5, 6, 7], SamplingParams(max_tokens=8)) for _ in range(min(4, concurrency))]
        for h in warm:
            h.result()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - t0)
    finally:
        sched.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    direct = in_process(a.model, a.concurrency, a.requests, a.prompt_tokens, a.max_tokens, a.seed)
    max_len = a.prompt_tokens * 2 + a.max_tokens + 64   # chat template and word-salad slack
    with tempfile.TemporaryDirectory(prefix="nanoseek-overhead-") as tmp:
        server = start_server(["--model", a.model, "--max-batch", str(a.concurrency), "--max-len", str(max_len)],
                              Path(tmp))
        try:
            model, _ = served_model(server.url, {})
            words = max(1, round(a.prompt_tokens / tokens_per_word(server.url, {}, model)))
            asyncio.run(warm_up(server.url, {}, model, min(4, a.concurrency)))
            level = asyncio.run(run_level(server.url, {}, model, a.concurrency, a.requests, words, a.max_tokens,
                                          a.seed))
        finally:
            server.stop()
    http = level.out_tok_s
    table = Table(title=f"{a.concurrency} streams, {a.requests} requests, {a.prompt_tokens} prompt + "
                        f"{a.max_tokens} output tokens")
    for col in ("path", "output tok/s", "vs in-process"):
        table.add_column(col)
    table.add_row("Scheduler in-process (no HTTP)", f"{direct:.1f}", "1.00x")
    table.add_row("nanoseek serve (HTTP + SSE, engine thread)", f"{http:.1f}", f"{http / direct:.2f}x")
    Console().print(table)
    out = Path(a.out or f"benchmarks/results/serve-overhead-cpu-{time.strftime('%Y-%m-%d-%H%M')}.md")
    write_atomic(out, f"# HTTP overhead of nanoseek serve\n\n- machine: {machine_line('cpu')}\n"
                      f"- command: `python benchmarks/serve_overhead.py {' '.join(sys.argv[1:])}`\n\n"
                      f"| path | output tok/s | vs in-process |\n|---|---|---|\n"
                      f"| Scheduler in-process | {direct:.1f} | 1.00x |\n"
                      f"| nanoseek serve over HTTP | {http:.1f} | {http / direct:.2f}x |\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
