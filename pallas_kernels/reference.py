"""The oracle for every gather-LoRA kernel, at token level.

Owns `reference_tokens`: the token-level view of mintjax's pure-JAX
`lora_op.reference` (per-token gather in float32 at HIGHEST precision), the
function every kernel test and device check compares against. It re-uses
mintjax's implementation rather than restating it, so kernels and the model
share one definition of the math:

  y[t] = scale[slot[t]] * (x[t] @ A[slot[t]]) @ B[slot[t]]

Slot 0 is the null adapter (all zeros), so its rows are zero.
"""

from __future__ import annotations

import jax

from mintjax.adapters import lora_op


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
  # Every token is its own length-1 example of lora_op.reference.
  return lora_op.reference(x_td[:, None, :], a_sdr, b_sro, scale_s,
                           slot_t)[:, 0, :]
