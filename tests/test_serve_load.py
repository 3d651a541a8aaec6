"""The server under concurrent load: continuous batching must not change what any request gets.

16 streams at once through the official `openai` SDK, each greedy, each compared with the same request run
alone; /metrics must then show decode steps that ran several requests together. Then streams that hang up
midway among ones that don't: the others are unaffected, and every row comes back.

The model is tiny and random, slowed by a few milliseconds per forward so that requests overlap in time
however fast the machine is (the sleep releases the GIL and costs no CPU).
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nanoseek.serve.app import create_app
from test_chat import CHATML
from test_serve import _Server, _served, metric, scrape

STREAMS = 16
TOKENS = 16


@pytest.fixture(scope="module")
def server():
    served = {"batch": _served("batch", CHATML, slow_s=0.005, max_batch=STREAMS)}
    s = _Server(create_app(served, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    served["batch"].scheduler.stop(timeout=5)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"request number {i}: " + "xyz"[i % 3] * (i + 1)}]


def _stream(client, i: int, barrier: threading.Barrier | None = None) -> tuple[str, int]:
    if barrier is not None:
        barrier.wait(10)
    chunks = client.chat.completions.create(model="batch", messages=_messages(i), max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
        if c.usage is not None:
            usage = c.usage
    return text, usage.completion_tokens


def test_concurrent_streams_match_solo_runs_and_batch(server):
    client = server.client(timeout=60)
    solo = [_stream(client, i) for i in range(STREAMS)]
    assert len({text for text, _ in solo}) > STREAMS // 2     # distinct outputs: a mix-up would show
    before = scrape(server.url)
    barrier = threading.Barrier(STREAMS)
    with ThreadPoolExecutor(STREAMS) as pool:
        together = list(pool.map(lambda i: _stream(client, i, barrier), range(STREAMS)))
    assert together == solo
    after = scrape(server.url)

    def gained(name, **labels):
        return metric(after, name, "batch", **labels) - metric(before, name, "batch", **labels)

    assert metric(after, "nanoseek_decode_batch_size_max", "batch") > 1
    steps = gained("nanoseek_decode_batch_size_count")
    single = gained("nanoseek_decode_batch_size_bucket", le="1.0")
    assert steps > single, (steps, single)                 # some of this run's decode steps were batched
    assert gained("nanoseek_decode_batch_size_sum") / steps > 1
    assert gained("nanoseek_generation_tokens_total") == sum(n for _, n in together)
    assert gained("nanoseek_time_to_first_token_seconds_count") == STREAMS
    assert gained("nanoseek_e2e_request_latency_seconds_count") == STREAMS


def test_dropped_streams_among_live_ones(server):
    """Half the clients hang up after a few chunks; the other half get exactly their solo output, and the
    dropped requests' rows are freed (metrics back to the idle baseline)."""
    client = server.client(timeout=60)
    keep = list(range(0, STREAMS, 2))
    solo = {i: _stream(client, i) for i in keep}
    baseline = scrape(server.url)
    cancelled = metric(baseline, "nanoseek_request_finished_total", "batch", absent=0, finished_reason="cancelled")

    def drop(i: int, barrier: threading.Barrier) -> int:
        barrier.wait(10)
        body = {"model": "batch", "messages": _messages(i), "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            return len([next(lines) for _ in range(4)])

    barrier = threading.Barrier(STREAMS)
    with ThreadPoolExecutor(STREAMS) as pool:
        live = {i: pool.submit(_stream, client, i, barrier) for i in keep}
        dropped = [pool.submit(drop, i, barrier) for i in range(1, STREAMS, 2)]
        assert all(f.result() == 4 for f in dropped)
        assert {i: f.result() for i, f in live.items()} == solo

    deadline = time.monotonic() + 10
    while True:
        now = scrape(server.url)
        idle = all(metric(now, name, "batch") == metric(baseline, name, "batch") == 0 for name in
                   ("nanoseek_num_requests_running", "nanoseek_num_requests_waiting", "nanoseek_kv_cache_rows_used"))
        if idle:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    def finished(scraped, reason):
        return metric(scraped, "nanoseek_request_finished_total", "batch", absent=0, finished_reason=reason)

    gone = finished(now, "cancelled") - cancelled
    # A dropped request sampling at temperature 1 may reach EOS on its own before its hang-up is noticed; then
    # it finishes "stop" like the live ones. Every request is accounted for, and most dropped ones are cancelled.
    normal = sum(finished(now, r) - finished(baseline, r) for r in ("stop", "length"))
    assert gone + (normal - len(keep)) == len(dropped)
    assert gone >= len(dropped) // 2
