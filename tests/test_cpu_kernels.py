"""The native CPU ops: the AMX matmul (`cpu_kernels.amx`) against a float64
numpy oracle, the decode attention (`cpu_kernels.attention`) against the XLA
one-query attention, and the Engine's per-layer bf16 layout with the ops
against XLA's.

The ops' tests skip on hosts without AMX (the reason is printed); packing
is pure JAX and always runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import amx
from cpu_kernels import attention as cpu_attention
from cpu_kernels import native
from cpu_kernels import swiglu as cpu_swiglu
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import slot_dense
from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights, BankSpec
from mintjax.config import ModelConfig
from mintjax.model import layers
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters

# Skipped only where the ops cannot exist (no AMX, no compiler, or turned
# off); on an AMX host with g++ a failed build fails these tests.
needs_amx = pytest.mark.skipif(
    not native.host_can_build(),
    reason="no AMX CPU, no C++ compiler, or MINTJAX_CPU_AMX=0")

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


@needs_amx
@pytest.mark.parametrize("b,s,k,g,hd,hv", [(4, 64, 3, 3, 64, 64),
                                          (3, 37, 2, 1, 32, 48),
                                          (2, 16, 1, 16, 96, 128),
                                          (2, 200, 2, 2, 64, 16)])
def test_decode_attention_matches_xla_one_query_attention(b, s, k, g, hd, hv):
  rng = np.random.default_rng(b * 100 + s)
  q = _bf16(rng, (b, 1, k * g, hd), 2.0)
  kc, vc = _bf16(rng, (b, s, k, hd), 2.0), _bf16(rng, (b, s, k, hv))
  q_pos = jnp.asarray(rng.integers(0, s, (b, 1)), jnp.int32)
  k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  # Row 0: holes (-1 = never visible); the last row sees nothing at all.
  k_pos = k_pos.at[0, ::3].set(-1).at[b - 1].set(-1)
  got = jax.jit(cpu_attention.decode_attention)(q, kc, vc, q_pos, k_pos)
  want = jax.jit(layers._one_query_attention, static_argnums=5)(  # pylint: disable=protected-access
      q, kc, vc, q_pos, k_pos, None)
  assert got.shape == want.shape == (b, 1, k * g * hv)
  assert got.dtype == jnp.bfloat16
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # bf16 output: each value within about a bf16 ulp (summation order, exp),
  # and no drift on average (a 1% bias in the probabilities fails this).
  np.testing.assert_allclose(got, want, rtol=8e-3, atol=4e-3)
  assert np.abs(got - want).mean() < 2e-3 * np.abs(want).mean()


def test_decode_attention_refuses_f32_and_unsupported_shapes():
  pos = jnp.zeros((1, 1), jnp.int32)
  x = jnp.zeros((1, 1, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    cpu_attention.decode_attention(x, x, x, pos, pos)
  assert not cpu_attention.supports(4, 2, 24)
  assert not cpu_attention.supports(34, 2, 64)
  assert cpu_attention.supports(9, 3, 64)
  if cpu_attention.available():
    x = jnp.zeros((1, 1, 2, 24), jnp.bfloat16)
    with pytest.raises(ValueError, match="hd=24"):
      cpu_attention.decode_attention(x, x, x, pos, pos)


@needs_amx
@pytest.mark.parametrize("m,f,deltas", [(16, 1536, "both"), (3, 40, None),
                                        (512, 96, "both"), (1, 7, "both"),
                                        (20, 96, "gate")])
def test_swiglu_matches_xla(m, f, deltas):
  rng = np.random.default_rng(m + f)
  y = jnp.asarray(rng.standard_normal((2, m, f, 2)) * 4, jnp.float32)
  y = y.at[0, 0, 0, 0].set(jnp.nan).at[0, 0, 1, 0].set(-200.0)
  dg = _bf16(rng, (2, m, f)) if deltas else None
  du = _bf16(rng, (2, m, f)) if deltas == "both" else None
  got = np.asarray(jax.jit(cpu_swiglu.swiglu)(y, dg, du), np.float32)
  gate, up = y[..., 0], y[..., 1]
  if dg is not None:
    gate = gate + dg
  if du is not None:
    up = up + du
  gate, up = gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16)
  want = np.asarray(jax.nn.silu(gate) * up, np.float32)
  assert got.shape == want.shape == (2, m, f)
  assert np.isnan(got[0, 0, 0]) and got[0, 0, 1] == 0.0
  ok = ~np.isnan(want)
  # One rounding instead of XLA's two (silu, then the product): within two
  # bf16 ulps (2^-6 relative at worst, seen at 0.0156).
  np.testing.assert_allclose(got[ok], want[ok], rtol=1.6e-2, atol=1e-6)
  if ok.sum() > 1000:  # no bias on average (a 1% error fails this)
    assert np.abs(got[ok] - want[ok]).mean() < 4e-3 * np.abs(want[ok]).mean()


@needs_amx
@pytest.mark.parametrize("fused,num_slots", [(True, 5), (False, 5),
                                             (True, 17)],
                         ids=["groups", "single", "16-adapters"])
def test_lora_group_matches_the_xla_slot_dense_view(fused, num_slots):
  """The packed view (one `amx.lora_group` call per group) against the XLA
  view of the same bank in bf16: base rows (slot 0) and out-of-range slots
  get exact zeros, adapted rows agree to a bf16 rounding, at decode (T=1)
  and prefill (T=5, T=16) shapes. With 16 adapters and T=16 every 16-row
  block holds one slot, so the op's skipping of other slots' shrink
  columns and expand chunks is exercised."""
  cfg = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64,
                    intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
  spec = BankSpec(num_slots=num_slots, targets=ALL_TARGETS, max_rank=8)
  bank = bank_lib.bank_from_weights(cfg, spec, {
      s: AdapterWeights.random(cfg, ALL_TARGETS, (3, 5, 8)[s % 3],
                               alpha=8.0, seed=s, std=0.2)
      for s in range(1, spec.num_slots)})
  groups = slot_dense.groups_for(ALL_TARGETS, qkv=fused, gate_up=fused)
  xla = slot_dense.slot_dense_view(bank, rank=8, groups=groups,
                                   dtype="bfloat16")
  packed = slot_dense.slot_dense_view(bank, rank=8, groups=groups,
                                      dtype="bfloat16", packed=True)
  rng = np.random.default_rng(3)
  mid = (6, 11) if num_slots > 12 else (2, 3)  # slots in every K-chunk
  idx = jnp.asarray([0, 1, *mid, 4, 99, -1, num_slots - 1], jnp.int32)
  for t in (1, 5, 16):
    for l in range(cfg.num_layers):
      for group in groups:
        d_in = xla.layer(l).shrink["+".join(group)].shape[1]
        x = _bf16(rng, (8, t, d_in))
        want = xla.layer(l).deltas(x, group, idx)
        got = packed.layer(l).deltas(x, group, idx)
        for name, g, w in zip(group, got, want):
          g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
          assert g.shape == w.shape, name
          np.testing.assert_array_equal(g[[0, 5, 6]], 0)
          assert np.abs(g[1]).max() > 0
          np.testing.assert_allclose(g, w, rtol=8e-3, atol=2e-3 *
                                     np.abs(w).max())


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
@pytest.mark.parametrize("head_dim,num_slots", [(16, 3), (32, 3), (32, 40)],
                         ids=["xla-attention", "native-attention",
                              "gather-lora"])
def test_engine_amx_layout_matches_xla_dots(head_dim, num_slots):
  """Same requests (base rows, adapter rows) through the per-layer bf16
  engine with the native ops and with XLA's: the same greedy tokens,
  log-probabilities equal to bf16 rounding, and the native engine compiles
  nothing after warm-up. head_dim 16 keeps XLA's attention (the native one
  needs head_dim % 32 == 0), 32 runs the native one; 40 slots for a batch of
  8 keep the stacked bank's gather-LoRA (no slot-dense view) on AMX base
  matmuls."""
  cfg = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64,
                    intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=head_dim)
  assert cpu_attention.supports(4, 2, head_dim) == (head_dim == 32)
  base = random_base(cfg, seed=0, std=0.3)
  src = InMemoryAdapters()
  for i in range(3):
    src.publish(f"u{i}", AdapterWeights.random(cfg, ALL_TARGETS, 4, alpha=8,
                                               seed=i), base.fingerprint)
  reqs = [dict(prompt=[5 + i, 9, 11, 3], adapter=(f"u{i % 3}" if i % 2 else
                                                 None),
               max_new_tokens=4, ignore_eos=True)
          for i in range(6)]
  ecfg = EngineConfig(num_slots=num_slots, max_batch=8, max_len=16,
                      steps_per_call=2,
                      prefill_batch=8, min_bucket=8, max_rank=4,
                      dtype="bfloat16", layer_layout="per_layer")
  outs = {}
  for mm in ("amx", "xla"):
    e = Engine(base, src, dataclasses.replace(ecfg, cpu_matmul=mm))
    assert e.matmul == mm
    assert (e._slot_dense is None) == (num_slots > 32)  # pylint: disable=protected-access
    outs[mm] = e.generate(reqs)
    if mm == "amx":
      assert e.compilations_since_warmup() == 0
  same = 0
  for a, x in zip(outs["amx"], outs["xla"]):
    assert a.error is None and x.error is None
    # bf16 rounding may flip a near tie of this flat random model; up to
    # and including the first different token both engines must agree on
    # log-probabilities (at a flip: both chose an equally likely token).
    n = next((i for i, (u, v) in enumerate(zip(a.tokens, x.tokens)) if u != v),
             len(a.tokens))
    same += n == len(a.tokens)
    k = min(n + 1, len(a.tokens))
    np.testing.assert_allclose(a.logprobs[:k], x.logprobs[:k], atol=0.05)
  assert same >= len(reqs) - 1


@needs_amx
def test_native_path_gives_base_rows_the_exact_base_output():
  """Slot 0 immunity through the native ops (AMX matmuls, native attention,
  SwiGLU, LoRA groups): with every adapter slot in use, base rows get bit
  for bit the tokens and log-probabilities of an engine with no adapters."""
  cfg = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64,
                    intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=32)
  base = random_base(cfg, seed=1, std=0.3)
  src = InMemoryAdapters()
  for i in range(3):
    src.publish(f"u{i}", AdapterWeights.random(cfg, ALL_TARGETS, 2 + i,
                                               alpha=8, seed=20 + i, std=0.3),
                base.fingerprint)
  ecfg = EngineConfig(num_slots=3, max_batch=6, max_len=32, steps_per_call=4,
                      prefill_batch=3, min_bucket=16, max_rank=4,
                      dtype="bfloat16", layer_layout="per_layer",
                      cpu_matmul="amx")
  rng = np.random.default_rng(4)
  mixed = [dict(prompt=[int(t) for t in rng.integers(3, 290, 5 + 3 * i)],
                adapter=a, max_new_tokens=8, ignore_eos=True)
           for i, a in enumerate(["u0", None, "u1", None, "u2", None])]
  out = Engine(base, src, ecfg).generate(mixed)
  assert {r.revision for r in out if r.revision} == {"u0@1", "u1@1", "u2@1"}
  plain_engine = Engine(base, None, ecfg)
  assert plain_engine.matmul == "amx"
  plain = plain_engine.generate([dict(r, adapter=None) for r in mixed])
  for i in (1, 3, 5):
    assert out[i].tokens == plain[i].tokens
    assert out[i].logprobs == plain[i].logprobs
  assert any(out[i].tokens != plain[i].tokens for i in (0, 2, 4))
