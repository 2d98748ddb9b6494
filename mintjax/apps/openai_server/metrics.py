"""Prometheus metrics of the OpenAI server (official prometheus-client).

Owns `ServerMetrics`: per-request counters and latency histograms observed
by the routes, plus a collector that reads the `EngineService` snapshot at
scrape time (queue depth, batch occupancy, residency per tier, compilations
after warm-up), so the engine thread never blocks on metrics. Each server
has its own `CollectorRegistry`, so several servers can live in one process
(tests, benchmarks).

Names (all prefixed `mintjax_`):
  requests_total{endpoint,status}           counter
  time_to_first_token_seconds               histogram
  time_per_output_token_seconds             histogram
  prompt_tokens_total, generation_tokens_total
  engine_requests_total{outcome}  completed/refused/cancelled/timed_out/failed
  queue_depth, running_requests, batch_occupancy (0..1)     gauges
  residency_{hits,misses,loads,evictions}_total{tier}       counters
  compilations_since_warmup, backend_compiles_since_warmup  gauges
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mintjax.serve.service import EngineService, RequestHandle

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class _ServiceCollector:
  """Reads the service's last snapshot at scrape time."""

  def __init__(self, service: EngineService):
    self.service = service

  def collect(self):
    snap = self.service.snapshot()
    stats = snap.get("stats", {})
    yield GaugeMetricFamily("mintjax_queue_depth",
                            "Requests waiting for a batch row",
                            value=snap["queue_depth"])
    yield GaugeMetricFamily("mintjax_running_requests",
                            "Requests in a batch row", value=snap["running"])
    yield GaugeMetricFamily(
        "mintjax_batch_occupancy", "Fraction of batch rows in use",
        value=snap["running"] / max(snap.get("max_batch", 1), 1))
    yield GaugeMetricFamily(
        "mintjax_compilations_since_warmup",
        "Step programs compiled after warm-up (0 when adapters are data)",
        value=stats.get("compilations_since_warmup", 0))
    yield GaugeMetricFamily(
        "mintjax_backend_compiles_since_warmup",
        "XLA compilations of any function after warm-up",
        value=stats.get("backend_compiles_since_warmup", 0))
    for name, key in (("decode_calls", "decode_calls"),
                      ("prefill_calls", "prefill_calls")):
      yield CounterMetricFamily(f"mintjax_{name}",
                                f"Device calls ({name.split('_')[0]})",
                                value=stats.get(key, 0))
    fam = CounterMetricFamily("mintjax_engine_requests",
                              "Finished engine requests by outcome",
                              labels=["outcome"])
    for outcome, n in snap.get("outcomes", {}).items():
      fam.add_metric([outcome], n)
    yield fam
    tiers = stats.get("residency", {})
    for field in ("hits", "misses", "loads", "evictions"):
      fam = CounterMetricFamily(f"mintjax_residency_{field}",
                                f"Adapter residency {field} per tier",
                                labels=["tier"])
      for tier in ("device", "host", "store"):
        fam.add_metric([tier], tiers.get(tier, {}).get(field, 0))
      yield fam


class ServerMetrics:
  """The metrics one server exposes at /metrics."""

  def __init__(self, service: EngineService):
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter("mintjax_requests", "HTTP requests by endpoint "
                            "and status", ["endpoint", "status"], registry=r)
    self.ttft = Histogram("mintjax_time_to_first_token_seconds",
                          "Submission to first generated token",
                          buckets=_TTFT_BUCKETS, registry=r)
    self.tpot = Histogram("mintjax_time_per_output_token_seconds",
                          "Mean time per output token after the first",
                          buckets=_TPOT_BUCKETS, registry=r)
    self.prompt_tokens = Counter("mintjax_prompt_tokens", "Prompt tokens",
                                 registry=r)
    self.generation_tokens = Counter("mintjax_generation_tokens",
                                     "Generated tokens", registry=r)
    r.register(_ServiceCollector(service))

  def observe(self, handle: RequestHandle) -> None:
    """Records a finished request's latencies and token counts."""
    ttft, tpot = handle.ttft_s(), handle.tpot_s()
    if ttft is not None:
      self.ttft.observe(ttft)
    if tpot is not None:
      self.tpot.observe(tpot)
    if handle.result is not None:
      self.prompt_tokens.inc(handle.result.prompt_tokens)
      self.generation_tokens.inc(len(handle.result.tokens))

  def render(self) -> bytes:
    return generate_latest(self.registry)
