"""Benchmark of the gather-LoRA implementations, side by side in one run.

Owns the kernel benchmark: for decode (T = 16, 64, 256 tokens) and prefill
(T = 2048, 8192) with 1/8/32/128 distinct adapters of rank 8/16/64, it times
one projection's LoRA delta with every implementation available on the
backend and prints each time relative to the base matmul x @ W of the same
shape, measured in the same run. On a GPU it also prints the achieved
bytes/s (the minimum bytes an implementation must move: x, y and the
distinct adapters' factors; W for the base) against the HBM bandwidth.

Implementations: the XLA formulations of `mintjax.adapters.lora_op`
(gather, ragged, onehot; reference only for decode sizes since it
materialises a per-token copy of the factors) on every backend, plus the
Pallas kernel of the backend: `pallas_gpu` (bgmv for T <= 256, grouped
above) on GPU, `pallas_sgmv` on TPU. On CPU Pallas only runs in interpret
mode, which emulates the kernel in Python-level loops and says nothing
about speed, so the CPU run compares the XLA formulations only.

Usage:
  python tools/bench_kernels.py --quick          # a short run
  python tools/bench_kernels.py                  # the full grid
  python tools/bench_kernels.py --d_in 4096 --d_out 4096 --hbm_gbps 4800
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters import lora_op

_DECODE = (16, 64, 256)
_PREFILL = (2048, 8192)
_ADAPTERS = (1, 8, 32, 128)
_RANKS = (8, 16, 64)


def _impls(backend: str, num_tokens: int) -> list[str]:
  names = ["gather", "ragged", "onehot"]
  if num_tokens <= 256:
    names.insert(0, "reference")
  if backend in ("gpu", "tpu"):
    names.append("pallas_gpu" if backend == "gpu" else "pallas_sgmv")
  return names


def _time(fn, args, iters: int) -> float:
  """Median seconds of `iters` calls after a compile + warm-up call."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - t0)
  return statistics.median(samples)


def _inputs(num_tokens, num_adapters, rank, d_in, d_out, num_slots, dtype,
            seed=0):
  """Decode: T one-token rows. Prefill: one sequence per distinct adapter
  (T / adapters tokens each), the layout a prefill batch has."""
  rng = np.random.default_rng(seed)
  seq = 1 if num_tokens <= 256 else num_tokens // num_adapters
  bsz = num_tokens // seq
  x = jnp.asarray(rng.standard_normal((bsz, seq, d_in)), dtype)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
  a = jnp.asarray(rng.standard_normal((num_slots, d_in, rank)) / np.sqrt(d_in),
                  dtype).at[0].set(0)
  b = jnp.asarray(rng.standard_normal((num_slots, rank, d_out)) * 0.01,
                  dtype).at[0].set(0)
  scale = jnp.ones((num_slots,), jnp.float32).at[0].set(0)
  # Rows spread evenly over `num_adapters` distinct non-null slots.
  idx = rng.permutation(1 + np.arange(bsz) % num_adapters)
  return x, w, a, b, scale, jnp.asarray(idx, jnp.int32)


def _min_bytes(num_tokens, num_adapters, rank, d_in, d_out, itemsize,
               base: bool) -> int:
  io = num_tokens * (d_in + d_out) * itemsize
  if base:
    return io + d_in * d_out * itemsize
  distinct = min(num_adapters, num_tokens)
  return io + distinct * rank * (d_in + d_out) * itemsize


def run(tokens, adapters, ranks, *, d_in, d_out, dtype, iters, hbm_gbps,
        check: bool) -> list[dict]:
  """Times every case; returns one row per (case, implementation)."""
  backend = jax.default_backend()
  num_slots = max(adapters) + 1
  itemsize = jnp.dtype(dtype).itemsize
  base_fn = jax.jit(lambda x, w: jnp.einsum("btd,do->bto", x, w))
  rows = []
  for t, n_ad, r in itertools.product(tokens, adapters, ranks):
    x, w, a, b, scale, slot = _inputs(t, n_ad, r, d_in, d_out, num_slots,
                                      dtype)
    base_s = _time(base_fn, (x, w), iters)
    want = None
    for name in _impls(backend, t):
      fn = jax.jit(functools.partial(lora_op.lora_delta, impl=name))
      secs = _time(fn, (x, a, b, scale, slot), iters)
      if check:
        got = np.asarray(fn(x, a, b, scale, slot), np.float32)
        want = got if want is None else want
        err = float(np.max(np.abs(got - want)))
      else:
        err = float("nan")
      row = dict(T=t, adapters=n_ad, rank=r, impl=name, ms=secs * 1e3,
                 base_ms=base_s * 1e3, ratio=secs / base_s, max_err=err)
      if backend == "gpu":
        nbytes = _min_bytes(t, n_ad, r, d_in, d_out, itemsize, base=False)
        row["gbps"] = nbytes / secs / 1e9
        row["hbm_frac"] = row["gbps"] / hbm_gbps
        base_bytes = _min_bytes(t, n_ad, r, d_in, d_out, itemsize, base=True)
        row["base_gbps"] = base_bytes / base_s / 1e9
      rows.append(row)
  return rows


def print_rows(rows, backend: str):
  gpu = backend == "gpu"
  head = (f"{'T':>6} {'ad':>4} {'r':>3} {'impl':>12} {'ms':>9} "
          f"{'base_ms':>8} {'x base':>7} {'max|d|':>8}")
  if gpu:
    head += f" {'GB/s':>7} {'of HBM':>7} {'base GB/s':>9}"
  print(head)
  for row in rows:
    line = (f"{row['T']:>6} {row['adapters']:>4} {row['rank']:>3} "
            f"{row['impl']:>12} {row['ms']:>9.3f} {row['base_ms']:>8.3f} "
            f"{row['ratio']:>7.2f} {row['max_err']:>8.1e}")
    if gpu:
      line += (f" {row['gbps']:>7.0f} {row['hbm_frac']:>7.1%} "
               f"{row['base_gbps']:>9.0f}")
    print(line)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="T in (16, 256, 2048), 1 and 32 adapters, rank 16")
  p.add_argument("--d_in", type=int, default=None,
                 help="projection input width (default 4096 on GPU/TPU, "
                 "576 on CPU)")
  p.add_argument("--d_out", type=int, default=None)
  p.add_argument("--dtype", default="bfloat16",
                 choices=("bfloat16", "float32"))
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--hbm_gbps", type=float, default=4800.0,
                 help="HBM bandwidth for the 'of HBM' column (H200: 4800)")
  p.add_argument("--tokens", type=int, nargs="*", default=None)
  p.add_argument("--no_check", action="store_true",
                 help="skip the cross-implementation max|diff| column")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  accel = backend in ("gpu", "tpu")
  d_in = args.d_in or (4096 if accel else 576)
  d_out = args.d_out or d_in
  if args.quick:
    tokens, adapters, ranks = (16, 256, 2048), (1, 32), (16,)
  else:
    tokens, adapters, ranks = _DECODE + _PREFILL, _ADAPTERS, _RANKS
  if args.tokens:
    tokens = tuple(args.tokens)
  iters = args.iters or (20 if accel else 3)
  print(f"backend={backend} devices={jax.devices()[0].device_kind} "
        f"d_in={d_in} d_out={d_out} dtype={args.dtype} iters={iters}")
  if not accel:
    print("CPU: Pallas kernels run only in interpret mode here, which is not "
          "a speed measurement; comparing the XLA formulations only.")
  print("'x base' = time / time of x @ W of the same shape in this run; "
        "max|d| = max abs difference to the first implementation listed.")
  rows = run(tokens, adapters, ranks, d_in=d_in, d_out=d_out,
             dtype=jnp.dtype(args.dtype), iters=iters,
             hbm_gbps=args.hbm_gbps, check=not args.no_check)
  print_rows(rows, backend)
  return rows


if __name__ == "__main__":
  main()
