"""The fast CPU serving path, change by change, side by side in one run.

  .venv/bin/python -m tools.bench_fast_path            # SmolLM2-135M
  .venv/bin/python -m tools.bench_fast_path --quick    # fewer repeats
  XLA_FLAGS=... .venv/bin/python -m tools.bench_fast_path   # an XLA flag set

Builds one engine per variant in one process (dtype x fused projections x
layer layout: 'stacked' = scanned [L, ...] weights and the per-row LoRA
gather, 'per_layer' = the CPU default, per-layer [out, in] weights and the
slot-dense LoRA view, with XLA's dots or the AMX op `cpu_kernels.amx`;
and a rank-64 bank serving rank-8 adapters with and
without the rank-width narrowing), then times every variant's decode step
on the same mixed batch
(B requests on B distinct rank-8 adapters on all seven projections) and on
an all-base batch (which runs the LoRA-free decode program, rank width 0),
interleaved round by round so machine drift hits all of
them alike; the best round of each is reported. Prints a markdown table of
step times and the ratios to the f32 unfused engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters

# (label, EngineConfig overrides, narrow rank widths)
_STACKED = dict(layer_layout="stacked")
_VARIANTS = (
    ("f32, unfused, stacked", dict(dtype="float32", fuse_projections=False,
                                   **_STACKED), True),
    ("f32, fused, stacked", dict(dtype="float32", **_STACKED), True),
    ("bf16, fused, stacked", dict(dtype="bfloat16", **_STACKED), True),
    ("f32, fused, per-layer + slot-dense", dict(dtype="float32",
                                                layer_layout="per_layer"),
     True),
    ("bf16, fused, per-layer + slot-dense, XLA dots", dict(
        dtype="bfloat16", layer_layout="per_layer", cpu_matmul="xla"), True),
    ("bf16, fused, per-layer + slot-dense, AMX op", dict(
        dtype="bfloat16", layer_layout="per_layer", cpu_matmul="amx"), True),
    ("bf16, per-layer, rank-64 bank, narrowed to 8", dict(
        dtype="bfloat16", max_rank=64, layer_layout="per_layer"), True),
    ("bf16, per-layer, rank-64 bank, full width", dict(
        dtype="bfloat16", max_rank=64, layer_layout="per_layer"), False),
)


def _step_seconds(engine: Engine, reqs, batch: int) -> tuple[float, float]:
  """(decode seconds per step, prefill seconds per prompt token)."""
  before = dict(engine.stats())
  out = engine.generate(reqs)
  after = engine.stats()
  assert all(r.error is None for r in out), [r.error for r in out]
  d = lambda k: after[k] - before[k]
  return (d("decode_seconds") / (d("decode_tokens") / batch),
          d("prefill_seconds") / d("prefill_tokens"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 rounds, not 4")
  ap.add_argument("--variants", default="",
                  help="comma list of variant numbers (default: all)")
  args = ap.parse_args()
  rounds = 2 if args.quick else 4
  batch, prompt_len, new_tokens, rank = 16, 32, 32, 8
  chosen = ([_VARIANTS[int(i)] for i in args.variants.split(",")]
            if args.variants else list(_VARIANTS))

  from mintjax.model.smollm2 import load_smollm2  # pylint: disable=g-import-not-at-top
  base = load_smollm2()
  cfg = base.config
  src = InMemoryAdapters()
  for i in range(batch):
    src.publish(f"mixed{i}", AdapterWeights.random(
        cfg, ALL_TARGETS, rank, alpha=2 * rank, seed=i), base.fingerprint)
  rng = np.random.default_rng(0)
  mixed = [dict(prompt=[int(t) for t in rng.integers(100, cfg.vocab_size - 1,
                                                     prompt_len)],
                adapter=f"mixed{i}", max_new_tokens=new_tokens,
                ignore_eos=True) for i in range(batch)]
  based = [dict(r, adapter=None) for r in mixed]
  ecfg = EngineConfig(num_slots=16, max_batch=batch,
                      max_len=prompt_len + new_tokens, steps_per_call=8,
                      prefill_batch=batch, min_bucket=prompt_len,
                      max_rank=rank)
  engines = {}
  from cpu_kernels import amx  # pylint: disable=g-import-not-at-top
  for label, kw, narrow in chosen:
    if kw.get("cpu_matmul") == "amx" and not amx.available():
      print(f"skipped {label}: {amx.why_unavailable()}", flush=True)
      continue
    t0 = time.perf_counter()
    e = Engine(base, src, dataclasses.replace(ecfg, **kw))
    if not narrow:  # every call at the bank's full rank width
      e._rank_buckets = (0, e.spec.max_rank)  # pylint: disable=protected-access
    e.generate(mixed)  # loads the adapters into slots
    engines[label] = e
    print(f"built {label} in {time.perf_counter() - t0:.1f} s", flush=True)

  times = {k: {"mixed": [], "base": [], "prefill": []} for k in engines}
  for _ in range(rounds):
    for label, e in engines.items():
      step, prefill = _step_seconds(e, mixed, batch)
      times[label]["mixed"].append(step)
      times[label]["prefill"].append(prefill)
      times[label]["base"].append(_step_seconds(e, based, batch)[0])
  best = {k: {m: min(v) for m, v in t.items()} for k, t in times.items()}
  ref = best[next(iter(best))]["mixed"]
  print(f"\n## bench_fast_path: SmolLM2-135M, B={batch}, prompt {prompt_len}, "
        f"{new_tokens} new tokens, rank-{rank} adapters on all seven "
        f"projections; best of {rounds} interleaved rounds; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {os.getloadavg()[0]:.1f}\n")
  print("| variant | mixed step ms (tok/s) | base step ms | mixed / base "
        "| prefill ms/token | mixed step vs first row |")
  print("|---|---|---|---|---|---|")
  for label, b in best.items():
    print(f"| {label} | {1e3 * b['mixed']:.1f} ({batch / b['mixed']:.0f}) | "
          f"{1e3 * b['base']:.1f} | {b['mixed'] / b['base']:.3f} | "
          f"{1e3 * b['prefill']:.2f} | {ref / b['mixed']:.2f}x |")


if __name__ == "__main__":
  main()
