"""Shared inputs for the gather-LoRA kernel tests: banks and slot patterns.

Owns the tiny random banks (mixed true ranks zero padded into one max rank,
slot 0 null) and the named token→slot patterns every kernel test sweeps:
random with empty slots, all tokens in one slot, every token in its own slot,
slot 0 everywhere, many slots. Shapes are tiny because Pallas runs in
interpret mode on CPU (~200x slower than jnp).

For the lowering and compile tests it also owns the real projection widths
of the model presets (`preset_widths`) and abstract kernel arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_bank(seed: int, num_slots: int, d_in: int, max_rank: int,
              d_out: int, ranks=None, dtype=jnp.float32):
  """A bank whose slot s has true rank ranks[s] (zero padded to max_rank).

  Returns:
    (a_sdr [S, d_in, R], b_sro [S, R, d_out], scale_s [S] f32,
     rank_s [S] int32). Slot 0 is all zeros with rank 0.
  """
  rng = np.random.default_rng(seed)
  if ranks is None:
    ranks = [max_rank] * num_slots
  ranks = np.asarray(ranks, np.int32).copy()
  ranks[0] = 0
  a = rng.standard_normal((num_slots, d_in, max_rank)) / np.sqrt(d_in)
  b = rng.standard_normal((num_slots, max_rank, d_out))
  cols = np.arange(max_rank)[None, :] < ranks[:, None]  # [S, R]
  a = a * cols[:, None, :]
  b = b * cols[:, :, None]
  scale = rng.uniform(0.5, 2.0, num_slots).astype(np.float32)
  scale[0] = 0.0
  return (jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(scale),
          jnp.asarray(ranks))


def make_slots(pattern: str, num_tokens: int, num_slots: int, seed: int = 0):
  """[T] int32 slots following a named pattern (see the module docstring)."""
  rng = np.random.default_rng(seed)
  if pattern == "random":  # only even slots used: odd ones stay empty
    slots = 2 * rng.integers(0, (num_slots + 1) // 2, num_tokens)
  elif pattern == "one_slot":
    slots = np.full(num_tokens, num_slots - 1)
  elif pattern == "own_slot":
    slots = 1 + np.arange(num_tokens) % (num_slots - 1)
    rng.shuffle(slots)
  elif pattern == "slot0":
    slots = np.zeros(num_tokens)
  elif pattern == "mixed_base":  # half base rows, half adapters
    slots = np.where(rng.random(num_tokens) < 0.5, 0,
                     rng.integers(1, num_slots, num_tokens))
  else:
    raise ValueError(f"unknown slot pattern {pattern!r}")
  return jnp.asarray(slots, jnp.int32)


def make_x(seed: int, num_tokens: int, d: int, dtype=jnp.float32):
  rng = np.random.default_rng(seed + 1000)
  return jnp.asarray(rng.standard_normal((num_tokens, d)), dtype)


def assert_close(got, want, dtype):
  """f32: tight; bf16: relative to the output's magnitude (one bf16 rounding
  of the rank-R intermediate plus the output rounding)."""
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  mag = max(float(np.max(np.abs(want))), 1e-6)
  tol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * mag)


# ------------------------------------------- real model widths (lowering)

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def preset_widths() -> dict[tuple[int, int], str]:
  """Every distinct (d_in, d_out) projection width of the model presets,
  mapped to the first preset and target that has it (for test ids)."""
  from mintjax.model import presets
  widths: dict[tuple[int, int], str] = {}
  for name in presets.names():
    config = presets.get_config(name)
    for t in config.projection_names():  # MLA bases have q_a/kv_b, no k/v
      widths.setdefault(config.projection_shape(t), f"{name}.{t}")
  return widths


def abstract_args(num_tokens: int, d_in: int, d_out: int, rank: int,
                  dtype, num_slots: int = 8, sharding=None):
  """ShapeDtypeStructs (x [T, d_in], A [S, d_in, R], B [S, R, d_out],
  scale [S], slot [T], rank [S]) for lowering a kernel without data."""
  def s(shape, dt):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  return (s((num_tokens, d_in), dtype), s((num_slots, d_in, rank), dtype),
          s((num_slots, rank, d_out), dtype), s((num_slots,), jnp.float32),
          s((num_tokens,), jnp.int32), s((num_slots,), jnp.int32))


def value_and_grads(token_fn):
  """(y, dx, dA, dB, dscale) of a token-level gather-LoRA function: the
  forward and every backward kernel in one program."""
  def run(x, a, b, scale, slot, rank):
    def loss(x, a, b, scale):
      y = token_fn(x, a, b, scale, slot, rank)
      return jnp.sum(y.astype(jnp.float32) ** 2), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                       has_aux=True)(x, a, b, scale)
    return (y,) + grads
  return run
