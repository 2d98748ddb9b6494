"""HTTP serving benchmark: the OpenAI server vs the in-process engine service.

  .venv/bin/python -m tools.bench_http                 # SmolLM2-135M
  .venv/bin/python -m tools.bench_http --quick         # tiny model, smoke run

For each concurrency (1, 4, 16, 64 closed-loop clients), the same requests
(greedy, mixed over the base and rank-8 adapters on all seven projections)
run twice, side by side in one process and one engine:
  * in-process: asyncio callers submitting to `EngineService` directly;
  * HTTP: asyncio clients streaming `POST /v1/completions` (SSE) from the
    server on 127.0.0.1 (uvicorn in a thread of this process, beside the
    engine thread); the clients run in a subprocess (`--client`), as real
    clients would, but on the same cores.
Printed as a markdown table: requests/s, TTFT p50/p99, TPOT, output
tokens/s, errors, and the HTTP/in-process tokens/s ratio (goal >= 0.90 at
concurrency >= 16), plus compilations after warm-up (goal 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import numpy as np

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.apps.openai_server.app import create_app
from mintjax.apps.openai_server.server import ServerThread
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams
from mintjax.serve.service import EngineService, ServiceConfig

BASE = "base"


def _requests(rng, n, adapters, vocab, new_tokens):
  out = []
  for i in range(n):
    plen = int(rng.integers(16, 33))
    prompt = [int(t) for t in rng.integers(3, vocab, size=plen)]
    model = BASE if i % (len(adapters) + 1) == 0 else adapters[i % len(
        adapters)]
    out.append((model, prompt, new_tokens))
  return out


async def _closed_loop(reqs, concurrency, one):
  """Runs `one(req)` over reqs with `concurrency` workers; returns records."""
  queue = list(reversed(reqs))
  records = []

  async def worker():
    while queue:
      records.append(await one(queue.pop()))

  t0 = time.perf_counter()
  await asyncio.gather(*(worker() for _ in range(concurrency)))
  return records, time.perf_counter() - t0


def _inproc_one(service):
  async def one(req):
    model, prompt, n = req
    t0 = time.perf_counter()
    h = service.submit(GenerationRequest(
        prompt=tuple(prompt), adapter=None if model == BASE else model,
        sampling=SamplingParams(max_new_tokens=n, ignore_eos=True)),
                       loop=asyncio.get_running_loop())
    first = None
    async for events in h:
      if first is None and events[0].token is not None:
        first = time.perf_counter()
    ok = h.result.finish_reason == "length"
    return dict(ttft=first - t0 if first else None,
                latency=time.perf_counter() - t0,
                tokens=len(h.result.tokens), error=not ok)
  return one


def _http_one(client, url):
  async def one(req):
    model, prompt, n = req
    body = dict(model=model, prompt=prompt, max_tokens=n, temperature=0,
                stream=True, ignore_eos=True,
                stream_options={"include_usage": True})
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
      async with client.post(url, json=body) as r:
        if r.status != 200:
          await r.read()
          return dict(ttft=None, latency=0.0, tokens=0, error=True)
        async for raw in r.content:
          line = raw.decode().strip()
          if not line.startswith("data: "):
            continue
          if line == "data: [DONE]":
            done = True
            continue
          if first is None:
            first = time.perf_counter()
          chunk = json.loads(line[6:])
          if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    except aiohttp.ClientError:
      return dict(ttft=None, latency=0.0, tokens=0, error=True)
    return dict(ttft=first - t0 if first else None,
                latency=time.perf_counter() - t0, tokens=tokens,
                error=not done or tokens != n)
  return one


def _client_main(url: str, concurrency: int) -> None:
  """Subprocess: reads requests as JSON on stdin, prints records as JSON."""
  reqs = [tuple(r) for r in json.load(sys.stdin)]

  async def go():
    # aiohttp, not httpx: at 64 streams httpx's own CPU cost capped this
    # machine at ~60 requests/s even for GET /health.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256),
        timeout=aiohttp.ClientTimeout(total=600)) as client:
      # One untimed round opens the connections.
      await _closed_loop(reqs[:concurrency], concurrency,
                         _http_one(client, url))
      return await _closed_loop(reqs, concurrency, _http_one(client, url))

  records, wall = asyncio.run(go())
  json.dump(dict(records=records, wall=wall), sys.stdout)


def _http_run(url, reqs, concurrency):
  out = subprocess.run(
      [sys.executable, "-m", "tools.bench_http", "--client", url,
       "--concurrency", str(concurrency)], input=json.dumps(reqs),
      capture_output=True, text=True, check=True)
  d = json.loads(out.stdout)
  return d["records"], d["wall"]


def _summary(records, wall):
  ok = [r for r in records if not r["error"]]
  ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
  tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
          if r["tokens"] > 1 and r["ttft"] is not None]
  tokens = sum(r["tokens"] for r in ok)
  return dict(requests=len(records), errors=len(records) - len(ok),
              req_s=len(ok) / wall, tok_s=tokens / wall,
              ttft_p50_ms=1e3 * float(np.percentile(ttft, 50)),
              ttft_p99_ms=1e3 * float(np.percentile(ttft, 99)),
              tpot_ms=1e3 * float(np.mean(tpot)) if tpot else 0.0)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="tiny random model instead of SmolLM2-135M")
  ap.add_argument("--concurrency", default="1,4,16,64")
  ap.add_argument("--requests_per_client", type=int, default=2)
  ap.add_argument("--min_requests", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=16)
  ap.add_argument("--adapters", type=int, default=16)
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--json", default="", help="also write results here")
  ap.add_argument("--client", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.client:
    _client_main(args.client, int(args.concurrency))
    return

  if args.quick:
    from mintjax.model.sources import RANDOM_VARIANTS  # pylint: disable=g-import-not-at-top
    from mintjax.model.base import random_base  # pylint: disable=g-import-not-at-top
    base = random_base(RANDOM_VARIANTS["tiny"], seed=0, std=0.3)
  else:
    from mintjax.model.smollm2 import load_smollm2  # pylint: disable=g-import-not-at-top
    base = load_smollm2()
  cfg = base.config
  src = InMemoryAdapters()
  names = [f"a{i}" for i in range(args.adapters)]
  for i, name in enumerate(names):
    src.publish(name, AdapterWeights.random(cfg, ALL_TARGETS, 8, seed=i,
                                            std=0.02), base.fingerprint)
  t0 = time.perf_counter()
  engine = Engine(base, src, EngineConfig(
      num_slots=args.adapters, max_batch=args.max_batch, max_len=64,
      steps_per_call=8, prefill_batch=4, min_bucket=32, max_rank=8))
  print(f"engine warm in {time.perf_counter() - t0:.1f} s "
        f"({engine.compilations_at_warmup} programs)")
  service = EngineService(engine, ServiceConfig(max_queue=1024)).start()
  server = ServerThread(create_app(service, model_name=BASE)).start()
  url = server.base_url + "/completions"
  rng = np.random.default_rng(0)
  rows = []

  # Warm both paths (adapter loads, connections) before timing.
  warm = _requests(rng, 2 * args.adapters, names, cfg.vocab_size,
                   args.new_tokens)
  asyncio.run(_closed_loop(warm, 16, _inproc_one(service)))
  _http_run(url, warm, 16)
  for c in [int(x) for x in args.concurrency.split(",")]:
    n = max(args.min_requests, c * args.requests_per_client)
    reqs = _requests(rng, n, names, cfg.vocab_size, args.new_tokens)
    for mode in ("in-process", "http"):
      if mode == "http":
        records, wall = _http_run(url, reqs, c)
      else:
        records, wall = asyncio.run(_closed_loop(reqs, c,
                                                 _inproc_one(service)))
      rows.append(dict(concurrency=c, mode=mode, **_summary(records, wall)))
      print(rows[-1], flush=True)

  compiles = service.call(engine.stats).result()[
      "backend_compiles_since_warmup"]
  server.stop()

  print(f"\nbase {'tiny random' if args.quick else 'SmolLM2-135M'}, "
        f"{args.adapters} rank-8 adapters (all 7 projections) + base, "
        f"B={args.max_batch}, {args.new_tokens} new tokens, greedy; "
        f"compilations after warm-up: {compiles}\n")
  print("| clients | path | requests | req/s | TTFT p50 ms | TTFT p99 ms | "
        "TPOT ms | out tok/s | HTTP/in-proc tok/s | errors |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  inproc = {}
  for r in rows:
    if r["mode"] == "in-process":
      inproc[r["concurrency"]] = r["tok_s"]
    ratio = (f"{r['tok_s'] / inproc[r['concurrency']]:.2f}"
             if r["mode"] == "http" else "")
    print(f"| {r['concurrency']} | {r['mode']} | {r['requests']} | "
          f"{r['req_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
          f"{r['ttft_p99_ms']:.0f} | {r['tpot_ms']:.1f} | {r['tok_s']:.0f} | "
          f"{ratio} | {r['errors']} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(dict(rows=rows, compilations_after_warmup=compiles), f,
                indent=1)


if __name__ == "__main__":
  main()
