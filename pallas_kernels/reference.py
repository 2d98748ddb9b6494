"""The oracle for every gather-LoRA kernel, at token level.

Owns `reference_tokens`: the token-level view of mintjax's pure-JAX
per-token gather in float32 at HIGHEST precision, the function every kernel
test and device check compares against. `mintjax.adapters.lora_op.reference`
(the op's oracle) is this function over [B, T] tokens, so kernels and the
model share one definition of the math, and this package imports nothing
from mintjax:

  y[t] = scale[slot[t]] * (x[t] @ A[slot[t]]) @ B[slot[t]]

Slot 0 is the null adapter (all zeros), so its rows are zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_tokens(x_td, a_sdr, b_sro, scale_s, slot_t) -> jax.Array:
  """The oracle over tokens.

  Args:
    x_td: [T, d_in] tokens.
    a_sdr: [S, d_in, R] A factors.
    b_sro: [S, R, d_out] B factors.
    scale_s: [S] per-slot scale.
    slot_t: [T] int32 slot of each token.

  Returns:
    [T, d_out] in x's dtype.
  """
  x_td32 = x_td.astype(jnp.float32)
  a_tdr = a_sdr.astype(jnp.float32)[slot_t]
  b_tro = b_sro.astype(jnp.float32)[slot_t]
  h_tr = jnp.einsum("td,tdr->tr", x_td32, a_tdr, precision=_HIGHEST)
  y_to = jnp.einsum("tr,tro->to", h_tr, b_tro, precision=_HIGHEST)
  y_to = y_to * scale_s.astype(jnp.float32)[slot_t][:, None]
  return y_to.astype(x_td.dtype)
