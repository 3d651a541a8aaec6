"""Serving benchmark for `nanoseek serve`: throughput and latency under concurrency, and prefix-cache TTFT.

    .venv/bin/python benchmarks/serve.py [--url http://HOST:PORT] [--api-key KEY]
        [--model smollm2-135m] [--device cpu] [--threads N] [--max-batch N] [--max-len N]
        [--serve-arg=--quant=int4 ...]
        [--concurrency 1 4 16 64] [--requests N] [--prompt-tokens 128] [--max-tokens 128]
        [--prefix-tokens 1024] [--prefix-repeats 5] [--skip-prefix] [--out benchmarks/results/serve-DEV-DATE.md]

Without --url it starts `nanoseek serve --model MODEL` on a free loopback port (its own temporary data
directory, --max-batch defaulting to the highest concurrency so every stream can be in the batch, --max-len
to what the longest request needs), waits for /health, and stops it at the end. With --url it measures
whatever OpenAI-compatible server is there (the machine line then describes this client's machine, not the
server's).

Part 1, concurrency sweep. For each level C, C workers send chat completions back to back until --requests
(default 4·C, at least 8) have finished. Every request streams, sends `ignore_eos: true`, a fixed
max_tokens and stream_options.include_usage, so every reply has the same length and the count comes from the
server's usage. Prompts are distinct random word salads of about --prompt-tokens tokens (so a prefix cache
cannot help here). Reported per level:
  * output tok/s: completion tokens of all requests / wall time from the first send to the last [DONE];
  * TTFT p50/p99: send → first chunk carrying content (or reasoning_content) — not the role-only first
    chunk, which a server can flush before doing any work;
  * TPOT p50/p99: (end − first content) / (completion tokens − 1) per request, vLLM's definition;
  * ITL p99: gaps between content chunks, all requests pooled (stalls of the engine loop show up here);
  * speed-up: output tok/s / output tok/s at concurrency 1 (one request at a time), the gain from batching.

Part 2, prefix cache. One-at-a-time requests whose system prompt is ~--prefix-tokens tokens: "warm" ones all
share the same system prompt (primed once beforehand), "cold" ones each start with a unique one of the same
length; the user turn differs every time. Cold and warm alternate so drift hits both alike. Reported: TTFT
p50 of each, their ratio, and the prompt_cache_hit_tokens the server reported.

Results print as a rich table and are written as markdown to --out. Do not run long sweeps on a shared
machine: the numbers would measure the neighbours, and the neighbours would measure you.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health "
         "person art war history party result change morning reason research girl guy moment air teacher force "
         "education river mountain garden window paper music market light voice field").split()


# ---------------------------------------------------------------------------------------------------------
# The machine and the server


def machine_line(device: str) -> str:
    import torch

    parts = [f"{cpu_name()}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """`nanoseek serve` in a child process, with its log in `log_path` (printed when it fails to start)."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(args: list[str], data_dir: Path, timeout_s: float = 300.0) -> ServerProcess:
    """Start `python -m nanoseek.cli serve ARGS --port FREE --data-dir DATA_DIR` and wait for /health.
    OMP_WAIT_POLICY=PASSIVE unless set: spinning OpenMP workers make a shared CPU crawl (see tests/conftest)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, data_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s:\n"
                               f"{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def served_model(url: str, headers: dict) -> tuple[str, int | None]:
    """The first model the server lists, and its context length if it says."""
    data = httpx.get(url + "/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    return data[0]["id"], data[0].get("max_model_len")


# ---------------------------------------------------------------------------------------------------------
# Prompts


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def tokens_per_word(url: str, headers: dict, model: str) -> float:
    """Calibrate word salad → tokens with the server's /tokenize (vLLM has it too); 1.3 if it can't say."""
    text = words(400, random.Random(0))
    try:
        r = httpx.post(url + "/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False},
                       headers=headers, timeout=30)
        return r.raise_for_status().json()["count"] / 400
    except (httpx.HTTPError, KeyError, ValueError):
        return 1.3


# ---------------------------------------------------------------------------------------------------------
# One streamed request


@dataclass
class Result:
    ok: bool
    error: str = ""
    sent: float = 0.0
    first_chunk: float | None = None      # first chunk with choices (vLLM's TTFT)
    first_content: float | None = None    # first chunk with text (our TTFT)
    end: float = 0.0
    content_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hit_tokens: int = 0
    finish: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_content is None else self.first_content - self.sent

    @property
    def tpot(self) -> float | None:
        if self.first_content is None or self.completion_tokens < 2:
            return None
        return (self.end - self.first_content) / (self.completion_tokens - 1)


DONE = object()   # what sse_data yields for `data: [DONE]`


async def sse_data(response):
    """The JSON chunks of an OpenAI-style SSE stream, then DONE if the stream says [DONE] (blank separators and
    `: keep-alive` comments skipped). Shared by serve.py, soak.py and abuse.py."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield DONE
            return
        yield json.loads(data)


async def stream_chat(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                      extra: dict | None = None) -> Result:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    res = Result(ok=False, sent=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for chunk in sse_data(r):
                if chunk is DONE:
                    res.ok = res.error == ""
                    break
                now = time.perf_counter()
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    continue
                if chunk.get("usage"):
                    u = chunk["usage"]
                    res.prompt_tokens, res.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
                    res.cache_hit_tokens = u.get("prompt_cache_hit_tokens") or \
                        (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for c in chunk.get("choices") or []:
                    if res.first_chunk is None:
                        res.first_chunk = now
                    d = c.get("delta") or {}
                    if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                        res.first_content = res.first_content or now
                        res.content_times.append(now)
                    res.finish = c.get("finish_reason") or res.finish
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    if not res.ok and not res.error:
        res.error = "stream ended without [DONE]"
    return res


def client_for(url: str, headers: dict, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=30),
                             limits=httpx.Limits(max_connections=connections + 4,
                                                 max_keepalive_connections=connections + 4))


# ---------------------------------------------------------------------------------------------------------
# Part 1: concurrency sweep


@dataclass
class Level:
    concurrency: int
    results: list[Result]
    wall_s: float

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def out_tok_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall_s

    @property
    def req_s(self) -> float:
        return len(self.ok) / self.wall_s


def pct(xs: list[float], q: float) -> float:
    """q-th percentile with linear interpolation (numpy's default); NaN for no data."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_level(url: str, headers: dict, model: str, concurrency: int, n_requests: int, prompt_words: int,
                    max_tokens: int, seed: int) -> Level:
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": f"Request {i}. Continue this list: {words(prompt_words, rng)}"}]
               for i in range(n_requests)]
    todo = iter(prompts)
    results: list[Result] = []

    async def worker(client):
        for messages in todo:   # a shared iterator: each worker takes the next prompt when it is free
            results.append(await stream_chat(client, model, messages, max_tokens))

    async with client_for(url, headers, concurrency) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Level(concurrency, results, wall)


async def warm_up(url: str, headers: dict, model: str, n: int) -> None:
    """First requests pay one-time costs (allocator growth, lazy imports, compilation): keep them out."""
    async with client_for(url, headers, n) as client:
        rs = await asyncio.gather(*(stream_chat(client, model, [{"role": "user", "content": f"warm up {i}"}], 8)
                                    for i in range(n)))
    bad = [r.error for r in rs if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


# ---------------------------------------------------------------------------------------------------------
# Part 2: repeated long prefix vs cold


async def run_prefix(url: str, headers: dict, model: str, prefix_words: int, repeats: int, max_tokens: int,
                     seed: int) -> tuple[list[Result], list[Result]]:
    rng = random.Random(seed + 1)
    shared = "You are a helpful assistant. Reference notes: " + words(prefix_words, rng)

    def ask(system: str, i: int) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: {words(8, rng)}?"}]

    cold, warm = [], []
    async with client_for(url, headers, 1) as client:
        primed = await stream_chat(client, model, ask(shared, -1), max_tokens)   # puts the prefix in the cache
        if not primed.ok:
            raise RuntimeError(f"prefix priming failed: {primed.error}")
        for i in range(repeats):
            # A unique first sentence makes the whole system prompt new, block by block, at the same length.
            unique = f"Session {rng.getrandbits(64):016x}. " + words(prefix_words, rng)
            cold.append(await stream_chat(client, model, ask(unique, i), max_tokens))
            warm.append(await stream_chat(client, model, ask(shared, i), max_tokens))
    return cold, warm


# ---------------------------------------------------------------------------------------------------------
# Report


def ms(x: float) -> str:
    return "—" if x != x else f"{x * 1000:.0f}"


def level_rows(levels: list[Level]) -> list[list[str]]:
    base = next((lv.out_tok_s for lv in levels if lv.concurrency == 1 and lv.ok), None)
    rows = []
    for lv in levels:
        ok = lv.ok
        ttft = [r.ttft for r in ok if r.ttft is not None]
        tpot = [r.tpot for r in ok if r.tpot is not None]
        itl = [b - a for r in ok for a, b in zip(r.content_times, r.content_times[1:])]
        rows.append([str(lv.concurrency), f"{len(ok)}/{len(lv.results)}", f"{lv.out_tok_s:.1f}", f"{lv.req_s:.2f}",
                     ms(pct(ttft, 50)), ms(pct(ttft, 99)), ms(pct(tpot, 50)), ms(pct(tpot, 99)), ms(pct(itl, 99)),
                     f"{lv.out_tok_s / base:.2f}x" if base else "—"])
    return rows


LEVEL_HEADERS = ["concurrency", "ok/sent", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                 "TPOT p99 ms", "ITL p99 ms", "vs one at a time"]


def prefix_summary(cold: list[Result], warm: list[Result]) -> dict:
    c = [r.ttft for r in cold if r.ok and r.ttft is not None]
    w = [r.ttft for r in warm if r.ok and r.ttft is not None]
    return {"cold_ttft": pct(c, 50), "warm_ttft": pct(w, 50),
            "prompt_tokens": statistics.mean(r.prompt_tokens for r in warm if r.ok) if w else 0,
            "warm_hits": statistics.mean(r.cache_hit_tokens for r in warm if r.ok) if w else 0,
            "cold_hits": statistics.mean(r.cache_hit_tokens for r in cold if r.ok) if c else 0,
            "n": (len(c), len(w))}


def markdown(a, machine: str, server_desc: str, model: str, levels: list[Level], prefix: dict | None,
             notes: list[str]) -> str:
    lines = ["# Serving benchmark: `nanoseek serve`\n",
             f"- machine: {machine}",
             f"- server: {server_desc}; model `{model}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; streamed chat completions, greedy, ignore_eos, "
             f"max_tokens {a.max_tokens}, prompts ~{a.prompt_tokens} tokens (unique per request)",
             f"- command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`\n",
             "| " + " | ".join(LEVEL_HEADERS) + " |", "|" + "---|" * len(LEVEL_HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in level_rows(levels)]
    lines.append("\nTTFT is to the first chunk with content (not the role-only chunk); TPOT = (end − first "
                 "content) / (tokens − 1) per request; output tok/s = all completion tokens / wall time of the "
                 "level; the last column divides by the concurrency-1 row.")
    if prefix:
        ratio = prefix["cold_ttft"] / prefix["warm_ttft"] if prefix["warm_ttft"] > 0 else float("nan")
        lines += ["\n## Prefix cache\n",
                  f"Prompt ~{prefix['prompt_tokens']:.0f} tokens (system prompt ~{a.prefix_tokens}), one request "
                  f"at a time, {prefix['n'][0]} cold and {prefix['n'][1]} warm, max_tokens {a.prefix_max_tokens}.\n",
                  "| prefix | TTFT p50 ms | prompt_cache_hit_tokens (mean) |", "|---|---|---|",
                  f"| cold (unique) | {ms(prefix['cold_ttft'])} | {prefix['cold_hits']:.0f} |",
                  f"| warm (repeated) | {ms(prefix['warm_ttft'])} | {prefix['warm_hits']:.0f} |",
                  f"\ncold / warm TTFT: **{ratio:.2f}x**"]
    if notes:
        lines += ["\n## Notes\n"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def print_tables(levels: list[Level], prefix: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Short headers: a piped console is 80 columns wide.
    table = Table("conc", "ok", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99",
                  "speed-up", title="concurrency sweep (times in ms; speed-up vs concurrency 1)")
    for r in level_rows(levels):
        table.add_row(*r)
    console = Console()
    console.print(table)
    if prefix:
        t = Table("prefix", "TTFT p50 ms", "cache hit tokens", title=f"prefix cache (~{prefix['prompt_tokens']:.0f} "
                  "prompt tokens)")
        t.add_row("cold (unique)", ms(prefix["cold_ttft"]), f"{prefix['cold_hits']:.0f}")
        t.add_row("warm (repeated)", ms(prefix["warm_ttft"]), f"{prefix['warm_hits']:.0f}")
        console.print(t)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def targets(levels: list[Level], prefix: dict | None, device: str) -> list[str]:
    """The issue's targets, checked against this run (informational: a smoke run will not meet them)."""
    notes = []
    base = next((lv.out_tok_s for lv in levels if lv.concurrency == 1 and lv.ok), None)
    goal = (64, 8.0) if device.startswith("cuda") else (16, 3.0)
    lv = next((lv for lv in levels if lv.concurrency == goal[0]), None)
    if base and lv:
        x = lv.out_tok_s / base
        notes.append(f"target ≥{goal[1]:.0f}x throughput at concurrency {goal[0]} vs one at a time: "
                     f"{x:.2f}x ({'met' if x >= goal[1] else 'NOT met'})")
    if prefix and prefix["warm_ttft"] > 0:
        x = prefix["cold_ttft"] / prefix["warm_ttft"]
        notes.append(f"target prefix-hit TTFT ≥5x lower than cold: {x:.2f}x ({'met' if x >= 5 else 'NOT met'})")
    for lv in levels:
        bad = [r for r in lv.results if not r.ok]
        if bad:
            notes.append(f"concurrency {lv.concurrency}: {len(bad)} failed requests, e.g. {bad[0].error}")
        short = [r for r in lv.ok if r.completion_tokens != lv.ok[0].completion_tokens]
        if short:
            notes.append(f"concurrency {lv.concurrency}: {len(short)} replies of unequal length (ignore_eos not "
                         "honoured?)")
    return notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (default: start nanoseek serve)")
    ap.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"), help="Bearer key for --url")
    ap.add_argument("--model", default="smollm2-135m", help="what the started server loads")
    ap.add_argument("--device", default="cpu", help="the started server's --device (also names the output)")
    ap.add_argument("--threads", type=int, default=None, help="the started server's --threads")
    ap.add_argument("--max-batch", type=int, default=None, help="the started server's --max-batch "
                    "(default: the highest concurrency)")
    ap.add_argument("--max-len", type=int, default=None, help="the started server's --max-len (default: what the "
                    "longest request needs, rounded up to 256; rows grow to at most max-len)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for nanoseek serve "
                    "(repeatable, e.g. --serve-arg=--quant=int4)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x concurrency, ≥8)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--prefix-repeats", type=int, default=5)
    ap.add_argument("--prefix-max-tokens", type=int, default=4)
    ap.add_argument("--skip-prefix", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/serve-DEVICE-DATE.md)")
    a = ap.parse_args()
    if any(c < 1 for c in a.concurrency):
        ap.error("--concurrency values must be ≥ 1")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}

    server = None
    if a.url:
        url, server_desc = a.url.rstrip("/"), f"{a.url} (external; machine line is the client's)"
        url = url[:-3] if url.endswith("/v1") else url
    else:
        max_batch = a.max_batch or max(a.concurrency)
        # Rows grow up to max_len while the longest request runs: ask only for what the longest request here
        # needs (plus template slack), so a 64-row sweep stays within memory.
        need = max(a.prompt_tokens + a.max_tokens, 0 if a.skip_prefix else a.prefix_tokens + a.prefix_max_tokens)
        max_len = a.max_len or 256 * -(-(need * 5 // 4 + 64) // 256)
        args = ["--model", a.model, "--device", a.device, "--max-batch", str(max_batch), "--max-len", str(max_len),
                *a.serve_arg]
        if a.threads:
            args += ["--threads", str(a.threads)]
        tmp = tempfile.TemporaryDirectory(prefix="nanoseek-bench-")
        print(f"starting nanoseek serve {' '.join(args)} ...", file=sys.stderr)
        server = start_server(args, Path(tmp.name))
        url, server_desc = server.url, f"`nanoseek serve {' '.join(args)}` started by this script"
    try:
        model, context = served_model(url, headers)
        per_word = tokens_per_word(url, headers, model)
        prompt_words = max(1, round(a.prompt_tokens / per_word))
        asyncio.run(warm_up(url, headers, model, min(4, max(a.concurrency))))
        levels = []
        for c in a.concurrency:
            n = a.requests or max(8, 4 * c)
            print(f"concurrency {c}: {n} requests ...", file=sys.stderr)
            levels.append(asyncio.run(run_level(url, headers, model, c, n, prompt_words, a.max_tokens, a.seed + c)))
        prefix = None
        if not a.skip_prefix:
            print(f"prefix cache: {a.prefix_repeats} cold + {a.prefix_repeats} warm ...", file=sys.stderr)
            if context and a.prefix_tokens + 64 > context:
                raise SystemExit(f"--prefix-tokens {a.prefix_tokens} does not fit the model's context {context}")
            cold, warm = asyncio.run(run_prefix(url, headers, model, max(1, round(a.prefix_tokens / per_word)),
                                                a.prefix_repeats, a.prefix_max_tokens, a.seed))
            prefix = prefix_summary(cold, warm)
    finally:
        if server is not None:
            server.stop()
    print_tables(levels, prefix)
    notes = targets(levels, prefix, a.device)
    for n in notes:
        print("-", n)
    device = a.device.split(":")[0] if not a.url else "remote"
    out = Path(a.out or f"benchmarks/results/serve-{device}-{time.strftime('%Y-%m-%d-%H%M')}.md")
    write_atomic(out, markdown(a, machine_line(a.device), server_desc, model, levels, prefix, notes))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
