"""The MoE building blocks against their oracles: routing, grouped experts.

Both grouped matmuls (`ragged_dot`, and the single-expert tiles CPU uses)
are checked; tests that do not name one use 'auto' (tiled on CPU).

`route` is checked against a numpy transcription of transformers' routers
(softmax top-k; DeepSeek's sigmoid + correction bias + group-limited top-k
+ routed scaling), `experts_ffn` (sort + ragged_dot) against the dense
every-expert oracle, forward and gradients, and for "no token dropping": a
token's output does not depend on how many other tokens chose its expert.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mintjax.config import ModelConfig
from mintjax.model import moe

E, D, F = 8, 16, 12


def _config(**kw):
  base = dict(architecture="qwen3_moe", vocab_size=32, hidden_size=D,
              intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
              head_dim=8, num_experts=E, num_experts_per_tok=2,
              moe_intermediate_size=F, moe_layers=(0,))
  base.update(kw)
  return ModelConfig(**base)


def _experts(seed=0):
  rng = np.random.default_rng(seed)
  return {"gate": jnp.asarray(rng.normal(0, 0.3, (E, D, F)), jnp.float32),
          "up": jnp.asarray(rng.normal(0, 0.3, (E, D, F)), jnp.float32),
          "down": jnp.asarray(rng.normal(0, 0.3, (E, F, D)), jnp.float32)}


def _np_deepseek_route(logits, bias, *, k, n_group, topk_group, norm, scale):
  """transformers' DeepseekV3TopkRouter, in numpy."""
  scores = 1 / (1 + np.exp(-logits))
  choice = scores + bias
  t = logits.shape[0]
  grouped = choice.reshape(t, n_group, -1)
  group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
  top_groups = np.argsort(-group_scores, axis=-1)[:, :topk_group]
  mask = np.zeros((t, n_group), bool)
  np.put_along_axis(mask, top_groups, True, axis=1)
  choice = np.where(np.repeat(mask, E // n_group, axis=1), choice, -np.inf)
  ids = np.argsort(-choice, axis=-1)[:, :k]
  w = np.take_along_axis(scores, ids, axis=-1)
  if norm:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return w * scale, ids


def test_softmax_top_k_and_norm_topk_prob():
  logits = np.random.default_rng(1).normal(0, 2, (10, E)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ids = np.argsort(-probs, axis=-1)[:, :2]
  w = np.take_along_axis(probs, ids, axis=-1)
  for norm in (False, True):
    got_w, got_ids, stats = moe.route(jnp.asarray(logits),
                                      config=_config(norm_topk_prob=norm))
    want = w / w.sum(-1, keepdims=True) if norm else w
    np.testing.assert_array_equal(np.asarray(got_ids), ids)
    np.testing.assert_allclose(np.asarray(got_w), want, rtol=1e-6)
  counts = np.bincount(ids.reshape(-1), minlength=E)
  np.testing.assert_array_equal(np.asarray(stats["tokens_e"]), counts)
  np.testing.assert_allclose(np.asarray(stats["load_e"]), counts / 20)
  np.testing.assert_allclose(np.asarray(stats["prob_e"]), probs.mean(0),
                             rtol=1e-5)


def test_deepseek_group_limited_sigmoid_routing():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (32, E)).astype(np.float32)
  bias = rng.normal(0, 1, (E,)).astype(np.float32)
  cfg = _config(architecture="deepseek_v3", router_scoring="sigmoid",
                num_experts_per_tok=3, n_group=4, topk_group=2,
                norm_topk_prob=True, routed_scaling_factor=2.5)
  w, ids, _ = moe.route(jnp.asarray(logits), jnp.asarray(bias), config=cfg)
  want_w, want_ids = _np_deepseek_route(logits, bias, k=3, n_group=4,
                                        topk_group=2, norm=True, scale=2.5)
  np.testing.assert_array_equal(np.sort(np.asarray(ids), -1),
                                np.sort(want_ids, -1))
  order = lambda i: np.argsort(i, axis=-1)
  np.testing.assert_allclose(
      np.take_along_axis(np.asarray(w), order(np.asarray(ids)), -1),
      np.take_along_axis(want_w, order(want_ids), -1), rtol=1e-5)
  # Every choice lies in one of the token's two best groups.
  groups = np.asarray(ids) // (E // 4)
  assert (np.array([len(set(g)) for g in groups]) <= 2).all()
  # The bias steers the choice: without it some tokens pick other experts.
  _, ids0, _ = moe.route(jnp.asarray(logits), None, config=cfg)
  assert (np.sort(np.asarray(ids0), -1) != np.sort(want_ids, -1)).any()


def test_stats_ignore_padding():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(6, E)),
                       jnp.float32)
  valid = jnp.asarray([1, 1, 1, 0, 0, 0], bool)
  _, ids, stats = moe.route(logits, config=_config(), valid_t=valid)
  counts = np.bincount(np.asarray(ids)[:3].reshape(-1), minlength=E)
  np.testing.assert_array_equal(np.asarray(stats["tokens_e"]), counts)
  assert float(np.asarray(stats["load_e"]).sum()) == pytest.approx(1.0)


def _routing(t, seed, k=2):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(E)[:k] for _ in range(t)]).astype(np.int32)
  ids[:3] = [0, 1][:k]  # expert 0 and 1 get several tokens,
  ids[ids == 7] = 6     # expert 7 none at all (an empty group)
  ids = np.stack([np.unique(r) if len(np.unique(r)) == k else
                  np.array([0, 1][:k], np.int32) for r in ids])
  w = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(w)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_experts_ffn_matches_dense_oracle_and_gradients(impl):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(13, D)), jnp.float32)
  ids, w = _routing(13, 5)
  params = _experts()
  ffn = functools.partial(moe.experts_ffn, impl=impl)
  got = ffn(x, params, ids, w)
  want = moe.experts_ffn_reference(x, params, ids, w)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

  def loss(fn, x, params, w):
    return jnp.sum(jnp.sin(fn(x, params, ids, w)))

  g = jax.grad(lambda *a: loss(ffn, *a), argnums=(0, 1, 2))(
      x, params, w)
  g_ref = jax.grad(lambda *a: loss(moe.experts_ffn_reference, *a),
                   argnums=(0, 1, 2))(x, params, w)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert float(jnp.abs(g[1]["gate"][7]).max()) == 0.0  # unused expert


def test_no_token_dropping():
  """A token's output is the same alone and in a batch where every other
  token piles onto its expert (no capacity limit drops it)."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(64, D)), jnp.float32)
  params = _experts(1)
  ids = jnp.zeros((64, 2), jnp.int32).at[:, 1].set(3)
  w = jnp.full((64, 2), 0.5, jnp.float32)
  crowded = moe.experts_ffn(x, params, ids, w)
  alone = moe.experts_ffn(x[-1:], params, ids[-1:], w[-1:])
  np.testing.assert_allclose(np.asarray(crowded[-1]), np.asarray(alone[0]),
                             atol=1e-6)
  assert float(jnp.abs(crowded).min(axis=1).max()) > 0  # every row computed


def test_adapter_hook_sees_sorted_rows():
  """The expert-LoRA hook gets rows sorted by expert with their ids; a delta
  equal to the base matmul of the same weights doubles that projection."""
  x = jnp.asarray(np.random.default_rng(7).normal(size=(9, D)), jnp.float32)
  ids, w = _routing(9, 8)
  params = _experts(2)
  seen = {}

  def adapter(name, h_md, *, expert_m, token_m, group_sizes_e):
    seen[name] = (np.asarray(expert_m), np.asarray(group_sizes_e))
    if name != "up":
      return None
    return jnp.einsum("md,mdf->mf", h_md, params["up"][expert_m])

  got = moe.experts_ffn(x, params, ids, w, adapter=adapter)
  doubled = dict(params, up=2 * params["up"])
  want = moe.experts_ffn_reference(x, doubled, ids, w)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  expert_m, sizes = seen["down"]
  assert (np.diff(expert_m) >= 0).all()
  np.testing.assert_array_equal(sizes, np.bincount(np.asarray(ids).ravel(),
                                                   minlength=E))


def test_experts_ffn_and_its_gradient_lower_for_cuda():
  """The grouped matmuls lower for a GPU target without a GPU (ragged_dot
  stays a ragged dot in StableHLO; XLA:GPU picks its kernel at compile)."""
  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  params = {"gate": s(E, D, F), "up": s(E, D, F), "down": s(E, F, D)}
  args = (s(32, D), params, s(32, 2, dt=jnp.int32), s(32, 2, dt=jnp.float32))

  # 'auto' decides by the process's backend (CPU here); name the GPU form.
  ffn = functools.partial(moe.experts_ffn, impl="ragged_dot")

  def loss(x, params, ids, w):
    return jnp.sum(ffn(x, params, ids, w).astype(jnp.float32))

  for fn in (ffn, jax.grad(loss, argnums=(0, 1))):
    text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    assert "ragged_dot" in text
