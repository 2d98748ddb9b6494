"""What per-tenant expert LoRA costs inside the routed-expert FFN.

Times `moe.experts_ffn` (sorted tokens, grouped matmuls, no dropping) side
by side in one run: without adapters, and with a bank of S slots of rank-R
LoRA on experts_gate_up + experts_down run through each `expert_lora`
implementation, every token on its own random slot. Prints ms per call and
the ratio to the adapter-free FFN.

  .venv/bin/python -m tools.bench_expert_lora --tokens 64,256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from mintjax.adapters import expert_lora
from mintjax.adapters.bank import LayerBank
from mintjax.model import moe


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", default="64,256")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--expert_ffn", type=int, default=256)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--top_k", type=int, default=8)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--impls", default="gather,ragged")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  d, f, e, s, r = a.hidden, a.expert_ffn, a.experts, a.slots, a.rank
  ks = jax.random.split(jax.random.key(0), 8)
  params = {"gate": jax.random.normal(ks[0], (e, d, f)) * 0.02,
            "up": jax.random.normal(ks[1], (e, d, f)) * 0.02,
            "down": jax.random.normal(ks[2], (e, f, d)) * 0.02}
  lb = LayerBank(
      lora_a={"experts_gate_up": jax.random.normal(ks[3], (s, e, d, r)),
              "experts_down": jax.random.normal(ks[4], (s, e, f, r))},
      lora_b={"experts_gate_up": jax.random.normal(ks[5], (s, e, r, 2 * f)),
              "experts_down": jax.random.normal(ks[6], (s, e, r, d))},
      scale=jnp.ones((s,)), rank=jnp.full((s,), r, jnp.int32))
  print(f"experts_ffn D{d} F{f} E{e} k{a.top_k}, bank S{s} R{r}, f32, "
        f"{jax.default_backend()}")
  for t in (int(x) for x in a.tokens.split(",")):
    x = jax.random.normal(ks[7], (t, d))
    logits = jax.random.normal(jax.random.fold_in(ks[7], 1), (t, e))
    w, ids = jax.lax.top_k(jax.nn.softmax(logits), a.top_k)
    slot_t = jax.random.randint(jax.random.fold_in(ks[7], 2), (t,), 0, s)
    plain = jax.jit(lambda x, w, ids: moe.experts_ffn(x, params, ids, w))
    base_ms = _time(plain, x, w, ids, repeats=a.repeats)
    row = f"T={t:5d}: no adapters {base_ms:8.2f} ms"
    for impl in a.impls.split(","):
      fn = jax.jit(lambda x, w, ids, slot_t, impl=impl: moe.experts_ffn(
          x, params, ids, w,
          adapter=expert_lora.expert_hook(lb, slot_t, impl=impl)))
      ms = _time(fn, x, w, ids, slot_t, repeats=a.repeats)
      row += f" | {impl} {ms:8.2f} ms ({ms / base_ms:.2f}x)"
    print(row, flush=True)


if __name__ == "__main__":
  main()
