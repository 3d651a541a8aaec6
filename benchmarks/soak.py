"""Soak test for `nanoseek serve`: many streams for a long time; memory must stay flat and the ledger exact.

    .venv/bin/python benchmarks/soak.py [--streams 64] [--minutes 10] [--warmup-s 60] [--sample-s 5]
        [--cancel-frac 0.2] [--min-tokens 16] [--max-tokens 128] [--model smollm2-135m] [--threads N] [--max-len 512]
        [--serve-arg=--quant=int4 ...] [--out benchmarks/results/soak-DEVICE-DATE.md]

Starts `nanoseek serve` with its own temporary data directory holding one API key (so authentication is on
and every request writes a usage row under that key), then runs --streams client loops for --minutes. Each
loop sends streamed chat completions back to back: random word-salad prompts, `ignore_eos: true` with a
random max_tokens in [--min-tokens, --max-tokens], and with probability --cancel-frac it hangs up after a few
chunks (the server must cancel the request, free its row, and still bill what was generated).

While it runs, the server's resident memory is sampled every --sample-s seconds (psutil if installed, else
/proc/PID/status). At the end it reports:
  * RSS growth from the first sample after --warmup-s to the last sample under load (target < 5%: a leak
    per request would grow without bound, while allocator pools settle during warm-up);
  * the ledger: the store must hold exactly one row per request the client completed or cancelled (HTTP
    errors before a stream began write none), and the completion-token counts of completed requests must be
    found among the rows;
  * that no request is left running or waiting once the clients are gone.
Exits 1 if any check fails. Smoke-run with e.g. `--streams 4 --minutes 0.5 --warmup-s 10 --sample-s 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve import DONE, client_for, machine_line, served_model, sse_data, start_server, words, write_atomic


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0                 # hung up on purpose, after the stream began
    failed: list[str] = field(default_factory=list)
    completed_tokens: Counter = field(default_factory=Counter)   # completion_tokens → how many completed requests

    @property
    def accounted(self) -> int:
        return self.completed + self.cancelled


async def one_request(client: httpx.AsyncClient, model: str, rng: random.Random, a, tally: Tally) -> None:
    max_tokens = rng.randint(a.min_tokens, a.max_tokens)
    hang_up_after = rng.randint(2, max(2, max_tokens // 2)) if rng.random() < a.cancel_frac else None
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": rng.getrandbits(31),
            "messages": [{"role": "user", "content": words(rng.randint(10, 150), rng)}]}
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                tally.failed.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for chunk in sse_data(r):
                if chunk is DONE:
                    tally.completed += 1
                    return
                if "error" in chunk:
                    tally.failed.append(f"stream error: {chunk['error'].get('message')}")
                    return
                if chunk.get("usage"):
                    tally.completed_tokens[chunk["usage"]["completion_tokens"]] += 1
                chunks += bool(chunk.get("choices"))
                if hang_up_after is not None and chunks >= hang_up_after:
                    tally.cancelled += 1
                    return          # leaving the `async with` closes the connection mid-stream
            tally.failed.append("stream ended without [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        tally.failed.append(f"{type(e).__name__}: {e}")


async def drive(url: str, headers: dict, model: str, a, pid: int) -> tuple[Tally, list[tuple[float, int]]]:
    tally, samples = Tally(), []
    t0 = time.monotonic()
    stop_at = t0 + a.minutes * 60

    async def loop(i: int, client):
        rng = random.Random(a.seed * 100_003 + i)
        while time.monotonic() < stop_at:
            await one_request(client, model, rng, a, tally)

    async def sample():
        while time.monotonic() < stop_at:
            samples.append((time.monotonic() - t0, await asyncio.to_thread(rss_bytes, pid)))
            await asyncio.sleep(a.sample_s)

    async with client_for(url, headers, a.streams) as client:
        await asyncio.gather(sample(), *(loop(i, client) for i in range(a.streams)))
    samples.append((time.monotonic() - t0, rss_bytes(pid)))
    return tally, samples


def wait_idle(url: str, headers: dict, timeout_s: float = 60) -> dict:
    """/health once the scheduler has no running request (cancelled ones are freed within a step or so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health", headers=headers, timeout=10).json()
        if not any(health.get("models", {}).values()) or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    # 150 s: the KV rows grow to the longest request and the prefix-cache pool fills during the first ~100 s
    # (a one-time ~1.4 GB step for SmolLM2 at 64 rows); measured from 60 s that step reads as +61% "growth".
    ap.add_argument("--warmup-s", type=float, default=150.0, help="load before the RSS baseline is taken")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--cancel-frac", type=float, default=0.2, help="share of requests the client hangs up on")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None, help="server rows (default: --streams)")
    ap.add_argument("--max-len", type=int, default=512, help="server context per row (rows grow to it); "
                    "these prompts + replies need < 400")
    ap.add_argument("--serve-arg", action="append", default=[])
    ap.add_argument("--growth-limit", type=float, default=5.0, help="max RSS growth in %%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/soak-DEVICE-DATE.md)")
    a = ap.parse_args()
    if a.warmup_s >= a.minutes * 60:
        ap.error("--warmup-s must be shorter than the run")

    from nanoseek.serve.store import Store

    tmp = tempfile.TemporaryDirectory(prefix="nanoseek-soak-")
    data_dir = Path(tmp.name)
    with Store(data_dir) as st:
        key_id, secret = st.create_key("soak")
    headers = {"Authorization": f"Bearer {secret}"}
    args = ["--model", a.model, "--device", a.device, "--max-batch", str(a.max_batch or a.streams),
            "--max-len", str(a.max_len), *a.serve_arg]
    if a.threads:
        args += ["--threads", str(a.threads)]
    print(f"starting nanoseek serve {' '.join(args)} ...", file=sys.stderr)
    server = start_server(args, data_dir)
    try:
        model, _ = served_model(server.url, headers)
        print(f"{a.streams} streams for {a.minutes:g} min against pid {server.pid} ...", file=sys.stderr)
        tally, samples = asyncio.run(drive(server.url, headers, model, a, server.pid))
        health = wait_idle(server.url, headers)
        idle_rss = rss_bytes(server.pid)
        time.sleep(2)   # usage rows are written on a worker thread after each response
    finally:
        server.stop()
    with Store(data_dir) as st:
        rows = st.usage_rows(key=key_id)

    after = [s for s in samples if s[0] >= a.warmup_s]
    base, end = after[0][1], after[-1][1]
    growth = 100 * (end - base) / base
    peak = max(r for _, r in samples)
    row_tokens = Counter(r.completion_tokens for r in rows if r.finish_reason not in (None, "cancelled"))
    missing = tally.completed_tokens - row_tokens          # completed requests with no matching row
    left = {m: n for m, n in health.get("models", {}).items() if n}
    checks = [
        (f"RSS growth after warm-up < {a.growth_limit:g}%", growth < a.growth_limit,
         f"{base / 2**20:.1f} → {end / 2**20:.1f} MiB ({growth:+.2f}%), peak {peak / 2**20:.1f}, "
         f"idle after {idle_rss / 2**20:.1f}"),
        ("one ledger row per completed or cancelled request", len(rows) == tally.accounted,
         f"{len(rows)} rows; client: {tally.completed} completed + {tally.cancelled} cancelled = {tally.accounted}"),
        ("every completed request's tokens are in the ledger", not missing and tally.completed ==
         sum(tally.completed_tokens.values()), f"unmatched: {dict(missing) or 'none'}"),
        ("no failed requests", not tally.failed, f"{len(tally.failed)} failed" +
         (f", e.g. {tally.failed[0]}" if tally.failed else "")),
        ("nothing left running when the clients are gone", not left, f"running: {left or 'none'}"),
    ]

    from rich.console import Console
    from rich.table import Table

    table = Table("check", "result", "detail", title=f"soak: {a.streams} streams, {a.minutes:g} min")
    for name, ok, detail in checks:
        table.add_row(name, "[green]pass[/]" if ok else "[red]FAIL[/]", detail)
    Console().print(table)
    lines = ["# Soak test: `nanoseek serve`\n", f"- machine: {machine_line(a.device)}",
             f"- server: `nanoseek serve {' '.join(args)}` with one API key",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {a.streams} streams for {a.minutes:g} min, warm-up "
             f"{a.warmup_s:g} s, max_tokens {a.min_tokens}–{a.max_tokens} with ignore_eos, "
             f"{a.cancel_frac:.0%} hung up mid-stream",
             f"- command: `python benchmarks/soak.py {' '.join(sys.argv[1:])}`\n",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {n} | {'pass' if ok else 'FAIL'} | {d} |" for n, ok, d in checks]
    lines += ["\n## RSS samples (MiB)\n", "| t s | RSS |", "|---|---|"]
    lines += [f"| {t:.0f} | {r / 2**20:.1f} |" for t, r in samples]
    out = Path(a.out or f"benchmarks/results/soak-{a.device.split(':')[0]}-{time.strftime('%Y-%m-%d-%H%M')}.md")
    write_atomic(out, "\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
