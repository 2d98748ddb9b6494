"""The grouped matmul for expert FFNs: Pallas (interpret) == ragged_dot == oracle.

CPU runs the TPU kernel in interpret mode on tiny shapes; the deviceless TPU
compile of the same kernel is in tests/test_gmm_tpu.py (`make test-tpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm

# (M, K, N, group_sizes, group_offset, g): M not a multiple of the row tile,
# K/N not multiples of 128, empty groups, rows past sum(group_sizes), and
# offsets that select a middle window of groups (expert parallelism).
# Interpret mode is slow on 2 cores: two cases run by default, the rest
# (and the gradient check) under `make test-moe`.
CASES = [
    pytest.param(40, 64, 96, (7, 0, 20, 13), 0, 4, marks=pytest.mark.moe),
    (40, 64, 96, (7, 0, 20, 5), 0, 4),           # 8 rows in no group
    (136, 128, 256, (30, 50, 0, 40, 16), 1, 3),  # a middle window
    pytest.param(24, 32, 48, (0, 0, 24), 2, 1, marks=pytest.mark.moe),
]


def _arrays(m, k, n, g, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(m, k)), dtype),
          jnp.asarray(r.normal(size=(g, k, n)) / np.sqrt(k), dtype))


@pytest.mark.parametrize("m,k,n,sizes,offset,g", CASES)
def test_pallas_interpret_and_ragged_dot_equal_reference(m, k, n, sizes,
                                                         offset, g):
  x, w = _arrays(m, k, n, g)
  gs = jnp.asarray(sizes, jnp.int32)
  ref = gmm.reference(x, w, gs, offset)
  pallas = gmm.grouped_matmul(x, w, gs, group_offset=offset, impl="pallas",
                              interpret=True)
  ragged = gmm.grouped_matmul(x, w, gs, group_offset=jnp.int32(offset),
                              impl="ragged_dot")
  np.testing.assert_allclose(pallas, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ragged, ref, rtol=1e-5, atol=1e-5)
  # Rows outside the window are exactly zero, not merely small.
  ends = np.cumsum(sizes)
  lo = ends[offset - 1] if offset else 0
  hi = ends[offset + g - 1]
  for out in (pallas, ragged):
    assert not np.asarray(out[:lo]).any() and not np.asarray(out[hi:]).any()
    assert np.abs(np.asarray(out[lo:hi])).min(axis=1).max() > 0


@pytest.mark.moe
def test_gradients_match_reference():
  m, k, n, sizes, offset, g = CASES[2]
  x, w = _arrays(m, k, n, g, seed=1)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=(m, n)), jnp.float32)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * cot)

  want = jax.grad(loss(lambda x, w: gmm.reference(x, w, gs, offset)),
                  argnums=(0, 1))(x, w)
  for impl in ("pallas", "ragged_dot"):
    got = jax.grad(loss(lambda x, w: gmm.grouped_matmul(
        x, w, gs, group_offset=offset, impl=impl, interpret=True)),
                   argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.moe
def test_bf16_accumulates_in_float32():
  x, w = _arrays(32, 256, 128, 2, dtype=jnp.bfloat16, seed=3)
  gs = jnp.asarray([12, 20], jnp.int32)
  ref = gmm.reference(x, w, gs)
  for impl in ("pallas", "ragged_dot"):
    out = gmm.grouped_matmul(x, w, gs, impl=impl, interpret=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32),
                               rtol=2e-2, atol=2e-2)


def test_bad_shapes_and_impl_are_refused():
  x, w = _arrays(8, 16, 8, 2)
  with pytest.raises(ValueError, match=r"lhs \[M, K\], rhs \[g, K, N\]"):
    gmm.grouped_matmul(x[:, :8], w, jnp.asarray([4, 4], jnp.int32))
  with pytest.raises(ValueError, match="group_sizes"):
    gmm.grouped_matmul(x, w, jnp.asarray([8], jnp.int32))
  with pytest.raises(ValueError, match="impl must be one of"):
    gmm.grouped_matmul(x, w, jnp.asarray([4, 4], jnp.int32), impl="megablox")
