"""Fleet benchmarks: adapter-affinity vs round-robin routing, and registry
resolve latency from concurrent replicas on PostgreSQL vs SQLite.

Part 1, routing (`--part=routing`). R replicas, each a real `FleetReplica`
(an `Engine` over one shared registry with `--adapters` published
adapters), serve the same Zipf(`--zipf`) stream of requests twice, routed:
  * multiplexed: as Ray Serve's multiplexed router does, to a replica whose
    model LRU (capacity = its device slots) already holds the adapter ref,
    the least loaded of those; otherwise to the least loaded replica,
    which then holds it;
  * round-robin: request i to replica i mod R.
Both runs use fresh replicas (cold device slots and host caches) of the
same shapes. Reported per policy: device-slot hit rate, host-cache hit
rate, store loads, generated tokens per second of engine time (the sum of
the replicas' busy seconds: in a fleet they run in parallel, so this is
per replica-second). The replicas run in this process one batch at a time
(2 shared cores cannot run two engines in parallel without measuring the
scheduler instead); routing is emulated here because Ray's own router adds
nothing to slot hits but its start-up (tests/test_fleet.py runs the real
one for correctness).

Part 2, resolve latency (`--part=resolve`). N processes (one per replica)
resolve random refs of the same registry for `--seconds`, all at once:
p50 / p99 latency per resolve and total resolves per second, on a local
PostgreSQL server (tools/local_services) and on SQLite, side by side.

    .venv/bin/python -m tools.bench_fleet --part=routing
    .venv/bin/python -m tools.bench_fleet --part=resolve --replicas=4
"""

from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import EngineConfig
from mintjax.store.registry import Registry

_PART = flags.DEFINE_enum("part", "all", ["all", "routing", "resolve"],
                          "which benchmark")
_ADAPTERS = flags.DEFINE_integer("adapters", 1000, "adapters published")
_REQUESTS = flags.DEFINE_integer("requests", 480, "requests (routing)")
_REPLICAS = flags.DEFINE_integer("replicas", 2, "replicas")
_SLOTS = flags.DEFINE_integer("slots", 16, "device slots per replica")
_HOST = flags.DEFINE_integer("host_adapters", 64,
                             "host cache per replica, in adapters")
_ZIPF = flags.DEFINE_float("zipf", 1.1, "Zipf exponent of adapter choice")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "resolve: seconds per backend")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
TARGETS = ("q", "v")
RANK = 4
ENGINE = EngineConfig(num_slots=16, max_batch=8, max_len=32, steps_per_call=4,
                      prefill_batch=4, min_bucket=16, max_rank=RANK,
                      targets=TARGETS)
NEW_TOKENS = 8


def build_registry(location: str, n: int) -> list[str]:
  """Publishes n adapters (one bulk publish); returns their ids."""
  reg = Registry.open(location)
  ids = [f"user{i:05d}" for i in range(n)]
  fp = random_base(CFG, seed=0).fingerprint
  reg.create_adapters(ids, spec=dict(targets=TARGETS, rank=RANK, alpha=8.0),
                      base_fingerprint=fp, config=CFG)
  reg.publish_many([(a, AdapterWeights.random(CFG, TARGETS, RANK, alpha=8.0,
                                              seed=i)) for i, a in
                    enumerate(ids)])
  reg.close()
  return ids


def zipf_stream(ids: list[str], n: int, s: float, seed: int) -> list[str]:
  """n adapter ids, rank k drawn with probability ~ 1 / k^s."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, len(ids) + 1) ** s
  order = rng.permutation(len(ids))  # Popularity is not id order.
  picks = rng.choice(len(ids), size=n, p=p / p.sum())
  return [ids[order[k]] for k in picks]


class _AffinityRouter:
  """Ray Serve's multiplexed routing, emulated: prefer replicas whose model
  LRU (capacity entries) holds the ref, least loaded first."""

  def __init__(self, replicas: int, capacity: int, seed: int):
    self.lru = [collections.OrderedDict() for _ in range(replicas)]
    self.capacity = capacity
    self.rng = random.Random(seed)

  def route(self, ref: str, load: list[int]) -> int:
    holders = [r for r, lru in enumerate(self.lru) if ref in lru]
    pool = holders or list(range(len(self.lru)))
    best = min(load[r] for r in pool)
    r = self.rng.choice([r for r in pool if load[r] == best])
    lru = self.lru[r]
    lru[ref] = True
    lru.move_to_end(ref)
    while len(lru) > self.capacity:
      lru.popitem(last=False)
    return r


def run_routing(location: str, stream: list[str], policy: str, *,
                replicas: int, engine: EngineConfig, host_bytes: int,
                max_adapters: int | None = None) -> dict:
  """Serves `stream` with fresh replicas under one routing policy."""
  from mintjax.apps.fleet.replica import (  # pylint: disable=import-outside-toplevel
      FleetReplica, ReplicaConfig)
  cfg = ReplicaConfig(location, functools.partial(random_base, CFG, seed=0),
                      __import__("dataclasses").replace(
                          engine, host_cache_bytes=host_bytes),
                      max_adapters=max_adapters)
  reps = [FleetReplica(cfg) for _ in range(replicas)]
  router = _AffinityRouter(replicas, cfg.capacity, 0)
  rng = np.random.default_rng(1)
  busy = [0.0] * replicas
  tokens = 0
  try:
    # Waves of max_batch requests per replica: routing decides each wave.
    wave = engine.max_batch * replicas
    for start in range(0, len(stream), wave):
      queues = [[] for _ in range(replicas)]
      for i, ref in enumerate(stream[start:start + wave], start):
        load = [len(q) for q in queues]
        r = (i % replicas if policy == "round_robin" else
             router.route(ref, load))
        queues[r].append(dict(prompt=tuple(int(t) for t in rng.integers(
            3, 259, 8)), adapter=ref, max_new_tokens=NEW_TOKENS,
                              temperature=0.0))
      for r, q in enumerate(queues):
        if not q:
          continue
        t = time.perf_counter()
        out = reps[r].engine.generate(q)
        busy[r] += time.perf_counter() - t
        tokens += sum(len(x.tokens) for x in out)
    stats = [rep.stats()["residency"] for rep in reps]
  finally:
    for rep in reps:
      rep.close()
  dev = [s["device"] for s in stats]
  host = [s["host"] for s in stats]
  hits = sum(d["hits"] for d in dev)
  misses = sum(d["misses"] for d in dev)
  hhits = sum(h["hits"] for h in host)
  hmiss = sum(h["misses"] for h in host)
  return dict(policy=policy, capacity=cfg.capacity, requests=len(stream),
              tokens=tokens,
              device_hit_rate=hits / max(1, hits + misses),
              host_hit_rate=hhits / max(1, hhits + hmiss),
              store_loads=sum(s["store"]["loads"] for s in stats),
              tokens_per_s=tokens / sum(busy), busy_s=sum(busy))


def _resolve_worker(location: str, refs: list[str], seconds: float,
                    start_at: float, out) -> None:
  reg = Registry.open(location, create=False)
  rng = random.Random(os.getpid())
  lat = []
  while time.time() < start_at:
    time.sleep(0.001)
  end = start_at + seconds
  while time.time() < end:
    ref = rng.choice(refs)
    t = time.perf_counter()
    reg.resolve(ref)
    lat.append(time.perf_counter() - t)
  reg.close()
  out.put(lat)


def run_resolve(location: str, refs: list[str], replicas: int,
                seconds: float) -> dict:
  """N processes resolve at once; latency percentiles and throughput."""
  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  start_at = time.time() + 15.0  # Time for every process to import.
  procs = [ctx.Process(target=_resolve_worker,
                       args=(location, refs, seconds, start_at, out))
           for _ in range(replicas)]
  for p in procs:
    p.start()
  lat = []
  for _ in procs:
    lat += out.get(timeout=seconds + 300)
  for p in procs:
    p.join()
  lat_ms = np.asarray(lat) * 1e3
  return dict(replicas=replicas, resolves=len(lat),
              resolves_per_s=len(lat) / seconds,
              p50_ms=float(np.percentile(lat_ms, 50)),
              p99_ms=float(np.percentile(lat_ms, 99)))


def main(argv):
  del argv
  from tools import local_services  # pylint: disable=import-outside-toplevel
  work = tempfile.mkdtemp(prefix="mint_bench_fleet_")
  results = {}
  try:
    with local_services.PostgresServer() as pg:
      pg_url = pg.registry_url(os.path.join(work, "pg_store"), "bench")
      t = time.perf_counter()
      ids = build_registry(pg_url, _ADAPTERS.value)
      print(f"published {len(ids)} adapters in {time.perf_counter() - t:.1f}"
            " s (PostgreSQL catalog)")
      if _PART.value in ("all", "routing"):
        stream = zipf_stream(ids, _REQUESTS.value, _ZIPF.value, _SEED.value)
        engine = __import__("dataclasses").replace(ENGINE,
                                                   num_slots=_SLOTS.value)
        # Host cache entries hold bank-shaped factors: q and v, A [L, d, r]
        # and B [L, r, d_out], f32.
        entry = 4 * CFG.num_layers * RANK * (2 * CFG.hidden_size + 64 + 32)
        host_bytes = _HOST.value * entry
        runs = (("multiplexed", "multiplexed", None),
                ("multiplexed_host", "multiplexed", _HOST.value),
                ("round_robin", "round_robin", None))
        for name, policy, cap in runs:
          results[name] = run_routing(
              pg_url, stream, policy, replicas=_REPLICAS.value,
              engine=engine, host_bytes=host_bytes, max_adapters=cap)
          print(name, json.dumps(results[name]))
        r = results["round_robin"]
        print(f"distinct adapters in the stream: {len(set(stream))}")
        for name in ("multiplexed", "multiplexed_host", "round_robin"):
          m = results[name]
          print(f"| {name} | {m['capacity']} | {m['device_hit_rate']:.1%} | "
                f"{m['store_loads']} | {m['tokens_per_s']:.0f} | "
                f"{m['tokens_per_s'] / r['tokens_per_s']:.2f} |")
      if _PART.value in ("all", "resolve"):
        sqlite_dir = os.path.join(work, "sqlite")
        build_registry(sqlite_dir, _ADAPTERS.value)
        refs = [f"{i}@1" for i in ids]
        for name, loc in (("postgresql", pg_url), ("sqlite", sqlite_dir)):
          results[name] = run_resolve(loc, refs, _REPLICAS.value,
                                      _SECONDS.value)
          print(name, json.dumps(results[name]))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
