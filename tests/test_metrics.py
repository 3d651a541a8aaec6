"""GET /metrics (nanoseek/serve/metrics.py): Prometheus exposition that Prometheus' own parser reads.

First the collector alone, on stats() dicts written by hand (bucket arithmetic, absent prefix-cache keys,
one registry per app); then a live server with two models: every family is there with the right type for
each model, and a few known requests move the counters and server-side latency histograms by exactly what
they did.
"""

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from nanoseek.serve.app import create_app
from nanoseek.serve.metrics import ServerMetrics
from test_chat import CHATML
from test_serve import _Server, _served, metric, scrape

FAMILIES = {
    "gauge": ["num_requests_running", "num_requests_prefilling", "num_requests_waiting", "kv_cache_rows_used",
              "kv_cache_rows_total", "kv_cache_usage_perc", "prefix_cache_blocks_used", "prefix_cache_blocks_total",
              "decode_batch_size_max"],
    "counter": ["prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens", "decode_steps",
                "request_finished"],
    "histogram": ["decode_batch_size", "time_to_first_token_seconds", "inter_token_latency_seconds",
                  "e2e_request_latency_seconds"],
}


def _stats(**over) -> dict:
    s = {"running": 3, "decoding": 2, "prefilling": 1, "waiting": 5, "rows_used": 3, "rows_total": 16, "steps": 6,
         "batch_size_histogram": {1: 3, 3: 2, 16: 1}, "max_batch_seen": 16, "prompt_tokens": 100,
         "generation_tokens": 40, "finished": {"length": 4, "stop": 1}}
    return {**s, **over}


def _families(body: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body)}


def test_collector_turns_stats_into_families():
    body, content_type = ServerMetrics({"m": _stats}).render(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    fams = _families(body.decode())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}

    def value(name, **labels):
        return samples[("nanoseek_" + name, tuple(sorted({"model_name": "m", **labels}.items())))]

    assert value("num_requests_running") == 3 and value("num_requests_waiting") == 5
    assert value("kv_cache_usage_perc") == pytest.approx(3 / 16)
    # A scheduler without a prefix cache (no prefix_* keys) reports zeros rather than failing the scrape.
    assert value("prefix_cache_queries_total") == value("prefix_cache_blocks_total") == 0
    # Cumulative buckets at powers of two up to the row count: {1: 3, 3: 2, 16: 1}.
    buckets = {le: value("decode_batch_size_bucket", le=le) for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "+Inf")}
    assert buckets == {"1.0": 3, "2.0": 3, "4.0": 5, "8.0": 5, "16.0": 6, "+Inf": 6}
    assert value("decode_batch_size_count") == 6 and value("decode_batch_size_sum") == 3 + 6 + 16
    assert value("request_finished_total", finished_reason="length") == 4
    assert fams["nanoseek_decode_batch_size"].type == "histogram"


def test_prefix_cache_stats_are_exported():
    stats = _stats(prefix_queried_tokens=640, prefix_hit_tokens=512, prefix_blocks_used=40, prefix_blocks_total=1024)
    fams = _families(ServerMetrics({"m": lambda: stats}).render(None)[0].decode())
    got = {s.name: s.value for name in ("nanoseek_prefix_cache_queries", "nanoseek_prefix_cache_hits",
                                         "nanoseek_prefix_cache_blocks_used", "nanoseek_prefix_cache_blocks_total")
           for s in fams[name].samples}
    assert got == {"nanoseek_prefix_cache_queries_total": 640, "nanoseek_prefix_cache_hits_total": 512,
                   "nanoseek_prefix_cache_blocks_used": 40, "nanoseek_prefix_cache_blocks_total": 1024}


def test_each_app_has_its_own_registry():
    a, b = ServerMetrics({"m": _stats}), ServerMetrics({"m": _stats})
    t = a.timer("m", 1)
    t.delta(0, 1, None)
    t.delta(0, 1, "length")

    def count(metrics, name):
        return next(s.value for s in _families(metrics.render(None)[0].decode())[name].samples
                    if s.name == name + "_count")
    assert count(a, "nanoseek_time_to_first_token_seconds") == 1
    assert count(a, "nanoseek_inter_token_latency_seconds") == 1
    assert count(a, "nanoseek_e2e_request_latency_seconds") == 1
    assert count(b, "nanoseek_time_to_first_token_seconds") == 0


def test_a_cancelled_choice_has_no_end_to_end_latency():
    m = ServerMetrics({"m": _stats})
    t = m.timer("m", 2)
    t.delta(0, 1, None)
    t.delta(1, 0, "cancelled")       # never got a token: no TTFT either
    fams = _families(m.render(None)[0].decode())
    counts = {f: next(s.value for s in fams[f].samples if s.name == f + "_count")
              for f in ("nanoseek_time_to_first_token_seconds", "nanoseek_e2e_request_latency_seconds")}
    assert counts == {"nanoseek_time_to_first_token_seconds": 1, "nanoseek_e2e_request_latency_seconds": 0}


# ---------------------------------------------------------------------------------------------------------
# A live server


@pytest.fixture(scope="module")
def server():
    served = {"alpha": _served("alpha", CHATML, max_batch=4), "beta": _served("beta", CHATML, max_batch=2)}
    s = _Server(create_app(served, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    for m in served.values():
        m.scheduler.stop(timeout=5)


def test_every_family_for_every_model(server):
    r = httpx.get(server.url + "/v1/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = _families(r.text)
    for kind, names in FAMILIES.items():
        for name in names:
            fam = fams["nanoseek_" + name]
            assert fam.type == kind, name
            if name != "request_finished":     # has samples once a request finished
                assert {s.labels["model_name"] for s in fam.samples} == {"alpha", "beta"}, name
    scraped = scrape(server.url)
    assert metric(scraped, "nanoseek_kv_cache_rows_total", "alpha") == 4
    assert metric(scraped, "nanoseek_kv_cache_rows_total", "beta") == 2


def test_openmetrics_when_asked(server):
    r = httpx.get(server.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    names = {f.name for f in parse_openmetrics(r.text)}
    assert {"nanoseek_num_requests_running", "nanoseek_time_to_first_token_seconds"} <= names


def test_requests_move_the_counters_by_what_they_did(server):
    client = server.client()
    before = scrape(server.url)
    msgs = [{"role": "user", "content": "count me"}]
    whole = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=5, temperature=0, n=2)
    streamed = list(client.chat.completions.create(model="alpha", messages=msgs, max_tokens=7, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    usage = streamed[-1].usage
    after = scrape(server.url)

    def gained(name, model="alpha", **labels):
        return metric(after, name, model, absent=0, **labels) - metric(before, name, model, absent=0, **labels)

    choices = 3
    tokens = whole.usage.completion_tokens + usage.completion_tokens
    assert gained("nanoseek_generation_tokens_total") == tokens
    # the scheduler counts every choice's prompt, cache hits included
    assert gained("nanoseek_prompt_tokens_total") == 2 * whole.usage.prompt_tokens + usage.prompt_tokens
    assert gained("nanoseek_prefix_cache_queries_total") == 2 * whole.usage.prompt_tokens + usage.prompt_tokens
    assert gained("nanoseek_request_finished_total", finished_reason="length") == choices
    assert gained("nanoseek_time_to_first_token_seconds_count") == choices
    assert gained("nanoseek_e2e_request_latency_seconds_count") == choices
    assert gained("nanoseek_inter_token_latency_seconds_count") == tokens - choices   # gaps between tokens
    assert gained("nanoseek_e2e_request_latency_seconds_sum") >= gained("nanoseek_time_to_first_token_seconds_sum")
    for name in ("nanoseek_generation_tokens_total", "nanoseek_time_to_first_token_seconds_count"):
        assert gained(name, model="beta") == 0    # per model: the other model's series did not move
    for name in ("nanoseek_num_requests_running", "nanoseek_num_requests_waiting", "nanoseek_kv_cache_rows_used"):
        assert metric(after, name, "alpha") == 0
