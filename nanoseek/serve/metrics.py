"""Prometheus metrics of the server (GET /metrics), one registry per app.

Owns `ServerMetrics`: the app's `CollectorRegistry` with
  * the scheduler's state and counters, read from `Scheduler.stats()` at scrape time by a custom collector
    (`_SchedulerCollector`), so the engine loop never does metrics work: running/waiting requests, KV rows
    in use, prefix-cache pool blocks filled, prefix-cache queried/hit tokens (hit rate = Δhits / Δqueries),
    prompt/generation token totals, decode steps and the decode batch-size histogram, finished requests by
    reason;
  * latency histograms observed on the server side as deltas reach the event loop (`RequestTimer`), i.e.
    what a client sees minus the network: time to first token, inter-token latency, end-to-end latency.
Every series carries `model_name`. Names follow vLLM's (`vllm:num_requests_running` →
`nanoseek_num_requests_running`), so a vLLM dashboard needs only its prefix changed; the separator is `_`
because Prometheus reserves `:` for recording rules (and prometheus_client's OpenMetrics output escapes a
colon in sample names but not in their TYPE lines). Counts are per engine request: a chat request with
n = 2 is two requests here, as it is to the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

PREFIX = "nanoseek_"
LABEL = "model_name"

# Bucket edges, seconds. vLLM's edges plus finer ones at the bottom: a small model on CPU streams a token
# every few milliseconds, and its whole latency curve would otherwise sit in the first bucket.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)


class RequestTimer:
    """Latency of the choices of one HTTP request, fed by serve/bridge.Job with every delta it hands out.
    TTFT and end-to-end count from submission; a cancelled choice (client gone, server stopping) has no
    end-to-end latency, like vLLM's aborted requests."""

    def __init__(self, ttft: Histogram, itl: Histogram, e2e: Histogram, n: int):
        self._ttft, self._itl, self._e2e = ttft, itl, e2e
        self.start = time.monotonic()
        self._last: list[float | None] = [None] * n

    def delta(self, i: int, tokens: int, finish_reason: str | None) -> None:
        now = time.monotonic()
        if tokens:
            last = self._last[i]
            if last is None:
                self._ttft.observe(now - self.start)
            else:
                # One gap per delta, shared by its tokens: the scheduler emits one token per step.
                gap = (now - last) / tokens
                for _ in range(tokens):
                    self._itl.observe(gap)
            self._last[i] = now
        if finish_reason is not None and finish_reason != "cancelled":
            self._e2e.observe(now - self.start)


class ServerMetrics:
    """The metrics of one app. `stats` maps model name → a zero-argument callable returning the scheduler's
    stats() dict (read at every scrape)."""

    def __init__(self, stats: Mapping[str, Callable[[], dict]]):
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(stats))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from submission to the first "
                              "generated token, per request.", [LABEL], buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive generated "
                             "tokens of a request.", [LABEL], buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from submission to the last token "
                             "of a finished (not cancelled) request.", [LABEL], buckets=E2E_BUCKETS,
                             registry=self.registry)
        for model in stats:   # every series exists from the start, at zero (absent ≠ zero to a query)
            for h in (self.ttft, self.itl, self.e2e):
                h.labels(model)

    def timer(self, model: str, n: int) -> RequestTimer:
        return RequestTimer(self.ttft.labels(model), self.itl.labels(model), self.e2e.labels(model), n)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, negotiated from the Accept header (Prometheus text
        0.0.4 by default, OpenMetrics when the scraper asks for it)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _batch_buckets(rows_total: int) -> list[int]:
    """Powers of two up to the batch limit, then the limit itself."""
    edges, b = [], 1
    while b < rows_total:
        edges.append(b)
        b *= 2
    return edges + [max(rows_total, 1)]


class _SchedulerCollector:
    """Reads every scheduler's stats() at scrape time. The prefix-cache keys are read with .get(): a
    scheduler without a prefix cache reports zeros."""

    def __init__(self, stats: Mapping[str, Callable[[], dict]]):
        self._stats = stats

    def describe(self):
        return []   # nothing to check for name clashes up front; stats() is only called on a scrape

    def collect(self):
        def gauge(name, doc):
            return GaugeMetricFamily(PREFIX + name, doc, labels=[LABEL])

        def counter(name, doc, extra=()):
            return CounterMetricFamily(PREFIX + name, doc, labels=[LABEL, *extra])

        running = gauge("num_requests_running", "Requests holding a KV-cache row (decoding or prefilling).")
        prefilling = gauge("num_requests_prefilling", "Running requests still prefilling their prompt.")
        waiting = gauge("num_requests_waiting", "Requests queued for a KV-cache row.")
        rows_used = gauge("kv_cache_rows_used", "KV-cache rows (one per running request) in use.")
        rows_total = gauge("kv_cache_rows_total", "KV-cache rows, i.e. the most requests that run at once.")
        usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache rows in use (0..1).")
        blocks_used = gauge("prefix_cache_blocks_used", "Prefix-cache pool blocks holding cached keys/values "
                            "(they stay after their requests end, until evicted).")
        blocks_total = gauge("prefix_cache_blocks_total", "Prefix-cache pool blocks.")
        queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed).")
        prompt = counter("prompt_tokens", "Prompt tokens of admitted requests (prefix-cache hits included).")
        generation = counter("generation_tokens", "Tokens generated.")
        steps = counter("decode_steps", "Decode forward passes.")
        max_batch = gauge("decode_batch_size_max", "Largest decode batch seen since start.")
        batch = HistogramMetricFamily(PREFIX + "decode_batch_size", "Rows decoded together per decode step.",
                                      labels=[LABEL])
        finished = counter("request_finished", "Requests finished, by finish reason.", ["finished_reason"])
        drafted = counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed.")
        accepted = counter("spec_decode_num_accepted_tokens", "Speculative draft tokens the model accepted.")
        verify = counter("spec_decode_num_verify_steps", "Decode steps that verified drafts.")
        rate = gauge("spec_decode_acceptance_rate", "Accepted / proposed draft tokens since start (0 without drafts).")
        per_step = gauge("spec_decode_tokens_per_step", "Tokens emitted per drafting row per verify step "
                         "(1 without drafts).")
        for model, read in self._stats.items():
            s = read()
            m = [model]
            running.add_metric(m, s["running"])
            prefilling.add_metric(m, s.get("prefilling", 0))
            waiting.add_metric(m, s["waiting"])
            rows_used.add_metric(m, s["rows_used"])
            rows_total.add_metric(m, s["rows_total"])
            usage.add_metric(m, s["rows_used"] / s["rows_total"] if s["rows_total"] else 0.0)
            blocks_used.add_metric(m, s.get("prefix_blocks_used", 0))
            blocks_total.add_metric(m, s.get("prefix_blocks_total", 0))
            queries.add_metric(m, s.get("prefix_queried_tokens", 0))
            hits.add_metric(m, s.get("prefix_hit_tokens", 0))
            prompt.add_metric(m, s["prompt_tokens"])
            generation.add_metric(m, s["generation_tokens"])
            steps.add_metric(m, s["steps"])
            max_batch.add_metric(m, s["max_batch_seen"])
            hist = s["batch_size_histogram"]
            edges = _batch_buckets(max(s["rows_total"], max(hist, default=0)))
            cumulative = [(floatToGoString(e), sum(c for size, c in hist.items() if size <= e)) for e in edges]
            cumulative.append(("+Inf", sum(hist.values())))
            batch.add_metric(m, cumulative, sum_value=sum(size * c for size, c in hist.items()))
            for reason, count in sorted(s["finished"].items(), key=lambda kv: str(kv[0])):
                finished.add_metric([model, str(reason)], count)
            drafted.add_metric(m, s.get("spec_draft_tokens", 0))
            accepted.add_metric(m, s.get("spec_accepted_tokens", 0))
            verify.add_metric(m, s.get("spec_verify_steps", 0))
            rate.add_metric(m, s.get("spec_acceptance_rate") or 0.0)
            per_step.add_metric(m, s.get("spec_tokens_per_step") or 1.0)
        yield from (running, prefilling, waiting, rows_used, rows_total, usage, blocks_used, blocks_total,
                    queries, hits, prompt, generation, steps, max_batch, batch, finished, drafted, accepted,
                    verify, rate, per_step)
