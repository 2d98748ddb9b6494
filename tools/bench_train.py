"""Benchmark: multi-tenant training vs sequential and shared-adapter steps.

  .venv/bin/python -m tools.bench_train [--quick] [--no-peft]
      [--slots S] [--slot_sweep all,present] [--model tiny]
      [--users 16] [--compute_dtypes float32,bfloat16]

For each model (tiny; SmolLM2-135M shapes with random weights) and U users
(16, 64), measured side by side in one run on the same tokens (one row of T
tokens per user):
  multi       one compiled step training U adapters (adapter_idx = 1..U)
  sequential  U single-user steps (batch of that user's row), same program
  shared      one step training one adapter over all U rows
and, when the peer venv (`make peer-venv`) or the parity interpreter (`make
parity-venv`) has torch + peft, PEFT training the same U adapters one after
another (AdamW, same rows) in a subprocess. Prints a markdown table of
speed-ups, training tokens/s (U * T / step time), overhead and peak memory.

`--compute_dtypes float32,bfloat16` measures each compute dtype side by
side (`StepConfig.compute_dtype`: bf16 base matmuls, f32 adapter master
weights and optimizer state); PEFT trains in f32.

`--slots S` trains in a bank of S slots (every slot holding a user; the
batch's rows use slots 1..U) instead of U + 1; `--slot_sweep all,present`
measures each optimizer path (`OptimizerConfig.slot_sweep`) on that same
bank and tokens, one table row each, side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from mintjax import sharding
from mintjax.adapters.spec import BankSpec
from mintjax.model.base import random_base
from mintjax.model.sources import RANDOM_VARIANTS
from mintjax.train import optimizer as opt_lib
from mintjax.train.cohort import cohort_state, init_cohort
from mintjax.train.step import (Batch, StepConfig, log_memory_analysis,
                                make_train_step)
from tools.parity_env import parity_python
from tools.peer_env import peer_python

TARGETS = ("q", "k", "v", "o")


def _time(fn, reps):
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_one(variant: str, users: int, seq_len: int, rank: int, reps: int,
              lora_impl: str = "auto", *, num_slots: int = 0,
              slot_sweep: str = "auto", compute_dtype: str = "float32"):
  cfg = RANDOM_VARIANTS[variant]
  base = random_base(cfg, seed=0)
  num_slots = max(num_slots, users + 1)
  spec = BankSpec(targets=TARGETS, max_rank=rank, num_slots=num_slots)
  mesh = sharding.make_mesh(fsdp=-1)
  # Only name compute_dtype when it is not the default, so f32 runs also
  # work on a StepConfig without the field.
  dt = {} if compute_dtype == "float32" else {"compute_dtype": compute_dtype}
  step = make_train_step(cfg, spec, opt_lib.OptimizerConfig(
      1e-3, slot_sweep=slot_sweep), mesh, StepConfig(lora_impl=lora_impl,
                                                     **dt))
  names = [f"u{i}" for i in range(num_slots - 1)]
  cohort = cohort_state(cfg, spec, names, init_cohort(
      cfg, spec, names, alpha=2.0 * rank), shardings=step.state_shardings[1:])
  state = {"bank": cohort.bank, "opt": cohort.opt}
  tokens = np.random.default_rng(0).integers(
      3, min(cfg.vocab_size, 250), (users, seq_len + 1)).astype(np.int32)
  multi_b = Batch.from_token_rows(tokens, np.arange(1, users + 1))
  shared_b = Batch.from_token_rows(tokens, np.ones(users))
  single_bs = [Batch.from_token_rows(tokens[i:i + 1], [i + 1]) for i in range(users)]

  def run(b):
    state["bank"], state["opt"], m = step(base.params, state["bank"],
                                          state["opt"], b)
    return m

  def multi():
    jax.block_until_ready(run(multi_b))

  def shared():
    jax.block_until_ready(run(shared_b))

  def sequential():
    for b in single_bs:
      m = run(b)
    jax.block_until_ready(m)

  mem = log_memory_analysis(step.jitted, base.params, state["bank"],
                            state["opt"], multi_b)
  t_multi = _time(multi, reps)
  t_shared = _time(shared, reps)
  t_seq = _time(sequential, max(1, reps // 2))
  return dict(model=variant, users=users, seq_len=seq_len, rank=rank,
              slots=num_slots, slot_sweep=slot_sweep,
              compute=compute_dtype,
              multi_s=t_multi, shared_s=t_shared, sequential_s=t_seq,
              speedup_vs_sequential=t_seq / t_multi,
              overhead_vs_shared=t_multi / t_shared,
              step_peak_mb=mem.get("peak_bytes", 0) / 2**20,
              tokens=tokens)


_PEFT_SCRIPT = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
a = json.loads(sys.argv[1])
torch.manual_seed(0); torch.set_num_threads(a["threads"])
c = a["cfg"]
hf = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
    intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
    num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
    head_dim=c["head_dim"], tie_word_embeddings=c["tie_word_embeddings"])
model = LlamaForCausalLM(hf)
model = get_peft_model(model, LoraConfig(r=a["rank"], lora_alpha=2 * a["rank"],
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
tokens = torch.tensor(a["tokens"])
half = (tokens.shape[1] - 1) // 2
labels = tokens.clone(); labels[:, :half + 1] = -100
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3)
def one(i):
    out = model(input_ids=tokens[i:i + 1], labels=labels[i:i + 1])
    out.loss.backward(); opt.step(); opt.zero_grad()
one(0)
t0 = time.perf_counter()
for i in range(tokens.shape[0]):
    one(i)  # one adapter after another (weights reused: same cost per user)
print(json.dumps({"peft_s": time.perf_counter() - t0}))
"""


def bench_peft(variant, rank, tokens, threads):
  parity_py = peer_python() or parity_python()
  if parity_py is None:
    return None
  cfg = RANDOM_VARIANTS[variant].to_dict()
  arg = json.dumps(dict(cfg=cfg, rank=rank, tokens=tokens.tolist(),
                        threads=threads))
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(_PEFT_SCRIPT)
  try:
    out = subprocess.run([parity_py, f.name, arg], capture_output=True,
                         text=True, timeout=1200)
  finally:
    os.unlink(f.name)
  if out.returncode != 0:
    print(f"PEFT part skipped: {out.stderr.strip()[-300:]}", file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])["peft_s"]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny model, 16 users, few repetitions")
  p.add_argument("--no-peft", action="store_true")
  p.add_argument("--lora_impl", default="auto",
                 help="gather-LoRA implementation for every step")
  p.add_argument("--slots", type=int, default=0,
                 help="bank slots (default U + 1)")
  p.add_argument("--slot_sweep", default="auto",
                 help="comma list of optimizer paths to measure side by "
                      "side: auto, all, present")
  p.add_argument("--model", default="",
                 help="measure only this model of the plan (e.g. tiny)")
  p.add_argument("--users", default="",
                 help="comma list: measure only these U of the plan")
  p.add_argument("--compute_dtypes", default="float32",
                 help="comma list of step compute dtypes to measure side by "
                      "side: float32, bfloat16")
  p.add_argument("--peft_threads", type=int, default=2,
                 help="torch threads of the PEFT run (1 suffers less when "
                      "other processes share the cores)")
  args = p.parse_args()
  sweeps = args.slot_sweep.split(",")
  dtypes = args.compute_dtypes.split(",")
  if any(d != "float32" for d in dtypes) and "compute_dtype" not in {
      f.name for f in dataclasses.fields(StepConfig)}:
    p.error("this StepConfig has no compute_dtype; use --compute_dtypes "
            "float32")
  if args.quick:
    plan = [("tiny", 16, 32, 4, 5)]
  else:
    plan = [("tiny", 16, 32, 4, 10), ("tiny", 64, 32, 4, 10),
            ("smollm2-135m", 16, 32, 8, 3), ("smollm2-135m", 64, 32, 8, 2)]
  plan = [r for r in plan if args.model in ("", r[0]) and (
      not args.users or str(r[1]) in args.users.split(","))]
  rows = []
  for variant, users, seq, rank, reps in plan:
    peft_s = "not run"
    for sweep in sweeps:
      for dtype in dtypes:
        r = bench_one(variant, users, seq, rank, reps, args.lora_impl,
                      num_slots=args.slots, slot_sweep=sweep,
                      compute_dtype=dtype)
        if peft_s == "not run":  # once per model and U: same rows each time
          peft_s = None if args.no_peft else bench_peft(
              variant, rank, r["tokens"], args.peft_threads)
        r["peft_s"] = peft_s
        rows.append(r)
        print(f"done {variant} U={users} {sweep} {dtype}", file=sys.stderr)
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"lora_impl {args.lora_impl}, "
        f"{jax.device_count()} device(s); process peak RSS {rss_mb:.0f} MB\n")
  print("| model | U | slots | optimizer path | compute | T | rank | "
        "multi step (ms) | multi tok/s | U sequential (ms) | "
        "speed-up (goal >= 8x) | shared adapter (ms) | overhead (goal <= "
        "1.15x) | PEFT sequential (ms) | PEFT tok/s | speed-up vs PEFT | "
        "step peak MB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        "---|")
  for r in rows:
    toks = r["users"] * r["seq_len"]
    peft = ("-", "-", "-") if r["peft_s"] is None else (
        f"{r['peft_s'] * 1e3:.1f}", f"{toks / r['peft_s']:.0f}",
        f"{r['peft_s'] / r['multi_s']:.1f}x")
    print(f"| {r['model']} | {r['users']} | {r['slots']} | "
          f"{r['slot_sweep']} | {r['compute']} | {r['seq_len']} | "
          f"{r['rank']} | {r['multi_s'] * 1e3:.1f} | "
          f"{toks / r['multi_s']:.0f} | {r['sequential_s'] * 1e3:.1f} | "
          f"{r['speedup_vs_sequential']:.1f}x | {r['shared_s'] * 1e3:.1f} | "
          f"{r['overhead_vs_shared']:.2f}x | {peft[0]} | {peft[1]} | "
          f"{peft[2]} | {r['step_peak_mb']:.1f} |")


if __name__ == "__main__":
  main()
