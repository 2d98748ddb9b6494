"""One-query (decode) attention over a bf16 KV cache as a native XLA:CPU op.

Owns `decode_attention`, the drop-in for
`mintjax.model.layers._one_query_attention` on the Engine's per-layer bf16
CPU layout (the layout that runs `cpu_kernels.amx`); the C++ is
`decode_attention.cc`, built and registered by `cpu_kernels.native`. Same
math and roundings as the XLA version (f32 scores and softmax, bf16
probabilities, f32 sums, bf16 output); sums in another order. Serving only
(no VJP), CPU only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.native import available, why_unavailable  # re-exported

__all__ = ["decode_attention", "supports", "available", "why_unavailable"]
_TARGET = "mintjax_decode_attention"


def supports(num_heads: int, num_kv_heads: int, head_dim: int,
             v_head_dim: int | None = None) -> bool:
  """Whether the op takes these shapes (AMX tiles: at most 16 query heads
  per kv head, head_dim % 32 == 0, v_head_dim % 16 == 0)."""
  v_head_dim = head_dim if v_head_dim is None else v_head_dim
  return (num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 16
          and head_dim % 32 == 0 and v_head_dim % 16 == 0)


def decode_attention(q_b1hd, k_bskd, v_bskd, q_pos_b1, k_pos_bs, scale=None):
  """[B, 1, H * hv] bf16 attention of one query per row over the cache.

  Args: as `layers.attention` with T = 1: q [B, 1, H, hd], k [B, S, K, hd],
  v [B, S, K, hv] (all bf16), q_pos [B, 1], k_pos [B, S] (a key is visible
  when 0 <= k_pos <= q_pos), scale (default 1 / sqrt(hd)).
  """
  b, t, h, hd = q_b1hd.shape
  if t != 1:
    raise ValueError(f"decode_attention takes one query per row, got T={t}")
  for name, x in (("q", q_b1hd), ("k", k_bskd), ("v", v_bskd)):
    if x.dtype != jnp.bfloat16:
      raise ValueError(f"decode_attention: {name} must be bfloat16, got "
                       f"{x.dtype}")
  if not available():
    raise RuntimeError(f"decode_attention is unavailable here: "
                       f"{why_unavailable()}")
  if not supports(h, k_bskd.shape[2], hd, v_bskd.shape[-1]):
    raise ValueError(f"decode_attention does not take H={h}, "
                     f"K={k_bskd.shape[2]}, hd={hd}, hv={v_bskd.shape[-1]} "
                     "(see supports)")
  scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
  out = jax.ShapeDtypeStruct((b, h * v_bskd.shape[-1]), jnp.bfloat16)
  y = jax.ffi.ffi_call(_TARGET, out)(
      q_b1hd.reshape(b, h, hd), k_bskd, v_bskd,
      q_pos_b1.reshape(b).astype(jnp.int32), k_pos_bs.astype(jnp.int32),
      scale=np.float32(scale))
  return y.reshape(b, 1, -1)
