"""Per-tenant adapters on MoE bases: the expert-axis gather-LoRA op and targets.

- the op: every implementation of `expert_lora_delta` (the dense op's
  gather/ragged/onehot on the flattened (slot, expert) bank) equals the
  one-hot oracle, values and gradients;
- the bank: routed-expert targets carry an expert axis through spec, bank,
  slot writes/reads and the trainer's rank mask; the router is refused;
- the model: a mixed batch on a tiny Qwen3-MoE (a dense layer among MoE
  layers) and a tiny DeepSeek-V3 (MLA q_a/q_b/kv_a/kv_b/o, shared and routed
  experts) equals, row by row, the base model with that row's adapter
  merged into the weights (W + scale * A @ B per expert), and slot 0 rows
  equal the plain base (these compile two models: `moe` marker,
  `make test-moe`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax.adapters import bank as bank_lib
from mintjax.adapters import expert_lora
from mintjax.adapters.family import get_family
from mintjax.adapters.spec import (ALL_TARGETS, AdapterError,
                                   AdapterWeights, BankSpec, target_shape)
from mintjax.config import ModelConfig
from mintjax.model import llama

_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48,
               num_layers=3, num_heads=4, num_experts=8,
               moe_intermediate_size=16)
QWEN3_MOE = ModelConfig(architecture="qwen3_moe", num_kv_heads=2, head_dim=8,
                        qk_norm=True, num_experts_per_tok=2,
                        norm_topk_prob=True, moe_layers=(0, 2), **_COMMON)
DEEPSEEK = ModelConfig(
    architecture="deepseek_v3", num_kv_heads=4, head_dim=8,
    num_experts_per_tok=3, router_scoring="sigmoid", n_shared_experts=1,
    n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    moe_layers=(1, 2), q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, rope_interleave=True, **_COMMON)
TARGETS = {
    "qwen3_moe": ("q", "o", "gate", "experts_gate_up", "experts_down",
                  "router"),
    "deepseek_v3": ("q_a", "q_b", "kv_a", "kv_b", "o", "down", "shared_gate",
                    "shared_up", "shared_down", "experts_gate_up",
                    "experts_down", "router"),
}


# ----------------------------------------------------------------- the op


def _op_inputs(seed=0, m=37, s=5, e=4, d_in=12, r=3, d_out=10):
  ks = jax.random.split(jax.random.key(seed), 6)
  h = jax.random.normal(ks[0], (m, d_in))
  a = jax.random.normal(ks[1], (s, e, d_in, r)) / np.sqrt(d_in)
  b = jax.random.normal(ks[2], (s, e, r, d_out))
  scale = jax.random.uniform(ks[3], (s,), minval=0.5, maxval=2.0)
  slot = jax.random.randint(ks[4], (m,), 0, s)
  expert = jax.random.randint(ks[5], (m,), 0, e)
  return h, a, b, scale, slot, expert


@pytest.mark.parametrize("impl", [
    "gather",  # the model's default; the others under `make test-moe`
    pytest.param("ragged", marks=pytest.mark.moe),
    pytest.param("onehot", marks=pytest.mark.moe)])
def test_op_matches_reference_values_and_grads(impl):
  h, a, b, scale, slot, expert = _op_inputs()
  want = expert_lora.reference(h, a, b, scale, slot, expert)
  got = expert_lora.expert_lora_delta(h, a, b, scale, slot, expert, impl=impl)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Each row really reads its own (slot, expert) pair, not a neighbour's.
  m = 7
  row = (h[m] @ a[slot[m], expert[m]] @ b[slot[m], expert[m]]) * scale[slot[m]]
  np.testing.assert_allclose(got[m], row, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda h, a, b: jnp.sum(jnp.sin(fn(h, a, b, scale, slot, expert)))
  g_want = jax.grad(loss(expert_lora.reference), argnums=(0, 1, 2))(h, a, b)
  g_got = jax.grad(loss(
      lambda *x: expert_lora.expert_lora_delta(*x, impl=impl)),
                   argnums=(0, 1, 2))(h, a, b)
  for gw, gg in zip(g_want, g_got):
    np.testing.assert_allclose(gg, gw, rtol=1e-4, atol=1e-5)
  # Pairs no row uses get exactly zero gradient (no leakage across tenants).
  used = np.zeros(a.shape[:2], bool)
  used[np.asarray(slot), np.asarray(expert)] = True
  assert np.all(np.asarray(g_got[1])[~used] == 0)


# ------------------------------------------------------- spec and the bank


def test_expert_targets_through_spec_bank_and_rank_mask():
  cfg = QWEN3_MOE
  assert target_shape(cfg, "experts_gate_up") == (3, 8, 32, 32)
  assert target_shape(cfg, "experts_down") == (3, 8, 16, 32)
  spec = BankSpec(targets=("experts_down", "q", "experts_gate_up"),
                  max_rank=4, num_slots=3)
  assert spec.targets == ("q", "experts_gate_up", "experts_down")
  shapes = bank_lib.bank_shapes(cfg, spec)
  assert shapes.lora_a["experts_gate_up"].shape == (3, 3, 8, 32, 4)
  assert shapes.lora_b["experts_down"].shape == (3, 3, 8, 4, 32)
  axes = bank_lib.bank_logical_axes(spec)
  assert axes.lora_a["experts_down"] == ("slot", "layers", "experts", "mlp",
                                         "lora_rank")
  w = AdapterWeights.random(cfg, spec.targets, 2, seed=1)
  bank = bank_lib.write_slot(bank_lib.init_bank(cfg, spec), 2, w, cfg, spec)
  back = bank_lib.read_slot(bank, 2)
  for t in spec.targets:
    np.testing.assert_array_equal(back.lora_a[t], w.lora_a[t])
    np.testing.assert_array_equal(back.lora_b[t], w.lora_b[t])
  mask = get_family("lora").rank_mask(bank)
  for t in spec.targets:
    ma = np.broadcast_to(mask["lora_a"][t], bank.lora_a[t].shape)
    mb = np.broadcast_to(mask["lora_b"][t], bank.lora_b[t].shape)
    assert ma[2, ..., :2].all() and not ma[2, ..., 2:].any()
    assert mb[2, ..., :2, :].all() and not mb[2, ..., 2:, :].any()
    assert not ma[1].any() and not mb[0].any()
  layer = bank.layer(1, rank=2)
  assert layer.lora_b["experts_down"].shape == (3, 8, 2, 32)


def test_bad_targets_are_refused_with_the_reason():
  with pytest.raises(AdapterError, match="unknown target projections"):
    BankSpec(targets=("q", "gate_up_proj"))
  with pytest.raises(AdapterError, match="has none"):
    target_shape(QWEN3_MOE, "shared_gate")  # Qwen3-MoE: no shared experts
  with pytest.raises(AdapterError, match="not a projection"):
    target_shape(DEEPSEEK, "k")  # MLA has no k projection
  dense = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32,
                      intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
  with pytest.raises(AdapterError, match="needs routed experts"):
    bank_lib.bank_shapes(dense, BankSpec(targets=("q", "experts_down")))
  with pytest.raises(AdapterError, match="'router' needs routed experts"):
    bank_lib.bank_shapes(dense, BankSpec(targets=("q", "router")))
  # The router is adapted only when asked: no default target set has it.
  assert "router" not in ALL_TARGETS
  assert target_shape(QWEN3_MOE, "router") == (3, 32, 8)


# --------------------------------------------------- the model, end to end


def _merged(params, cfg, w: AdapterWeights):
  """The base with adapter `w` merged into its weights (the oracle)."""
  p = jax.tree.map(np.array, params)
  moe_index = np.cumsum([cfg.is_moe_layer(i) for i in range(cfg.num_layers)])
  for t in w.targets:
    a, b = np.asarray(w.lora_a[t], np.float64), np.asarray(w.lora_b[t],
                                                           np.float64)
    delta = w.scale * a @ b  # [L, (E,) d_in, d_out]
    for layer in range(cfg.num_layers):
      j = moe_index[layer] - 1
      if t.startswith("experts_"):
        if not cfg.is_moe_layer(layer):
          continue
        if t == "experts_down":
          p["moe"]["down"][j] += delta[layer]
        else:
          f = cfg.moe_intermediate_size
          p["moe"]["gate"][j] += delta[layer][..., :f]
          p["moe"]["up"][j] += delta[layer][..., f:]
      elif t == "router":
        if cfg.is_moe_layer(layer):
          p["moe"]["router"][j] += delta[layer]
      elif t.startswith("shared_"):
        if cfg.is_moe_layer(layer):
          p["moe"][t][j] += delta[layer]
      elif t in ("gate", "up", "down") and cfg.num_moe_layers:
        if not cfg.is_moe_layer(layer):
          p["dense_mlp"][t][layer - moe_index[layer]] += delta[layer]
      else:
        p["layers"][t][layer] += delta[layer]
  return jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module", params=[QWEN3_MOE, DEEPSEEK],
                ids=["qwen3_moe", "deepseek_v3"])
def model(request):
  cfg = request.param
  params = llama.init_params(cfg, seed=3, std=0.1)
  spec = BankSpec(targets=TARGETS[cfg.architecture], max_rank=4,
                  num_slots=4)
  ws = {s: AdapterWeights.random(cfg, spec.targets, r, seed=10 + s,
                                 std=0.3, alpha=2.0 * r)
        for s, r in ((1, 4), (3, 2))}
  bank = bank_lib.bank_from_weights(cfg, spec, ws)
  return cfg, params, bank, ws


@pytest.mark.moe
def test_mixed_batch_equals_merged_weights_per_row(model):
  cfg, params, bank, ws = model
  tokens = jax.random.randint(jax.random.key(0), (4, 9), 0, cfg.vocab_size)
  idx = jnp.asarray([1, 0, 3, 1], jnp.int32)
  got = llama.jit_forward(params, bank, idx, tokens, config=cfg)
  base = llama.jit_forward(params, None, None, tokens, config=cfg)
  for row, slot in enumerate(np.asarray(idx)):
    ref = base if slot == 0 else llama.jit_forward(
        _merged(params, cfg, ws[int(slot)]), None, None, tokens, config=cfg)
    np.testing.assert_allclose(got[row], ref[row], rtol=2e-4, atol=2e-4,
                               err_msg=f"row {row} slot {slot}")
  # The adapters matter (a no-op expert path would pass the rest).
  assert float(jnp.max(jnp.abs(got[0] - base[0]))) > 1e-2


@pytest.mark.moe
def test_expert_factors_train_only_where_routed(model):
  cfg, params, bank, _ = model
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
  idx = jnp.asarray([1, 1], jnp.int32)

  def loss(lora_a):
    logits = llama.forward(params, bank.replace(lora_a=lora_a), idx, tokens,
                           config=cfg)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  g = jax.grad(loss)(bank.lora_a)
  for t in ("experts_gate_up", "experts_down"):
    gt = np.asarray(g[t])  # [S, L, E, d_in, R]
    assert np.all(gt[[0, 2, 3]] == 0), t  # slots absent from the batch
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    dense_layers = [i for i in range(cfg.num_layers)
                    if not cfg.is_moe_layer(i)]
    assert np.all(gt[1][dense_layers] == 0), t
    hit = np.abs(gt[1][moe_layers]).sum(axis=(-1, -2)) > 0  # [Lm, E]
    assert hit.any() and not hit.all() or cfg.num_experts_per_tok * 12 >= (
        cfg.num_experts), t
