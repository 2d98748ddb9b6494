"""Serving benchmark: multi-adapter decode vs base, vs transformers + PEFT, churn.

  .venv/bin/python -m tools.bench_serve            # SmolLM2-135M, full sizes
  .venv/bin/python -m tools.bench_serve --quick    # smaller, for a smoke run

Measured in one run, side by side, and printed as a markdown table:
  * decode tokens/s with B requests on B distinct rank-8 adapters on all
    seven projections, and the same engine with every request on the base
    (goal: step-time ratio <= 1.10);
  * end-to-end tokens/s of the same mixed batch against transformers + PEFT
    `generate(adapter_names=...)`, run in the parity interpreter (`make parity-venv`) in a subprocess
    (torch is never imported here; goal >= 5x);
  * churn: many adapters through the slots, throughput and hit rates;
  * prefill time per prompt token and peak host memory (max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters
from tools.parity_env import parity_python


# Runs inside the parity venv: transformers + PEFT mixed-batch generate.
_HF_SCRIPT = r"""
import json, sys, time, torch, transformers, peft
from peft import LoraConfig, get_peft_model
gguf_path, batch, prompt_len, new_tokens, rank, threads = sys.argv[1:7]
batch, prompt_len, new_tokens, rank = map(int, (batch, prompt_len, new_tokens, rank))
torch.set_num_threads(int(threads))
import os
d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
model = transformers.AutoModelForCausalLM.from_pretrained(
    d, gguf_file=f, dtype=torch.float32).eval()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]
cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                 init_lora_weights=False)
torch.manual_seed(0)
model = get_peft_model(model, cfg, adapter_name="a0")
for i in range(1, batch):
  model.add_adapter(f"a{i}", cfg)
model.eval()  # PEFT refuses adapter_names in training mode
names = [f"a{i}" for i in range(batch)]
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (batch, prompt_len), generator=g)
def run(n, adapter_names):
  with torch.no_grad():
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids),
                         adapter_names=adapter_names, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out.shape[1] - prompt_len
run(2, names)  # warm-up
t_mixed, n = run(new_tokens, names)
t_base, _ = run(new_tokens, ["__base__"] * batch)
print(json.dumps(dict(mixed_s=t_mixed, base_s=t_base, new_tokens=n,
                      batch=batch, torch=torch.__version__,
                      peft=peft.__version__)))
"""


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _requests(rng, batch, prompt_len, new_tokens, adapters, vocab):
  return [dict(prompt=[int(t) for t in rng.integers(100, vocab - 1,
                                                     prompt_len)],
               adapter=a, max_new_tokens=new_tokens, ignore_eos=True)
          for a in adapters[:batch]]


def _timed(engine, reqs):
  """(wall seconds, decode seconds, decode tokens, prefill s, prefill toks)."""
  before = dict(engine.stats())
  t0 = time.perf_counter()
  out = engine.generate(reqs)
  wall = time.perf_counter() - t0
  after = engine.stats()
  assert all(r.error is None for r in out), [r.error for r in out]
  d = lambda k: after[k] - before[k]
  return (wall, d("decode_seconds"), d("decode_tokens"), d("prefill_seconds"),
          d("prefill_tokens"), d("decode_calls"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="B=4, 8 new tokens, 40 churn adapters")
  ap.add_argument("--no_hf", action="store_true",
                  help="skip the transformers + PEFT comparison")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  batch, prompt_len, new_tokens = (4, 32, 8) if args.quick else (16, 32, 32)
  churn_adapters, churn_requests = (40, 64) if args.quick else (200, 400)
  rank = 8

  from mintjax.model.smollm2 import default_gguf_path, load_smollm2  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  base = load_smollm2()
  load_s = time.perf_counter() - t0
  cfg = base.config
  src = InMemoryAdapters()
  for i in range(batch):
    src.publish(f"mixed{i}", AdapterWeights.random(
        cfg, ALL_TARGETS, rank, alpha=2 * rank, seed=i), base.fingerprint)
  # Churn adapters: rank 8 on q and v keeps 200 of them in host memory
  # (~1.8 MB each); the bank still carries all seven projections.
  for i in range(churn_adapters):
    src.publish(f"churn{i}", AdapterWeights.random(
        cfg, ("q", "v"), rank, seed=1000 + i), base.fingerprint)
  ecfg = EngineConfig(num_slots=16, max_batch=batch,
                      max_len=prompt_len + new_tokens, steps_per_call=8,
                      prefill_batch=min(4, batch), min_bucket=prompt_len,
                      max_rank=rank, host_cache_bytes=64 << 20)
  t0 = time.perf_counter()
  engine = Engine(base, src, ecfg)
  warm_s = time.perf_counter() - t0

  rng = np.random.default_rng(0)
  mixed = _requests(rng, batch, prompt_len, new_tokens,
                    [f"mixed{i}" for i in range(batch)], cfg.vocab_size)
  based = [dict(r, adapter=None) for r in mixed]
  _timed(engine, mixed)  # loads the adapters into slots
  runs = {"mixed": [], "base": []}
  for _ in range(args.repeats):  # alternate so drift hits both alike
    runs["mixed"].append(_timed(engine, mixed))
    runs["base"].append(_timed(engine, based))
  best = {k: min(v, key=lambda r: r[1] / r[2]) for k, v in runs.items()}
  # Every row is active for every step, so steps = tokens / batch.
  step = {k: r[1] / (r[2] / batch) for k, r in best.items()}
  tps = {k: r[2] / r[1] for k, r in best.items()}
  e2e = {k: batch * new_tokens / min(x[0] for x in v)
         for k, v in runs.items()}
  prefill_ms_tok = 1e3 * best["mixed"][3] / best["mixed"][4]

  churn_reqs = _requests(
      rng, churn_requests, prompt_len, new_tokens // 2,
      [f"churn{int(a)}" for a in rng.integers(0, churn_adapters,
                                              churn_requests)],
      cfg.vocab_size)
  st0 = engine.stats()["residency"]
  t0 = time.perf_counter()
  out = engine.generate(churn_reqs)
  churn_s = time.perf_counter() - t0
  st1 = engine.stats()["residency"]
  churn_tokens = sum(len(r.tokens) for r in out)
  dev = {k: st1["device"][k] - st0["device"][k]
         for k in ("hits", "misses", "loads", "evictions", "load_seconds")}
  host = {k: st1["host"][k] - st0["host"][k] for k in ("hits", "misses")}

  hf, hf_note = None, "not run (no parity interpreter: `make parity-venv`; or --no_hf)"
  parity_py = parity_python()
  if not args.no_hf and parity_py is not None:
    proc = subprocess.run(
        [parity_py, "-c", _HF_SCRIPT, str(default_gguf_path()),
         str(batch), str(prompt_len), str(new_tokens), str(rank),
         str(os.cpu_count() or 1)],
        capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      hf = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
      hf_note = "failed (stderr above)"
      print("transformers + PEFT run failed:\n" + proc.stderr[-2000:],
            file=sys.stderr)

  print(f"\n## bench_serve ({'quick' if args.quick else 'full'}): "
        f"SmolLM2-135M f32 on CPU ({os.cpu_count()} cores), B={batch}, "
        f"prompt {prompt_len}, {new_tokens} new tokens, rank {rank} on all "
        "seven projections\n")
  print("| metric | value |")
  print("|---|---|")
  print(f"| base load / engine warm-up (compile) | {load_s:.1f} s / "
        f"{warm_s:.1f} s |")
  print(f"| decode step, {batch} distinct adapters | "
        f"{1e3 * step['mixed']:.1f} ms ({tps['mixed']:.1f} tok/s) |")
  print(f"| decode step, all rows on base (same engine) | "
        f"{1e3 * step['base']:.1f} ms ({tps['base']:.1f} tok/s) |")
  print(f"| **mixed / base step-time ratio** (goal <= 1.10) | "
        f"**{step['mixed'] / step['base']:.3f}** |")
  print(f"| end-to-end generate, mixed / base | {e2e['mixed']:.1f} / "
        f"{e2e['base']:.1f} tok/s |")
  if hf is not None:
    hf_mixed = hf["batch"] * hf["new_tokens"] / hf["mixed_s"]
    hf_base = hf["batch"] * hf["new_tokens"] / hf["base_s"]
    print(f"| transformers {hf['torch']} + PEFT {hf['peft']} generate, "
          f"mixed / base | {hf_mixed:.1f} / {hf_base:.1f} tok/s |")
    print(f"| **mintjax / PEFT mixed-batch tokens/s** (goal >= 5) | "
          f"**{e2e['mixed'] / hf_mixed:.2f}x** |")
  else:
    print(f"| transformers + PEFT | {hf_note} |")
  print(f"| prefill time per prompt token (mixed) | {prefill_ms_tok:.2f} ms |")
  print(f"| churn: {churn_requests} requests over {churn_adapters} adapters, "
        f"16 slots | {churn_tokens / churn_s:.1f} tok/s, {churn_s:.1f} s |")
  looked = dev["hits"] + dev["misses"]
  print(f"| churn device slots: hit rate, loads, evictions, mean load | "
        f"{dev['hits'] / max(looked, 1):.2f}, {dev['loads']}, "
        f"{dev['evictions']}, {1e3 * dev['load_seconds'] / max(dev['loads'], 1):.1f} ms |")
  hl = host["hits"] + host["misses"]
  print(f"| churn host cache (64 MB budget) hit rate | "
        f"{host['hits'] / max(hl, 1):.2f} |")
  print(f"| compilations after warm-up | "
        f"{engine.stats()['backend_compiles_since_warmup']} |")
  print(f"| peak host memory (max RSS) | {_rss_mb():.0f} MB |")


if __name__ == "__main__":
  main()
