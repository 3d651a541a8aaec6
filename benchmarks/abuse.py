"""Hostile-client measurements of `nanoseek serve` (issue 13, findings 1–6), black-box over HTTP on loopback.

    python benchmarks/abuse.py [--only 1,3,6] [--model smollm2-135m] [--server-arg=--header-timeout=2 ...]
        [--url http://127.0.0.1:PORT [--api-key KEY] [--data-dir DIR] [--server-pid PID]]
        [--note TEXT] [--out benchmarks/results/abuse-DEVICE-DATE.md] [sizes: see --help]

Without --url it starts this checkout's `nanoseek serve` on a free 127.0.0.1 port with a temporary data
directory holding its own API keys (so auth, budgets and per-key caches are on) and a price file that makes
a request cost cents (so /user/balance can show it), and stops it at the end, on Ctrl-C and on errors.
--server-arg passes flags through (a fixed server's timeouts, --threads, ...). With --url it measures a
running server: --data-dir (that server's) lets it create the keys findings 1 and 2 need, --server-pid lets
finding 4 read the server's memory; without them those figures are skipped. Only loopback addresses.

Each measurement is one row, numbered as the issue's findings, with the issue's pass bar:
  1 budget race: a key whose budget covers --budget-requests requests at --budget-max-tokens (worst case:
    every prompt token a cache miss, every allowed token generated) sends --budget-parallel requests at once.
    Spend from the ledger (data dir), from the replies' usage at the server's prices, and /user/balance.
    Pass: spend ≤ budget. (A server may refuse or clamp max_tokens; only the spend is judged.)
  2 cross-key prefix cache: key A sends a private prompt twice; key B sends a wrong guess, the right guess,
    then another wrong guess. Leak = B's cache-hit tokens on the right guess minus on the last wrong one
    (both share only the chat template with what B sent before). Pass: leak 0, and A's own repeat still hits.
  3 event-loop stall: --streams streams run, then a --big-prompt-mb prompt goes to /v1/chat/completions and
    then to /v1/tokenize while /health is polled. Pass: no stream's gap between chunks and no /health answer
    exceeds 1 s during either (a quiet window before shows the normal gap on this machine).
  4 chunked body: up to --chunked-mib MiB sent with Transfer-Encoding: chunked and no Content-Length, made on
    the fly, stopping as soon as the server answers or stops reading; server RSS sampled meanwhile.
    Pass: 413 (or the connection closed) within 64 MiB, and RSS growth under 128 MiB.
  5 render: a stream's rate alone for --render-alone-s, then while --renders callers each send back to back
    POST /app/api/render calls of a --render-kb KB worst-case text (math spans in paragraphs, nested lists and
    tables, code, display math) for at least as long. Pass: the stream keeps ≥ 50% of its rate alone.
  6 slowloris: --slowloris sockets send a partial request head (every other one then sends one more header
    line every --trickle-s seconds); after --header-timeout + --slowloris-grace seconds, count those still open; a
    normal request is timed during the wait and after it. Pass: none open, normal requests answered 200.
    --header-timeout only sets how long to wait: pass the server's own timeout, e.g. also as --server-arg.

Every loop is bounded by a count and a time limit; the defaults took 2 minutes on 2 CPU cores against
today's server. The rows print as a table and go to --out as markdown. Exit status: 0 when every measured
bar passes, 1 when one fails or a measurement errs (today's server fails them: its run is the pre-fix
baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import os
import random
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from serve import DONE, machine_line, sse_data, start_server, words, write_atomic  # benchmarks/: scripts import their neighbours
from soak import rss_bytes

REPO = Path(__file__).resolve().parents[1]
STALL_BAR_S = 1.0
CHUNKED_EARLY_BYTES = 64 * 2**20
CHUNKED_RSS_BAR = 128 * 2**20
RENDER_RATE_BAR = 0.5
# Prices for the started server, USD per 1M tokens: high enough that one request costs cents, so the
# two-decimal /user/balance shows spend and overspend.
PRICES = {"input_cache_hit": 100.0, "input_cache_miss": 1000.0, "output": 2000.0}


# ---------------------------------------------------------------------------------------------------------
# The target and the results


@dataclass
class Target:
    """The server under test and what this run may use of it."""

    url: str
    host: str
    port: int
    headers: dict                         # an unlimited key (or none for an open server)
    model: str = ""
    context: int = 4096
    prices: dict = field(default_factory=lambda: dict(PRICES))
    pid: int | None = None                # for memory figures
    data_dir: Path | None = None          # for keys and the ledger
    log_path: Path | None = None
    proc: object = None                   # the ServerProcess when this script started it
    desc: str = ""                        # for the result file

    @property
    def netloc(self) -> str:
        """host:port as a Host header writes it (an IPv6 literal in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def alive(self) -> str | None:
        """None while the server runs, else why not."""
        if self.proc is not None and self.proc.proc.poll() is not None:
            return f"the server exited with code {self.proc.proc.returncode}"
        return None

    def cost(self, usage: dict) -> float:
        p = self.prices
        hit = usage.get("prompt_cache_hit_tokens") or 0
        return (hit * p["input_cache_hit"] + (usage["prompt_tokens"] - hit) * p["input_cache_miss"]
                + usage["completion_tokens"] * p["output"]) / 1e6


@dataclass
class Row:
    finding: int
    name: str
    bar: str
    passed: bool | None = None            # None: not measured
    summary: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "—"}[self.passed]


NAMES = {1: ("budget race", "spend ≤ budget"),
         2: ("cross-key prefix cache", "0 leaked hit tokens; own repeats still hit"),
         3: ("event-loop stall", f"no stream gap or /health answer > {STALL_BAR_S:g} s"),
         4: ("chunked body", "413 within 64 MiB; RSS growth < 128 MiB"),
         5: ("render vs generation", f"stream keeps ≥ {RENDER_RATE_BAR:.0%} of its rate alone"),
         6: ("slowloris", "0 partial-head sockets open after the timeout; normal requests served")}


def create_key(data_dir: Path, name: str, budget_usd: float | None = None) -> tuple[int, str]:
    from nanoseek.serve.store import Store

    with Store(data_dir) as st:
        return st.create_key(name, budget_usd=budget_usd)


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def client(t: Target, connections: int = 8, headers: dict | None = None, timeout: float = 180) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=t.url, headers=t.headers if headers is None else headers,
                             timeout=httpx.Timeout(timeout, connect=30),
                             limits=httpx.Limits(max_connections=connections + 4,
                                                 max_keepalive_connections=connections + 4))


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) >= 0.01 or x == 0 else f"${x:.3g}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------
# Streams that time their chunks


@dataclass
class Probe:
    """One streamed chat request: when each content chunk arrived, and how it ended."""

    times: list[float] = field(default_factory=list)
    status: int | None = None
    error: str = ""
    ended: float | None = None

    def max_gap(self, a: float, b: float) -> float:
        """Longest silence within [a, b]; a stream that finished inside the window is silent only up to its
        end (finishing is not a stall)."""
        stop = min(b, self.ended) if self.ended is not None else b
        pts = [a] + [x for x in self.times if a < x < stop] + [stop]
        return max((y - x for x, y in itertools.pairwise(pts)), default=0.0) if stop > a else 0.0

    def rate(self, a: float, b: float) -> float:
        stop = min(b, self.ended) if self.ended is not None else b
        return sum(a <= x <= stop for x in self.times) / (stop - a) if stop > a else 0.0

    def ran_through(self, b: float) -> bool:
        """Still streaming at b: its figures cover the whole window."""
        return self.ended is None or self.ended >= b


async def run_stream(c: httpx.AsyncClient, t: Target, content: str, max_tokens: int, probe: Probe) -> None:
    """Stream until [DONE], an error, or cancellation (the caller cancels it: leaving closes the connection)."""
    body = {"model": t.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            probe.status = r.status_code
            if r.status_code != 200:
                probe.error = f"HTTP {r.status_code}: {(await r.aread())[:160]!r}"
                return
            async for chunk in sse_data(r):
                if chunk is DONE:
                    return
                if "error" in chunk:
                    probe.error = str(chunk["error"].get("message"))[:160]
                    return
                if any((ch.get("delta") or {}).get("content") for ch in chunk.get("choices") or []):
                    probe.times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        probe.error = f"{type(e).__name__}: {e}"[:160]
    finally:
        probe.ended = time.perf_counter()


async def start_streams(c: httpx.AsyncClient, t: Target, n: int, max_tokens: int, seed: int,
                        wait_s: float = 120) -> tuple[list[Probe], list[asyncio.Task]]:
    """n streams, returned once each has sent two chunks (or ended, or wait_s passed)."""
    rng = random.Random(seed)
    probes = [Probe() for _ in range(n)]
    tasks = [asyncio.create_task(run_stream(c, t, f"Stream {i}. Continue this story: {words(12, rng)}",
                                            max_tokens, p)) for i, p in enumerate(probes)]
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline and not all(len(p.times) >= 2 or p.ended for p in probes):
        await asyncio.sleep(0.05)
    return probes, tasks


async def stop_streams(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stream_tokens(t: Target, wanted: int) -> int:
    """max_tokens for a background stream: as asked, within the context (its prompt is < 100 tokens)."""
    return max(8, min(wanted, t.context - 128))


# ---------------------------------------------------------------------------------------------------------
# 1. Budget race


async def budget_race(t: Target, a) -> Row:
    row = Row(1, *NAMES[1])
    if t.data_dir is None:
        row.summary = "skipped: needs the server's --data-dir to create a key with a budget"
        return row
    rng = random.Random(a.seed + 1)
    prompts = [f"Budget probe {i:03d}: {words(20, rng)}" for i in range(a.budget_parallel)]
    async with client(t, a.budget_parallel) as c:
        r = await c.post("/v1/tokenize", json={"model": t.model, "messages": [{"role": "user",
                                                                              "content": prompts[0]}]})
        prompt_tokens = r.json()["count"] + 4 if r.status_code == 200 else 64   # + 4: other prompts' digits
        worst = t.cost({"prompt_tokens": prompt_tokens, "completion_tokens": a.budget_max_tokens})
        # A hair over n worst cases, so float rounding cannot refuse the n-th request.
        budget = a.budget_requests * worst * (1 + 1e-6)
        key_id, secret = await asyncio.to_thread(create_key, t.data_dir, "abuse-budget", budget)
        headers = bearer(secret)
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(
            c.post("/v1/chat/completions", headers=headers, json={
                "model": t.model, "messages": [{"role": "user", "content": p}], "max_tokens": a.budget_max_tokens,
                "temperature": 0, "ignore_eos": True}) for p in prompts), return_exceptions=True)
        wall = time.perf_counter() - t0
        statuses = Counter(x.status_code if isinstance(x, httpx.Response) else type(x).__name__ for x in replies)
        usages = [x.json().get("usage") for x in replies if isinstance(x, httpx.Response) and x.status_code == 200]
        usages = [u for u in usages if u]
        served, tokens = len(usages), sum(u["completion_tokens"] for u in usages)
        client_spend = sum(t.cost(u) for u in usages)
        ledger_spend = await asyncio.to_thread(settled_spend, t.data_dir, key_id, served)
        b = await c.get("/user/balance", headers=headers)
        balance = (b.json().get("balance_infos") or [{}])[0].get("total_balance") if b.status_code == 200 \
            else f"HTTP {b.status_code}"
    spend = ledger_spend if ledger_spend is not None else client_spend
    over = spend - budget
    row.passed = over <= budget * 1e-6
    row.summary = (f"served {served}/{a.budget_parallel} (budget covers {a.budget_requests}); spend {usd(spend)} vs "
                   f"budget {usd(budget)}: overspend {usd(max(over, 0))} ({spend / budget:.2f}x budget)")
    row.details = [
        (f"{a.budget_parallel} parallel chat requests, max_tokens {a.budget_max_tokens}, ignore_eos, ~{prompt_tokens} "
         f"prompt tokens; worst case {usd(worst)} per request at ${t.prices['input_cache_miss']:g}/"
         f"${t.prices['output']:g} per 1M input-miss/output tokens; all answered in {wall:.1f} s"),
        (f"statuses {dict(statuses)}; {tokens} completion tokens served "
         f"(≤ {a.budget_requests * a.budget_max_tokens} if the budget held)"),
        ("spend: ledger " + (usd(ledger_spend) if ledger_spend is not None else "unreadable") +
         f", replies' usage at the server's prices {usd(client_spend)}; /user/balance total_balance {balance}"),
    ]
    return row


def settled_spend(data_dir: Path, key_id: int, served: int, wait_s: float = 15) -> float | None:
    """The key's ledger spend once its rows stop changing (they are written after each reply)."""
    from nanoseek.serve.store import Store

    deadline, last, stable_since = time.monotonic() + wait_s, None, time.monotonic()
    try:
        with Store(data_dir) as st:
            while True:
                now = (len(st.usage_rows(key=key_id)), st.spent_usd(key_id))
                if now != last:
                    last, stable_since = now, time.monotonic()
                if (now[0] >= served and time.monotonic() - stable_since > 1) or time.monotonic() > deadline:
                    return now[1]
                time.sleep(0.2)
    except Exception:   # noqa: BLE001 (whatever a changed store raises, the replies' usage still gives the spend)
        return None


# ---------------------------------------------------------------------------------------------------------
# 2. Cross-key prefix cache


async def cross_key(t: Target, a) -> Row:
    row = Row(2, *NAMES[2])
    if t.data_dir is None:
        row.summary = "skipped: needs the server's --data-dir to create two keys"
        return row
    rng = random.Random(a.seed + 2)
    _, key_a = await asyncio.to_thread(create_key, t.data_dir, "abuse-victim")
    _, key_b = await asyncio.to_thread(create_key, t.data_dir, "abuse-prober")
    hits = {}
    async with client(t, 2, headers={}) as c:
        n = await fitting_words(c, t, 150, rng)
        # Each text differs from the others from its first word on, so only the chat template is common.
        secret = f"Private note {rng.getrandbits(32):08x}: {words(n, rng)}"
        wrong = [f"{w} {rng.getrandbits(32):08x}: {words(n, rng)}" for w in ("Guess", "Another")]
        for key, text, label in ((key_a, secret, "A first"), (key_a, secret, "A repeat"),
                                 (key_b, wrong[0], "B wrong guess"), (key_b, secret, "B right guess"),
                                 (key_b, wrong[1], "B second wrong guess")):
            status, body = await _keyed_chat(c, t, key, text)
            if status != 200:
                row.passed, row.summary = False, f"{label}: HTTP {status} {str(body)[:160]}"
                return row
            hits[label] = (body["usage"].get("prompt_cache_hit_tokens") or 0, body["usage"]["prompt_tokens"])
    leak = hits["B right guess"][0] - hits["B second wrong guess"][0]
    own = hits["A repeat"][0]
    row.passed = leak <= 0 and own > 0
    row.summary = (f"B's right guess hit {hits['B right guess'][0]} tokens vs {hits['B second wrong guess'][0]} for a "
                   f"wrong one: {max(leak, 0)} leaked; A's own repeat hit {own}/{hits['A repeat'][1]}")
    row.details = ["prompt_cache_hit_tokens / prompt_tokens in order: " +
                   ", ".join(f"{k} {h}/{n}" for k, (h, n) in hits.items())]
    return row


async def fitting_words(c: httpx.AsyncClient, t: Target, n: int, rng: random.Random) -> int:
    """At most n words of salad whose prompt fits the context with room to spare (a small test model's is
    short)."""
    while n > 8:
        r = await c.post("/v1/tokenize", headers=t.headers, json={
            "model": t.model, "messages": [{"role": "user", "content": "Private note 00000000: " + words(n, rng)}]})
        if r.status_code == 200 and r.json()["count"] + 32 <= t.context:
            break
        n //= 2
    return n


async def _keyed_chat(c: httpx.AsyncClient, t: Target, secret: str, text: str) -> tuple[int, dict]:
    r = await c.post("/v1/chat/completions", headers=bearer(secret), json={
        "model": t.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0})
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"raw": r.text[:160]}


# ---------------------------------------------------------------------------------------------------------
# 3. Event-loop stall


async def poll_health(c: httpx.AsyncClient, stop: asyncio.Event, out: list[tuple[float, float]],
                      every_s: float = 0.1, limit: int = 100_000) -> None:
    """GET /health back to back (every_s apart) until `stop`: (sent, seconds to answer) each."""
    while not stop.is_set() and len(out) < limit:
        sent = time.perf_counter()
        try:
            await c.get("/health")
        except httpx.HTTPError:
            pass
        out.append((sent, time.perf_counter() - sent))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def worst_health(samples: list[tuple[float, float]], a: float, b: float) -> float:
    """Longest /health wait in [a, b], counting one still unanswered at b up to b."""
    return max((lat for sent, lat in samples if a <= sent + lat and sent <= b), default=0.0)


async def stall(t: Target, a) -> Row:
    row = Row(3, *NAMES[3])
    size = int(a.big_prompt_mb * 1e6)
    block = words(200_000, random.Random(a.seed + 3))   # ~1.2 MB; repeated, it tokenizes as slowly as fresh text
    big = (block * (size // len(block) + 1))[:size]
    bodies = {"chat": json.dumps({"model": t.model, "messages": [{"role": "user", "content": big}],
                                  "max_tokens": 1}).encode(),
              "tokenize": json.dumps({"model": t.model, "prompt": big}).encode()}
    del big, block
    async with client(t, a.streams + 2, timeout=a.request_timeout) as c, client(t, 1, timeout=a.request_timeout) as hc:
        probes, tasks = await start_streams(c, t, a.streams, stream_tokens(t, a.stream_tokens), a.seed + 30)
        health: list[tuple[float, float]] = []
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(hc, stop, health))
        try:
            q0 = time.perf_counter()
            await asyncio.sleep(a.quiet_s)
            windows = {"quiet": (q0, time.perf_counter(), None, 0.0)}
            for route, body in bodies.items():
                w0 = time.perf_counter()
                try:
                    r = await c.post("/v1/chat/completions" if route == "chat" else "/v1/tokenize", content=body,
                                     headers={"Content-Type": "application/json"})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.perf_counter() - w0
                await asyncio.sleep(0.5)    # a stall that outlasts the answer still counts
                windows[route] = (w0, time.perf_counter(), status, took)
        finally:
            stop.set()
            # Cancelled, not awaited: on Ctrl-C its /health may be stuck behind the very stall being measured.
            await stop_streams([poller, *tasks])
    worst_all = 0.0
    for name, (w0, w1, status, took) in windows.items():
        gaps = [p.max_gap(w0, w1) for p in probes]
        h = worst_health(health, w0, w1)
        if name != "quiet":
            worst_all = max(worst_all, h, *gaps)
        what = (f"quiet {w1 - w0:.1f} s before" if name == "quiet" else
                f"{a.big_prompt_mb:g} MB to /v1/{'chat/completions' if name == 'chat' else 'tokenize'}: "
                f"HTTP {status} after {took:.1f} s")
        row.details.append(f"{what}: longest stream gap {max(gaps, default=0):.2f} s "
                           f"(per stream {', '.join(f'{g:.2f}' for g in gaps)}), longest /health {h:.2f} s")
    broken = [p.error for p in probes if p.error]
    if broken:
        row.details.append(f"streams that failed: {broken}")
    chat_w, tok_w = windows["chat"], windows["tokenize"]
    short = sum(not p.ran_through(tok_w[1]) for p in probes)
    if short:
        row.details.append(f"{short} of {len(probes)} streams ended before the last window did (raise "
                           "--stream-tokens): their gaps cover less than the window")
    measured = short < len(probes) or worst_all > STALL_BAR_S    # a stall seen counts even if streams were short
    row.passed = (worst_all <= STALL_BAR_S and not broken) if measured else None
    row.summary = (f"{a.streams} streams, {a.big_prompt_mb:g} MB prompt: chat HTTP {chat_w[2]} in {chat_w[3]:.1f} s, "
                   f"tokenize HTTP {tok_w[2]} in {tok_w[3]:.1f} s; worst stall {worst_all:.2f} s")
    return row


# ---------------------------------------------------------------------------------------------------------
# 4. Chunked body


class RssSampler:
    """The server's RSS every `every_s` on a thread, while in a `with` block."""

    def __init__(self, pid: int, every_s: float = 0.02):
        self.pid, self.every_s = pid, every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < 1_000_000:
            try:
                self.samples.append(rss_bytes(self.pid))
            except Exception:   # noqa: BLE001 (the server is gone: psutil.NoSuchProcess, or OSError from /proc)
                return
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def send_chunked(t: Target, total: int, deadline_s: float, piece: int = 2**20) -> dict:
    """POST a chunked JSON body of up to `total` bytes (an unterminated string, so even a server that reads it
    all answers 400 after one parse instead of tokenizing it), stopping when the server answers, closes, or
    stops reading for 5 s. Returns what happened."""
    deadline = time.monotonic() + deadline_s
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {t.netloc}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n" + "".join(f"{k}: {v}\r\n" for k, v in t.headers.items()) + "\r\n")
    prefix = json.dumps({"model": t.model, "messages": [{"role": "user", "content": ""}]})[:-4].encode()
    filler = b"a" * piece
    out = {"sent": 0, "how": "sent all", "status": None, "t_answer": None}
    t0 = time.monotonic()
    with socket.create_connection((t.host, t.port), timeout=10) as s:
        s.sendall(head.encode())
        s.settimeout(5)   # a send that blocks this long: the server stopped reading
        try:
            while out["sent"] < total:
                if select.select([s], [], [], 0)[0]:
                    out["how"] = "server answered mid-body"
                    break
                if time.monotonic() > deadline:
                    out["how"] = "time limit"
                    break
                data = (prefix + filler[len(prefix):] if out["sent"] == 0 else filler)[:total - out["sent"]]
                s.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
                out["sent"] += len(data)
            else:
                s.sendall(b"0\r\n\r\n")
        except TimeoutError:
            out["how"] = "server stopped reading"
        except OSError as e:
            out["how"] = f"server closed ({type(e).__name__})"
        buf = b""
        # After the whole body the server may parse it for a while; otherwise its answer is already due.
        s.settimeout(120 if out["how"] == "sent all" else 10)
        try:
            while b"\r\n\r\n" not in buf and len(buf) < 65536:
                got = s.recv(65536)
                if not got:
                    break
                buf += got
            if buf.endswith(b"\r\n\r\n"):     # the head came alone: give the body a moment
                s.settimeout(1)
                buf += s.recv(2048)
        except OSError:
            pass
        out["t_answer"] = time.monotonic() - t0
    if buf.startswith(b"HTTP/"):
        out["status"] = int(buf.split()[1])
        out["body"] = buf.partition(b"\r\n\r\n")[2][:160].decode(errors="replace")
    return out


def chunked_body(t: Target, a) -> Row:
    row = Row(4, *NAMES[4])
    total = int(a.chunked_mib * 2**20)
    if t.pid is None:
        res = send_chunked(t, total, a.chunked_timeout)
        peak = growth = None
    else:
        before, hwm0 = rss_bytes(t.pid), vm_hwm(t.pid)
        with RssSampler(t.pid) as sampler:
            res = send_chunked(t, total, a.chunked_timeout)
            time.sleep(0.5)
        hwm1 = vm_hwm(t.pid)
        peak = max(sampler.samples + [before])
        if hwm0 is not None and hwm1 is not None and hwm1 > hwm0:
            peak = max(peak, hwm1)    # the kernel's high-water mark catches a peak between samples
        growth = peak - before
    early = res["sent"] <= CHUNKED_EARLY_BYTES
    refused = res["status"] == 413 or (res["status"] is None and res["how"].startswith("server"))
    row.passed = early and refused and (growth is None or growth < CHUNKED_RSS_BAR)
    if growth is None:
        row.passed = None if row.passed else False
    row.summary = (f"HTTP {res['status'] or 'none'} after {mib(res['sent'])} of {mib(total)} sent "
                   f"({res['how']}, {res['t_answer']:.1f} s); server RSS " +
                   (f"+{mib(growth)} (peak {mib(peak)})" if growth is not None else "not measured (no --server-pid)"))
    if res.get("body"):
        row.details.append(f"answer body starts: {res['body']!r}")
    return row


# ---------------------------------------------------------------------------------------------------------
# 5. Render vs generation


def worst_markdown(n_chars: int) -> str:
    """Markdown that is slow to render and renders large: short math spans (each becomes a MathML tree, ~25x
    the input) in paragraphs, 6-deep lists and tables, plus code and display math. Lists stay 6 deep:
    markdown-it stops parsing past its nesting limit, which would make the text cheap."""
    math = "$x$ $y$ $a$ $b_1$ \\(z\\) " * 40 + "\n\n"
    nested = "".join("  " * d + f"- $x$ $y$ $z$ **{d}**\n" for d in range(6)) + "\n"
    table = "| a | b | c | d |\n|:-|:-:|-:|-|\n" + "| $x$ | $y$ | $z$ | `d` |\n" * 20 + "\n"
    code = "```python\n" + "def f(x):\n    return [i ** 2 for i in range(x) if i % 3]  # comment\n" * 8 + "```\n\n"
    display = "\\[\n\\frac{\\sum_{i=1}^{n} x_i^2}{\\sqrt{\\alpha + \\beta}}\n\\]\n\n"
    unit = math * 4 + nested + table + code + display
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


async def render_call(c: httpx.AsyncClient, body: bytes) -> tuple[object, float, int]:
    t0 = time.perf_counter()
    try:
        r = await c.post("/app/api/render", content=body, headers={"Content-Type": "application/json"})
        return r.status_code, time.perf_counter() - t0, len(r.content)
    except httpx.HTTPError as e:
        return type(e).__name__, time.perf_counter() - t0, 0


async def render(t: Target, a) -> Row:
    row = Row(5, *NAMES[5])
    text = worst_markdown(int(a.render_kb * 1000))
    body = json.dumps({"texts": [text]}).encode()
    results: list[tuple[object, float, int]] = []

    async def renderer(until: float) -> None:
        # Back to back, so --renders calls run at every moment of the window (fast refusals too); the window
        # lasts at least as long as the solo one, so both rates count comparable numbers of chunks.
        for _ in range(a.render_max_calls):
            results.append(await render_call(c, body))
            if time.perf_counter() >= until:
                return

    async with client(t, a.renders + 2, timeout=a.request_timeout) as c:
        probes, tasks = await start_streams(c, t, 1, stream_tokens(t, a.stream_tokens), a.seed + 50)
        try:
            s0 = time.perf_counter()
            await asyncio.sleep(a.render_alone_s)
            s1 = time.perf_counter()
            await asyncio.gather(*(renderer(s1 + a.render_alone_s) for _ in range(a.renders)))
            s2 = time.perf_counter()
        finally:
            await stop_streams(tasks)
    p = probes[0]
    alone, during = p.rate(s0, s1), p.rate(s1, s2)
    ratio = during / alone if alone else 0.0
    row.passed = ratio >= RENDER_RATE_BAR and not p.error
    statuses = Counter(s for s, _, _ in results)
    row.summary = (f"stream {alone:.1f} tok/s alone → {during:.1f} tok/s during {a.renders} parallel renders "
                   f"({ratio:.2f}x); {len(results)} renders {dict(statuses)} took {min(r[1] for r in results):.1f}–"
                   f"{max(r[1] for r in results):.1f} s, {len(text) / 1e3:.0f} KB → "
                   f"{max(r[2] for r in results) / 1e6:.1f} MB")
    row.details = [f"render window {s2 - s1:.1f} s (solo window {s1 - s0:.1f} s); per call (status, s, response "
                   "bytes): " + ", ".join(f"({s}, {d:.1f}, {n})" for s, d, n in results[:12])
                   + (" ..." if len(results) > 12 else ""),
                   "tok/s counts content chunks of one greedy stream (ignore_eos)"]
    if not p.ran_through(s2):
        row.details.append("the stream ended before the renders did (raise --stream-tokens): the rate during "
                           "them covers only its part of the window")
        if p.ended <= s1 + 0.1:
            row.passed = None
    if p.error:
        row.details.append(f"the stream failed: {p.error}")
    return row


# ---------------------------------------------------------------------------------------------------------
# 6. Slowloris


def slowloris(t: Target, a) -> Row:
    row = Row(6, *NAMES[6])
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {t.netloc}\r\n"
            "Content-Type: application/json\r\n").encode()
    log0 = t.log_path.stat().st_size if t.log_path and t.log_path.exists() else None
    socks: list[socket.socket | None] = []
    refused = 0
    t0 = time.monotonic()
    try:
        for _ in range(a.slowloris):
            try:
                s = socket.create_connection((t.host, t.port), timeout=5)
                s.sendall(head)
                s.setblocking(False)
                socks.append(s)
            except OSError:
                refused += 1
                socks.append(None)
        open_s = time.monotonic() - t0
        state = ["open" if s else "refused" for s in socks]
        wait_s = a.header_timeout + a.slowloris_grace
        normal = []
        next_trickle, pad, timed_mid = t0 + a.trickle_s, 0, False
        with httpx.Client(base_url=t.url, headers=t.headers, timeout=30) as hc:
            while time.monotonic() - t0 < wait_s:
                now = time.monotonic()
                if a.trickle_s > 0 and now >= next_trickle:
                    pad += 1
                    for i in range(1, len(socks), 2):     # odd sockets trickle, even ones stay silent
                        if state[i] == "open":
                            try:
                                socks[i].send(f"X-Pad-{pad}: 1\r\n".encode())
                            except BlockingIOError:
                                pass
                            except OSError:
                                state[i] = "closed"
                    next_trickle = now + a.trickle_s
                if not timed_mid and now - t0 >= wait_s / 2:
                    normal.append(("during", *timed_requests(hc, t)))
                    timed_mid = True
                time.sleep(min(0.25, max(0.0, wait_s - (time.monotonic() - t0))))
            for i, s in enumerate(socks):
                if state[i] == "open":
                    state[i] = peek(s)
            normal.append(("after", *timed_requests(hc, t)))
    finally:
        for s in socks:
            if s is not None:
                s.close()
    log_growth = (t.log_path.stat().st_size - log0) if log0 is not None else None
    counts = Counter(state)
    idle_open = sum(st == "open" for st in state[0::2])
    trickle_open = sum(st == "open" for st in state[1::2])
    ok_normal = all(status == 200 for _, status, _, _ in normal)
    row.passed = counts["open"] == 0 and ok_normal
    row.summary = (f"{counts['open']}/{a.slowloris} still open after {wait_s:g} s (silent {idle_open}/"
                   f"{len(state[0::2])}, trickling {trickle_open}/{len(state[1::2])}); normal request " +
                   "; ".join(f"{when}: HTTP {st} in {dt:.2f} s" for when, st, dt, _ in normal))
    row.details = [(f"opened {a.slowloris} sockets in {open_s:.1f} s ({refused} refused at connect); end states "
                    f"{dict(counts)} (answered: the server sent bytes; closed: EOF or reset)"),
                   "normal requests: " + "; ".join(f"{when} {what}" for when, _, _, what in normal)]
    if log_growth is not None:
        row.details.append(f"server log grew {log_growth} bytes meanwhile")
    return row


def peek(s: socket.socket) -> str:
    """open / answered / closed, without blocking (poll, not select: select fails past fd 1024)."""
    try:
        p = select.poll()
        p.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not p.poll(0):
            return "open"
        return "answered" if s.recv(65536) else "closed"
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"


def timed_requests(hc: httpx.Client, t: Target) -> tuple[object, float, str]:
    """GET /health then a 2-token chat: (worst status, total seconds, what each did)."""
    parts, statuses, t0 = [], [], time.monotonic()
    for method, path, body in (("GET", "/health", None),
                               ("POST", "/v1/chat/completions",
                                {"model": t.model, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 2, "temperature": 0})):
        s0 = time.monotonic()
        try:
            status = hc.request(method, path, json=body).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        statuses.append(status)
        parts.append(f"{path} {status} {time.monotonic() - s0:.2f} s")
    worst = next((s for s in statuses if s != 200), 200)
    return worst, time.monotonic() - t0, ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Driver


def loopback_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url.rstrip("/"))
    host = parts.hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if parts.scheme != "http" or not ok:
        raise SystemExit(f"--url must be http:// on a loopback address (127.0.0.0/8, ::1, localhost), got {url}")
    base = f"http://{host if ':' not in host else f'[{host}]'}:{parts.port or 80}"
    return base, host, parts.port or 80


def start(a, tmp: Path) -> Target:
    """This checkout's `nanoseek serve` on a free loopback port, with an unlimited key and high prices."""
    prices_path = tmp / "prices.json"
    prices_path.write_text(json.dumps({"default": PRICES}))
    _, secret = create_key(tmp, "abuse-admin")
    args = ["--model", a.model, "--device", a.device, "--prices", str(prices_path), *a.server_arg]
    if a.threads:
        args += ["--threads", str(a.threads)]
    print(f"starting nanoseek serve {' '.join(args)} ...", file=sys.stderr)
    server = start_server(args, tmp)
    t = Target(server.url, "127.0.0.1", int(server.url.rsplit(":", 1)[1]), bearer(secret), pid=server.pid,
               data_dir=tmp, log_path=server.log_path, proc=server)
    t.desc = f"`nanoseek serve {' '.join(args)}` started by this script (this checkout, {git_rev()})"
    return t


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=False, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False, timeout=10).stdout.strip()
        return f"commit {rev}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"


def describe(t: Target) -> None:
    """Fill in the served model, its context and prices (the web app's config says; else ours)."""
    r = httpx.get(t.url + "/v1/models", headers=t.headers, timeout=30).raise_for_status().json()["data"][0]
    t.model, t.context = r["id"], r.get("max_model_len") or t.context
    try:
        cfg = httpx.get(t.url + "/app/api/config", headers=t.headers, timeout=30).json()
        t.prices = next(m["prices"] for m in cfg["models"] if m["id"] == t.model)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, StopIteration):
        pass    # no web app config: the started server's prices are ours; an external one's may differ


def run_all(t: Target, a, only: list[int]) -> list[Row]:
    jobs = {1: lambda: asyncio.run(budget_race(t, a)), 2: lambda: asyncio.run(cross_key(t, a)),
            3: lambda: asyncio.run(stall(t, a)), 4: lambda: chunked_body(t, a),
            5: lambda: asyncio.run(render(t, a)), 6: lambda: slowloris(t, a)}
    rows = {}
    # Cheapest and least disturbing first: the 1 GiB body leaves the server's memory high, slowloris its sockets.
    for n in [n for n in (2, 1, 3, 5, 4, 6) if n in only]:
        dead = t.alive()
        if dead:
            rows[n] = Row(n, *NAMES[n], passed=False, summary=f"not run: {dead}")
            continue
        print(f"[{n}] {NAMES[n][0]} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            rows[n] = jobs[n]()
        except Exception as e:  # noqa: BLE001 (one measurement's failure is its row; the others still run)
            rows[n] = Row(n, *NAMES[n], passed=False, summary=f"ERROR {type(e).__name__}: {e}"[:300])
        rows[n].details.append(f"took {time.monotonic() - t0:.1f} s")
        print(f"    {rows[n].verdict}: {rows[n].summary}", file=sys.stderr, flush=True)
    return [rows[n] for n in sorted(rows)]


def markdown(a, t: Target, rows: list[Row], wall: float, load: tuple[float, ...]) -> str:
    lines = ["# Hostile-client measurements: `nanoseek serve` (issue 13, findings 1–6)\n"]
    if a.note:
        lines.append(f"**{a.note}**\n")
    lines += [f"- machine: {machine_line(a.device)}",
              (f"- server: {t.desc or t.url + ' (external; the machine line is the client)'}; model `{t.model}`, "
               f"context {t.context}, prices {t.prices} USD per 1M tokens"),
              (f"- date: {time.strftime('%Y-%m-%d %H:%M')}; total {wall:.0f} s; 1-minute load average "
               f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (a shared machine shows here)"),
              f"- command: `python benchmarks/abuse.py {shlex.join(sys.argv[1:])}`\n",
              "| # | measurement | pass bar | result | figures |", "|---|---|---|---|---|"]
    lines += [f"| {r.finding} | {r.name} | {r.bar} | {r.verdict} | {r.summary} |" for r in rows]
    lines.append("\n## Details\n")
    for r in rows:
        lines.append(f"{r.finding}. **{r.name}**")
        lines += [f"   - {d}" for d in r.details]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("#", "measurement", "result", "figures", title="abuse: issue 13 findings")
    for r in rows:
        table.add_row(str(r.finding), r.name, {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]"}.get(r.verdict, "—"),
                      r.summary)
    Console().print(table)


def parse_only(text: str) -> list[int]:
    try:
        picked = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers 1-6 separated by commas, got {text!r}") from None
    if not picked or not set(picked) <= set(NAMES):
        raise argparse.ArgumentTypeError(f"expected numbers 1-6 separated by commas, got {text!r}")
    return picked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=parse_only, default=sorted(NAMES), help="findings to measure, e.g. 1,3")
    ap.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"), help="an unlimited key for --url")
    ap.add_argument("--data-dir", default=None, help="with --url: that server's data directory (keys, ledger)")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid (memory)")
    ap.add_argument("--model", default="smollm2-135m", help="what the started server loads")
    ap.add_argument("--device", default="cpu", help="the started server's --device (also names the output)")
    ap.add_argument("--threads", type=int, default=None, help="the started server's --threads")
    ap.add_argument("--server-arg", "--serve-arg", action="append", default=[],
                    help="extra argument for the started server (repeatable, e.g. --server-arg=--header-timeout=2)")
    ap.add_argument("--request-timeout", type=float, default=180.0, help="seconds any one HTTP request may take")
    ap.add_argument("--budget-parallel", type=int, default=50)
    ap.add_argument("--budget-requests", type=int, default=5, help="how many worst-case requests the budget covers")
    ap.add_argument("--budget-max-tokens", type=int, default=16)
    ap.add_argument("--streams", type=int, default=3, help="background streams during the big prompt")
    ap.add_argument("--stream-tokens", type=int, default=3000, help="max_tokens of background streams (they are "
                    "cancelled when the measurement ends; clamped to the context)")
    ap.add_argument("--quiet-s", type=float, default=3.0, help="window before the big prompt (the normal gap)")
    ap.add_argument("--big-prompt-mb", type=float, default=15.0)
    ap.add_argument("--chunked-mib", type=float, default=1024.0)
    ap.add_argument("--chunked-timeout", type=float, default=120.0, help="seconds to keep sending the body")
    ap.add_argument("--renders", type=int, default=4)
    ap.add_argument("--render-kb", type=float, default=399.0)
    ap.add_argument("--render-alone-s", type=float, default=5.0, help="solo window, and the least the render "
                    "window lasts")
    ap.add_argument("--render-max-calls", type=int, default=25, help="render calls per parallel caller, at most")
    ap.add_argument("--slowloris", type=int, default=300, help="partial-head sockets")
    ap.add_argument("--header-timeout", type=float, default=10.0, help="the server's header timeout, seconds")
    ap.add_argument("--slowloris-grace", type=float, default=5.0, help="seconds to wait past --header-timeout")
    ap.add_argument("--trickle-s", type=float, default=2.0, help="odd sockets send a header line this often (0: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line for the top of the result file (e.g. 'pre-fix baseline')")
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/abuse-DEVICE-DATE.md)")
    a = ap.parse_args(argv)
    for name in ("budget_parallel", "budget_requests", "budget_max_tokens", "streams", "renders", "render_max_calls"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    # The started server and the Store calls here use this checkout, whichever nanoseek is installed.
    sys.path.insert(1, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

    tmp = None
    t0, load = time.monotonic(), os.getloadavg()
    if a.url:
        url, host, port = loopback_url(a.url)
        t = Target(url, host, port, bearer(a.api_key) if a.api_key else {}, pid=a.server_pid,
                   data_dir=Path(a.data_dir) if a.data_dir else None)
        if t.data_dir is not None and not a.api_key:
            t.headers = bearer(create_key(t.data_dir, "abuse-admin")[1])
    else:
        tmp = tempfile.TemporaryDirectory(prefix="nanoseek-abuse-")
        t = start(a, Path(tmp.name))
    try:
        describe(t)
        rows = run_all(t, a, a.only)
    finally:
        if t.proc is not None:
            t.proc.stop()
        if tmp is not None:
            tmp.cleanup()
    wall = time.monotonic() - t0
    print_table(rows)
    device = "remote" if a.url else a.device.split(":")[0]
    out = Path(a.out or REPO / f"benchmarks/results/abuse-{device}-{time.strftime('%Y-%m-%d-%H%M')}.md")
    write_atomic(out, markdown(a, t, rows, wall, load))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
