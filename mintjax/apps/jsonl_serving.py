"""Batch mode: read JSONL requests, serve them, write JSONL results.

Owns `engine_from_config` (an `Engine` from a `configs/serve.py` config:
base, registry, mesh, shapes; the HTTP server builds its engine with it too) and `serve_jsonl` (the body of
`launch/serve.py`): requests are streamed through one engine with a
progress log; results are written in input order, one JSON object a line,
with per-request errors reported in place (a bad line never stops the run).
A failed line's result always has a non-null `error` that starts with its
line number.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator, Mapping

from absl import logging

from mintjax import progress
from mintjax import sharding
from mintjax.model.sources import load_base_source
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.store.registry import Registry


def _engine_config(e) -> EngineConfig:
  targets = e.targets.split(",") if isinstance(e.targets, str) else e.targets
  return EngineConfig(
      num_slots=e.num_slots, max_batch=e.max_batch, max_len=e.max_len,
      host_cache_bytes=int(e.host_cache_mb * (1 << 20)),
      steps_per_call=e.steps_per_call, prefill_batch=e.prefill_batch,
      # 0 / empty: sized from the registry's adapters (EngineConfig.sized_for).
      min_bucket=e.min_bucket, max_rank=e.max_rank or None,
      targets=tuple(t.strip() for t in targets if t.strip()) or None,
      adapter_dtype=e.adapter_dtype, lora_impl=e.lora_impl,
      lookahead=e.lookahead, dtype=e.get("dtype", "float32"),
      layer_layout=e.get("layer_layout", "auto"),
      cpu_matmul=e.get("cpu_matmul", "auto"))


def engine_from_config(config) -> Engine:
  """Builds the engine a serve config describes (base, registry, mesh)."""
  base = load_base_source(config.base, seed=config.base_seed)
  source = None
  if config.registry:
    source = Registry.open(config.registry, create=False)
  mesh = None
  if config.mesh.use:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                              config.mesh.tensor)
  engine = Engine(base, source, _engine_config(config.engine), mesh=mesh)
  for ref in filter(None, (r.strip() for r in config.pin.split(","))):
    logging.info("pinned %s in slot %d", ref, engine.pin(ref))
  return engine


class BadLine(str):
  """Why one input line is not a request (yielded in its place)."""


def read_requests(path: str) -> Iterator[tuple[int, Any]]:
  """Yields (line number, request dict or `BadLine`) per non-empty line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield n, BadLine(f"line {n} is not valid UTF-8 (byte {e.start}); "
                         "save the file as UTF-8")
        continue
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        yield n, BadLine(f"line {n} is not valid JSON ({e}); fix or remove "
                         "it")
        continue
      if not isinstance(r, dict):
        yield n, BadLine(
            f"line {n} is a JSON {type(r).__name__}, not a request object; "
            'write {"prompt": "...", "adapter": "..."} on each line')
        continue
      yield n, r


def _check_paths(config) -> None:
  if not config.input or not os.path.isfile(config.input):
    raise FileNotFoundError(
        f"input {config.input!r} is not a file; pass "
        "--config.input=requests.jsonl (one JSON request per line)")
  if not config.output:
    raise ValueError("no output file; pass --config.output=results.jsonl")
  out_dir = os.path.dirname(os.path.abspath(config.output))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(
        f"output folder {out_dir} does not exist; create it or pass "
        "another --config.output")
  if os.path.isdir(config.output):
    raise ValueError(f"output {config.output} is a folder; pass a file path")
  if os.path.abspath(config.output) == os.path.abspath(config.input):
    raise ValueError(
        "output and input are the same file; pass another --config.output "
        "(the input would be overwritten)")


def serve_jsonl(config) -> dict:
  """Serves `config.input` into `config.output`; returns a summary.

  Raises:
    FileNotFoundError / ValueError: the input or output path is unusable
      (checked before the engine is built; nothing is written).
  """
  _check_paths(config)
  engine = engine_from_config(config)
  defaults = dict(config.defaults)
  requests, bad, line_of = [], {}, {}
  for i, (n, r) in enumerate(read_requests(config.input)):
    line_of[i] = n
    if isinstance(r, BadLine):
      bad[i] = str(r)
      r = {"prompt": None}  # fails in the engine, keeps the line's place
    else:
      sampling = r.get("sampling")
      sampling_keys = set(r) | (set(sampling) if isinstance(
          sampling, Mapping) else set())
      r = dict({k: v for k, v in defaults.items()
                if k not in sampling_keys}, **r)
    requests.append(r)
  results = {}
  t0 = time.perf_counter()
  bar = progress.bar(total=len(requests), desc="serve", unit="request")
  for ev in engine.stream(requests):
    if ev.result is None:
      continue
    bar.update(1)
    if ev.index in bad:
      ev.result.error = bad[ev.index]
    elif ev.result.error is not None:
      ev.result.error = f"line {line_of[ev.index]}: {ev.result.error}"
    elif ev.result.finish_reason == "error":  # never a null error
      ev.result.error = f"line {line_of[ev.index]}: request failed"
    results[ev.index] = ev.result
    done = len(results)
    if done % max(config.log_every, 1) == 0 or done == len(requests):
      s = engine.stats()
      logging.info("%d/%d requests, %d tokens, %.1f tok/s decode, %d errors",
                   done, len(requests), s["generated_tokens"],
                   s["decode_tokens_per_s"], s["errors"])
      bar.set_postfix(tok_s=f"{s['decode_tokens_per_s']:.0f}",
                      errors=s["errors"])
  bar.close()
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
