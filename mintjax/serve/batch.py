"""Batch mode: read JSONL requests, serve them, write JSONL results.

Owns `engine_from_config` (an `Engine` from a `configs/serve.py` config:
base, registry, mesh, shapes) and `serve_jsonl` (the body of
`launch/serve.py`): requests are streamed through one engine with a
progress log; results are written in input order, one JSON object a line,
with per-request errors reported in place (a bad line never stops the run).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

from absl import logging

from mintjax import sharding
from mintjax.serve.engine import Engine, EngineConfig


def _engine_config(e) -> EngineConfig:
  targets = e.targets.split(",") if isinstance(e.targets, str) else e.targets
  return EngineConfig(
      num_slots=e.num_slots, max_batch=e.max_batch, max_len=e.max_len,
      host_cache_bytes=int(e.host_cache_mb * (1 << 20)),
      steps_per_call=e.steps_per_call, prefill_batch=e.prefill_batch,
      min_bucket=e.min_bucket, max_rank=e.max_rank,
      targets=tuple(t.strip() for t in targets if t.strip()),
      adapter_dtype=e.adapter_dtype, lora_impl=e.lora_impl,
      lookahead=e.lookahead)


def engine_from_config(config) -> Engine:
  """Builds the engine a serve config describes (base, registry, mesh)."""
  from mintjax.train.loop import load_base_source  # pylint: disable=g-import-not-at-top
  base = load_base_source(config.base, seed=config.base_seed)
  source = None
  if config.registry:
    from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
    source = Registry.open(config.registry)
  mesh = None
  if config.mesh.use:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                              config.mesh.tensor)
  engine = Engine(base, source, _engine_config(config.engine), mesh=mesh)
  for ref in filter(None, (r.strip() for r in config.pin.split(","))):
    logging.info("pinned %s in slot %d", ref, engine.pin(ref))
  return engine


def read_requests(path: str) -> Iterator[Any]:
  """Yields one request dict per non-empty line (a string for bad JSON)."""
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        yield f"line {n} is not valid JSON ({e}); fix or remove it"


def serve_jsonl(config) -> dict:
  """Serves `config.input` into `config.output`; returns a summary.

  Raises:
    FileNotFoundError: the input file does not exist.
  """
  if not config.input or not os.path.isfile(config.input):
    raise FileNotFoundError(
        f"input {config.input!r} is not a file; pass "
        "--config.input=requests.jsonl (one JSON request per line)")
  if not config.output:
    raise ValueError("pass --config.output=results.jsonl")
  engine = engine_from_config(config)
  defaults = dict(config.defaults)
  requests, bad = [], {}
  for i, r in enumerate(read_requests(config.input)):
    if isinstance(r, dict):
      sampling_keys = set(r) | set(r.get("sampling") or {})
      r = dict({k: v for k, v in defaults.items()
                if k not in sampling_keys}, **r)
    else:
      bad[i] = r
      r = {"prompt": None}  # fails in the engine, keeps the line's place
    requests.append(r)
  results = {}
  t0 = time.perf_counter()
  for ev in engine.stream(requests):
    if ev.result is None:
      continue
    if ev.index in bad:
      ev.result.error = bad[ev.index]
    results[ev.index] = ev.result
    done = len(results)
    if done % max(config.log_every, 1) == 0 or done == len(requests):
      s = engine.stats()
      logging.info("%d/%d requests, %d tokens, %.1f tok/s decode, %d errors",
                   done, len(requests), s["generated_tokens"],
                   s["decode_tokens_per_s"], s["errors"])
  tmp = config.output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in sorted(results):
      f.write(json.dumps(results[i].to_dict()) + "\n")
  os.replace(tmp, config.output)  # readers never see a half-written file
  stats = engine.stats()
  return dict(requests=len(requests), errors=stats["errors"],
              seconds=time.perf_counter() - t0,
              generated_tokens=stats["generated_tokens"],
              compilations_since_warmup=stats["compilations_since_warmup"])
