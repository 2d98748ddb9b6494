"""SwiGLU of the fused gate/up projection as a native XLA:CPU op.

Owns `swiglu`, used by `mintjax.model.fused.gate_up` on the Engine's
per-layer bf16 CPU layout (the layout that runs `cpu_kernels.amx`); the C++
is `swiglu.cc`, built and registered by `cpu_kernels.native`. XLA:CPU ran
this elementwise at ~2 ns an element here (a quarter of a SmolLM2 prefill).
Serving only (no VJP), CPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.native import available, why_unavailable  # re-exported

__all__ = ["swiglu", "available", "why_unavailable"]


def swiglu(y_btf2, d_gate_btf=None, d_up_btf=None):
  """bf16(silu(gate) * up) [B, T, F] from the f32 fused projection.

  Args:
    y_btf2: [B, T, F, 2] float32, gate and up interleaved (`fused` layout).
    d_gate_btf, d_up_btf: optional LoRA deltas [B, T, F] (None: no delta
      for that half), added in f32 before gate and up are rounded to bf16.
  """
  if not available():
    raise RuntimeError(f"swiglu is unavailable here: {why_unavailable()}")
  if y_btf2.dtype != jnp.float32 or y_btf2.shape[-1] != 2:
    raise ValueError(f"swiglu takes f32 [..., F, 2], got {y_btf2.dtype} "
                     f"{y_btf2.shape}")
  lead, f = y_btf2.shape[:-2], y_btf2.shape[-2]
  if (d_gate_btf is None) != (d_up_btf is None):  # one target adapted
    zero = jnp.zeros(y_btf2.shape[:-1], jnp.bfloat16)
    d_gate_btf = zero if d_gate_btf is None else d_gate_btf
    d_up_btf = zero if d_up_btf is None else d_up_btf
  y = y_btf2.reshape(-1, f, 2)
  out = jax.ShapeDtypeStruct((y.shape[0], f), jnp.bfloat16)
  if d_gate_btf is None:
    r = jax.ffi.ffi_call("mintjax_swiglu", out)(y)
  else:
    r = jax.ffi.ffi_call("mintjax_swiglu_deltas", out)(
        y, d_gate_btf.reshape(-1, f).astype(jnp.bfloat16),
        d_up_btf.reshape(-1, f).astype(jnp.bfloat16))
  return r.reshape(*lead, f)
