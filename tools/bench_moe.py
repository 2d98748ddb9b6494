"""Grouped expert matmuls side by side: ragged_dot, tiled, gather, dense.

Times one MoE feed-forward (`mintjax.model.moe.experts_ffn`, the T*k
(token, expert) pairs sorted by expert) with its two grouped matmuls,
`jax.lax.ragged_dot` and single-expert tiles (`impl='tiled'`), against two
formulations with the same result, in one run on this machine's backend:

- `gather`: each (token, choice) gathers its expert's [D, F] weights and
  runs a batched matvec (what a naive per-token MoE does; memory grows with
  T*k*D*F);
- `dense`: every expert on every token, then the routing weights mask
  (`moe.experts_ffn_reference`, E/k times the useful FLOPs).

Prints milliseconds per call and the ratios to ragged_dot. Shapes default
to a Qwen3-MoE-like layer scaled to fit a small CPU (D 512, F 256, E 64,
k 8); `--tokens` sweeps T.

  python -m tools.bench_moe --tokens 16,256 --dtype float32
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mintjax.model import moe


def _gather_ffn(x_td, p, ids_tk, w_tk):
  """Per (token, choice): gather the expert's weights, then batched matvecs."""
  g = jnp.einsum("td,tkdf->tkf", x_td, p["gate"][ids_tk])
  u = jnp.einsum("td,tkdf->tkf", x_td, p["up"][ids_tk])
  y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, p["down"][ids_tk])
  return jnp.einsum("tkd,tk->td", y, w_tk.astype(y.dtype))


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", default="16,256")
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--expert_ffn", type=int, default=256)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top_k", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  d, f, e, k = args.hidden, args.expert_ffn, args.experts, args.top_k
  dt = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  p = {n: jnp.asarray(rng.normal(0, 0.05, s), dt) for n, s in
       (("gate", (e, d, f)), ("up", (e, d, f)), ("down", (e, f, d)))}
  fns = {"ragged_dot": jax.jit(functools.partial(moe.experts_ffn,
                                                 impl="ragged_dot")),
         "tiled": jax.jit(functools.partial(moe.experts_ffn, impl="tiled")),
         "gather": jax.jit(_gather_ffn),
         "dense": jax.jit(moe.experts_ffn_reference)}
  print(f"backend={jax.default_backend()} D={d} F={f} E={e} k={k} "
        f"dtype={args.dtype}")
  print("tokens | ragged_dot ms | tiled ms | gather ms | dense ms | "
        "ragged/tiled | gather/tiled | dense/tiled | max |diff| tiled vs dense")
  for t in (int(x) for x in args.tokens.split(",")):
    x = jnp.asarray(rng.normal(size=(t, d)), dt)
    ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]),
                      jnp.int32)
    w = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    ms = {n: _time(fn, (x, p, ids, w), args.repeats) for n, fn in fns.items()}
    diff = float(jnp.abs(fns["tiled"](x, p, ids, w).astype(jnp.float32)
                         - fns["dense"](x, p, ids, w).astype(jnp.float32))
                 .max())
    r = {n: v / ms["tiled"] for n, v in ms.items()}
    print(f"{t} | {ms['ragged_dot']:.2f} | {ms['tiled']:.2f} | "
          f"{ms['gather']:.2f} | {ms['dense']:.2f} | {r['ragged_dot']:.2f} | "
          f"{r['gather']:.2f} | {r['dense']:.2f} | {diff:.1e}")


if __name__ == "__main__":
  main()
