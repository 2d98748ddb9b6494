r"""Benchmark: gather-LoRA formulations vs the plain base matmul, side by side.

For decode-like (T = batch, one token per row) and prefill-like
(T = batch x length) shapes and 1/8/32/128 distinct adapters, times
`x @ W + delta` for every XLA formulation of `mintjax.adapters.lora_op` and
prints each as a ratio to `x @ W` alone, measured interleaved in one run so
machine noise hits all of them alike.

  python -m tools.bench_lora_op            # full table (~2 min on 2 cores)
  python -m tools.bench_lora_op --quick    # fewer repeats, smaller shapes
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters import lora_op

_QUICK = flags.DEFINE_bool("quick", False, "Fewer repeats and shapes.")
_D_IN = flags.DEFINE_integer("d_in", 576, "Projection input width.")
_D_OUT = flags.DEFINE_integer("d_out", 1536, "Projection output width.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank (max_rank of the bank).")
_IMPLS = flags.DEFINE_list("impls", ["gather", "ragged", "onehot", "reference"],
                           "Formulations to time.")


def _time(fn, args, repeats: int) -> float:
  """Median wall time of `repeats` calls (after one warm-up) in ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def bench_case(batch, length, distinct, num_slots, *, d_in, d_out, rank,
               impls, repeats, rounds):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, length, d_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in),
                  jnp.float32)
  a = jnp.asarray(rng.standard_normal((num_slots, d_in, rank)) * 0.05,
                  jnp.float32).at[0].set(0)
  b = jnp.asarray(rng.standard_normal((num_slots, rank, d_out)) * 0.05,
                  jnp.float32).at[0].set(0)
  scale = jnp.ones((num_slots,), jnp.float32).at[0].set(0)
  # Every one of the `distinct` adapters appears at least once.
  idx = np.resize(np.arange(1, distinct + 1), batch)
  idx = jnp.asarray(rng.permutation(idx), jnp.int32)

  base = jax.jit(lambda x, w: jnp.einsum("btd,do->bto", x, w))
  fns = {name: jax.jit(
      lambda x, w, a, b, s, i, name=name: lora_op.lora_project(
          x, w, None, (a, b, s), i, impl=name)) for name in impls}
  samples = {name: [] for name in ("base", *impls)}
  for _ in range(rounds):  # interleave so drift affects every column alike
    samples["base"].append(_time(base, (x, w), repeats))
    for name, fn in fns.items():
      samples[name].append(_time(fn, (x, w, a, b, scale, idx), repeats))
  return {k: statistics.median(v) for k, v in samples.items()}


def main(argv):
  del argv
  quick = _QUICK.value
  impls = list(_IMPLS.value)
  repeats, rounds = (3, 2) if quick else (10, 3)
  cases = [("decode", 128, 1), ("prefill", 128, 16)]
  if quick:
    cases = [("decode", 64, 1), ("prefill", 32, 16)]
  distincts = (1, 8, 32, 128)
  print(f"# gather-LoRA op vs base matmul  backend={jax.default_backend()} "
        f"devices={jax.device_count()} d_in={_D_IN.value} "
        f"d_out={_D_OUT.value} rank={_RANK.value} f32")
  print("| shape | T | distinct | base ms | " +
        " | ".join(f"{n} ×base" for n in impls) + " |")
  print("|---|---|---|---|" + "---|" * len(impls))
  for label, batch, length in cases:
    for distinct in distincts:
      if distinct > batch:
        continue
      res = bench_case(batch, length, distinct, 129, d_in=_D_IN.value,
                       d_out=_D_OUT.value, rank=_RANK.value, impls=impls,
                       repeats=repeats, rounds=rounds)
      ratios = " | ".join(f"{res[n] / res['base']:.2f}" for n in impls)
      print(f"| {label} | {batch * length} | {distinct} | "
            f"{res['base']:.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
  app.run(main)
