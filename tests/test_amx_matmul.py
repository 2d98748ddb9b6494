"""The AMX matmul op (`cpu_kernels.amx`) against a float64 numpy oracle, and
the Engine's per-layer bf16 layout with the op against XLA's dots.

The op's tests skip on hosts without AMX (the reason is printed); packing
is pure JAX and always runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import amx
from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters

needs_amx = pytest.mark.skipif(not amx.available(),
                               reason=f"AMX op unavailable: "
                               f"{amx.why_unavailable()}")

# (M, K, N): decode and prefill rows, widths that are not multiples of the
# 32 x 64 tile (padding), and one M that is not a multiple of 16.
SHAPES = [(16, 576, 960), (1, 64, 64), (17, 96, 130), (40, 100, 70),
          (3, 1536, 576), (0, 64, 64)]


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


@pytest.mark.parametrize("n,k", [(64, 32), (70, 100), (1, 1), (130, 576)])
def test_pack_roundtrip_and_layout(n, k):
  rng = np.random.default_rng(n * 1000 + k)
  w = _bf16(rng, (n, k))
  pk = amx.pack(w)
  assert pk.shape == (n, k)
  assert pk.packed.shape == (-(-n // 64), -(-k // 32), 4, 16, 32)
  np.testing.assert_array_equal(np.asarray(amx.unpack(pk), np.float32),
                                np.asarray(w, np.float32))
  # The documented element order, checked at one entry off the diagonal.
  p = np.asarray(pk.packed, np.float32)
  j, r = min(n - 1, 16 + 5), min(k - 1, 2 * 3 + 1)
  nb, t, jj = j // 64, (j % 64) // 16, j % 16
  kc, rr, pp = r // 32, (r % 32) // 2, r % 2
  assert p[nb, kc, t, rr, 2 * jj + pp] == float(np.asarray(w, np.float32)[j, r])


@needs_amx
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_matches_float64_oracle(m, k, n):
  rng = np.random.default_rng(m + k + n)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (n, k))
  y = jax.jit(amx.matmul)(x, amx.pack(w))
  assert y.dtype == jnp.float32 and y.shape == (m, n)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  # bf16 products are exact in f32; only the f32 sums round.
  np.testing.assert_allclose(np.asarray(y), want, rtol=0,
                             atol=2e-6 * k * max(1.0, np.abs(want).max(initial=0)))


@needs_amx
def test_matmul_batched_leading_dims_and_row_isolation():
  rng = np.random.default_rng(7)
  x, w = _bf16(rng, (2, 9, 128)), _bf16(rng, (200, 128))
  x = x.at[1, 3, 5].set(jnp.nan)  # one poisoned row
  y = np.asarray(jax.jit(amx.matmul)(x, amx.pack(w)))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  bad = np.zeros((2, 9), bool)
  bad[1, 3] = True
  assert np.isnan(y[bad]).all()
  np.testing.assert_allclose(y[~bad], want[~bad], atol=1e-3, rtol=1e-5)


def test_matmul_rejects_wrong_width():
  w = amx.pack(jnp.zeros((64, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="d_in 32"):
    amx.matmul(jnp.zeros((4, 32), jnp.bfloat16), w)


def test_engine_config_refuses_amx_without_bf16_per_layer():
  with pytest.raises(ValueError, match="cpu_matmul"):
    EngineConfig(cpu_matmul="onednn")
  with pytest.raises(ValueError, match="bfloat16"):
    EngineConfig(dtype="float32", cpu_matmul="amx").matmul(per_layer=True)
  with pytest.raises(ValueError, match="per-layer"):
    EngineConfig(dtype="bfloat16", cpu_matmul="amx").matmul(per_layer=False)
  assert EngineConfig(dtype="bfloat16", cpu_matmul="xla").matmul(True) == "xla"


@needs_amx
def test_engine_amx_layout_matches_xla_dots():
  """Same requests (base rows, every adapter slot used) through the per-layer
  bf16 engine with the AMX op and with XLA's dots: the same greedy tokens,
  log-probabilities equal to bf16 rounding, and the AMX engine compiles
  nothing after warm-up."""
  cfg = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64,
                    intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
  base = random_base(cfg, seed=0, std=0.3)
  src = InMemoryAdapters()
  for i in range(3):
    src.publish(f"u{i}", AdapterWeights.random(cfg, ALL_TARGETS, 4, alpha=8,
                                               seed=i), base.fingerprint)
  reqs = [dict(prompt=[5 + i, 9, 11, 3], adapter=(f"u{i % 3}" if i % 2 else
                                                 None),
               max_new_tokens=4, ignore_eos=True)
          for i in range(6)]
  ecfg = EngineConfig(num_slots=3, max_batch=8, max_len=16, steps_per_call=2,
                      prefill_batch=8, min_bucket=8, max_rank=4,
                      dtype="bfloat16", layer_layout="per_layer")
  outs = {}
  for mm in ("amx", "xla"):
    e = Engine(base, src, dataclasses.replace(ecfg, cpu_matmul=mm))
    assert e.matmul == mm
    outs[mm] = e.generate(reqs)
    if mm == "amx":
      assert e.compilations_since_warmup() == 0
  for a, x in zip(outs["amx"], outs["xla"]):
    assert a.error is None and x.error is None
    assert a.tokens == x.tokens
    np.testing.assert_allclose(a.logprobs, x.logprobs, atol=0.05)
