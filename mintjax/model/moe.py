"""Mixture-of-experts feed-forward: routing, grouped expert matmuls, stats.

Owns the MoE block of Qwen3-MoE, Mixtral and DeepSeek-V3/Kimi-K2 as pure
functions:

- `route`: router logits -> (weights, expert ids, stats). Softmax top-k
  (Qwen3-MoE with optional `norm_topk_prob`; Mixtral top-2, always
  renormalised) or DeepSeek's sigmoid scores, where `e_score_correction_bias`
  steers the *choice* only, experts are chosen within the `topk_group` best
  of `n_group` groups, and the weights are renormalised and multiplied by
  `routed_scaling_factor`.
- `experts_ffn`: every token's k (token, expert) pairs sorted by expert and
  run as three grouped matmuls (SwiGLU): `jax.lax.ragged_dot` on GPU (and
  TPU unless the Pallas kernel is used), whole single-expert tiles on CPU,
  where XLA runs ragged_dot as every group over every row. Nothing is
  dropped: there is no capacity factor, every pair is computed, so results
  do not depend on what else is in the batch.
- `moe_block`: router + routed experts + DeepSeek's shared experts.

The router statistics (`stats`) report the load per expert: how many of the
T*k assignments each expert received (`tokens_e`), that count as a fraction
(`load_e`), and the mean router probability (`prob_e`); their product summed
over experts is the Switch-style auxiliary balance loss (`aux_loss`).

Expert-parallel execution (an `expert` mesh axis, `shard_map`) keeps
`experts_ffn`'s call signature and lives in `mintjax.model.expert_parallel`;
`moe_block` takes it as `experts_fn`.

Shapes: T tokens, D hidden, E experts, k experts per token, F expert width,
M = T * k routed pairs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mintjax.config import ModelConfig

# adapter(name, h_md, *, expert_m, token_m, group_sizes_e) -> [M, d_out] delta
# added to the grouped matmul `name` ('gate', 'up' or 'down') of the rows
# sorted by expert, or None for no delta. Per-tenant expert LoRA plugs in here.
ExpertAdapter = Callable[..., jax.Array | None]


def route(router_logits_te, router_bias_e=None, *, config: ModelConfig,
          valid_t=None):
  """Chooses k experts per token and their weights.

  Args:
    router_logits_te: [T, E] router logits (any float dtype; computed in f32).
    router_bias_e: [E] DeepSeek's `e_score_correction_bias` (sigmoid router
      only; it changes which experts are chosen, not their weights).
    config: model config (router_scoring, num_experts_per_tok,
      norm_topk_prob, n_group, topk_group, routed_scaling_factor).
    valid_t: optional [T] bool; tokens that count in the stats (padding
      does not). Routing itself is per token and ignores it.

  Returns:
    weights_tk: [T, k] float32 routing weights.
    expert_ids_tk: [T, k] int32 expert ids.
    stats: dict of tokens_e int32[E], load_e f32[E], prob_e f32[E] and
      aux_loss f32[] (see the module docstring).
  """
  c = config
  k, e = c.num_experts_per_tok, router_logits_te.shape[-1]
  logits = router_logits_te.astype(jnp.float32)
  if c.router_scoring == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    eps = 0.0
  else:
    probs = jax.nn.sigmoid(logits)
    choice = probs if router_bias_e is None else (
        probs + router_bias_e.astype(jnp.float32))
    if c.n_group > 1:
      choice = _limit_to_groups(choice, c.n_group, c.topk_group)
    _, ids = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    eps = 1e-20  # transformers' DeepSeek denominator guard
  if c.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + eps)
  weights = weights * c.routed_scaling_factor
  ids = ids.astype(jnp.int32)
  return weights, ids, _stats(ids, probs, e, valid_t)


def _limit_to_groups(choice_te, n_group: int, topk_group: int):
  """Masks experts outside each token's `topk_group` best groups to -inf.

  A group's score is the sum of its two best experts' choice scores
  (DeepSeek-V3's `noaux_tc`).
  """
  t, e = choice_te.shape
  grouped = choice_te.reshape(t, n_group, e // n_group)
  best = jax.lax.top_k(grouped, min(2, e // n_group))[0]
  _, top_groups = jax.lax.top_k(jnp.sum(best, axis=-1), topk_group)
  keep_tg = jnp.any(
      jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_), axis=1)
  keep_te = jnp.repeat(keep_tg, e // n_group, axis=1)
  return jnp.where(keep_te, choice_te, -jnp.inf)


def _stats(ids_tk, probs_te, num_experts: int, valid_t):
  t, k = ids_tk.shape
  valid = (jnp.ones((t,), jnp.float32) if valid_t is None
           else valid_t.astype(jnp.float32))
  hits_te = jnp.sum(jax.nn.one_hot(ids_tk, num_experts, dtype=jnp.float32),
                    axis=1) * valid[:, None]
  tokens = jnp.sum(hits_te, axis=0)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  load = tokens / (n * k)
  prob = jnp.sum(probs_te * valid[:, None], axis=0) / n
  return {"tokens_e": tokens.astype(jnp.int32), "load_e": load,
          "prob_e": prob, "aux_loss": num_experts * jnp.sum(load * prob)}


def empty_stats(num_experts: int) -> dict:
  """Stats of a layer without experts (zeros; same tree as `route`'s)."""
  z = jnp.zeros((num_experts,), jnp.float32)
  return {"tokens_e": jnp.zeros((num_experts,), jnp.int32), "load_e": z,
          "prob_e": z, "aux_loss": jnp.zeros((), jnp.float32)}


GROUPED_IMPLS = ("auto", "ragged_dot", "tiled")


def grouped_matmul(h_md, w_edf, group_sizes_e, expert_m, *, impl="auto"):
  """Rows sorted by expert times their expert's weights: [M, F] float32.

  Args:
    h_md: [M, D] rows sorted by expert (group e is the group_sizes[e] rows
      after groups 0..e-1).
    w_edf: [E, D, F] weights.
    group_sizes_e: [E] int32 rows per expert (sum == M).
    expert_m: [M] int32 expert of each row (sorted).
    impl: 'ragged_dot' (`jax.lax.ragged_dot`), 'tiled' (`_tiled_matmul`) or
      'auto': tiled on CPU, ragged_dot elsewhere. XLA:CPU runs ragged_dot as
      every group over all M rows (E times the work; tools/bench_moe.py
      measures it), so CPU takes the tiled form.
  """
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(h_md, w_edf, group_sizes_e,
                              preferred_element_type=jnp.float32)
  if impl == "tiled":
    return _tiled_matmul(h_md, w_edf, group_sizes_e, expert_m)
  raise ValueError(f"grouped matmul impl {impl!r}; expected one of "
                   f"{GROUPED_IMPLS}")


def _tiled_matmul(h_md, w_edf, group_sizes_e, expert_m):
  """Grouped matmul as whole tiles of one expert each (megablox's layout).

  Each group is padded to a multiple of `tm` rows, so every tile of `tm`
  rows belongs to one expert; a batched matmul runs each tile against its
  expert's weights. Static bound: ceil(M / tm) + E tiles. tm is about M / E
  (at least 8), so the padding and the gathered weights stay within about
  twice the useful rows and weights.
  """
  m, d = h_md.shape
  e = w_edf.shape[0]
  tm = max(8, 1 << max(0, (-(-m // e) - 1).bit_length()))
  n_tiles = -(-m // tm) + e
  tiles_e = (group_sizes_e + tm - 1) // tm
  tile_end_e = jnp.cumsum(tiles_e)
  row_start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
  pos_m = ((tile_end_e - tiles_e)[expert_m] * tm + jnp.arange(m)
           - row_start_e[expert_m])
  padded = jnp.zeros((n_tiles * tm, d), h_md.dtype).at[pos_m].set(
      h_md, unique_indices=True)
  # Tiles past the last group hold zeros; they borrow expert E-1's weights.
  tile_expert = jnp.minimum(
      jnp.searchsorted(tile_end_e, jnp.arange(n_tiles), side="right"), e - 1)
  out = jnp.einsum("ntd,ndf->ntf", padded.reshape(n_tiles, tm, d),
                   w_edf[tile_expert], preferred_element_type=jnp.float32)
  return out.reshape(n_tiles * tm, -1)[pos_m]


def experts_ffn(x_td, expert_params: dict, expert_ids_tk, weights_tk, *,
                adapter: ExpertAdapter | None = None, impl: str = "auto"):
  """Runs each token through its k experts with grouped matmuls.

  Args:
    x_td: [T, D] inputs.
    expert_params: {'gate': [E, D, F], 'up': [E, D, F], 'down': [E, F, D]}.
    expert_ids_tk: [T, k] int32 expert per (token, choice).
    weights_tk: [T, k] routing weights.
    adapter: optional `ExpertAdapter` (per-tenant expert LoRA).
    impl: grouped matmul implementation (`grouped_matmul`).

  Returns:
    [T, D] in x's dtype: sum_k weights[t, k] * expert_{ids[t, k]}(x[t]).
  """
  t, d = x_td.shape
  k = expert_ids_tk.shape[1]
  e = expert_params["gate"].shape[0]
  flat_m = expert_ids_tk.reshape(-1)
  # Stable sort keeps each expert's rows in token order (deterministic).
  order_m = jnp.argsort(flat_m, stable=True)
  expert_m = flat_m[order_m]
  token_m = order_m // k
  group_sizes_e = jnp.bincount(flat_m, length=e).astype(jnp.int32)
  x_md = jnp.take(x_td, token_m, axis=0)

  def grouped(name, h_m):
    w = expert_params[name].astype(h_m.dtype)
    out = grouped_matmul(h_m, w, group_sizes_e, expert_m, impl=impl)
    if adapter is not None:
      delta = adapter(name, h_m, expert_m=expert_m, token_m=token_m,
                      group_sizes_e=group_sizes_e)
      if delta is not None:
        out = out + delta.astype(jnp.float32)
    return out.astype(h_m.dtype)

  h_mf = jax.nn.silu(grouped("gate", x_md)) * grouped("up", x_md)
  y_md = grouped("down", h_mf)
  # Undo the sort with the inverse permutation (a gather, not a scatter-add:
  # cheaper to differentiate and deterministic), then weight and sum over k.
  inverse_m = jnp.zeros_like(order_m).at[order_m].set(
      jnp.arange(order_m.shape[0], dtype=order_m.dtype))
  y_tkd = jnp.take(y_md, inverse_m, axis=0).reshape(t, k, d)
  y_td = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32),
                    weights_tk.astype(jnp.float32))
  return y_td.astype(x_td.dtype)


def experts_ffn_reference(x_td, expert_params: dict, expert_ids_tk,
                          weights_tk):
  """Dense oracle of `experts_ffn`: every expert on every token, masked.

  O(T * E) work; for tests only.
  """
  e = expert_params["gate"].shape[0]
  xf = x_td.astype(jnp.float32)
  g = jnp.einsum("td,edf->tef", xf, expert_params["gate"].astype(jnp.float32))
  u = jnp.einsum("td,edf->tef", xf, expert_params["up"].astype(jnp.float32))
  y_ted = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u,
                     expert_params["down"].astype(jnp.float32))
  w_te = jnp.sum(jax.nn.one_hot(expert_ids_tk, e) *
                 weights_tk.astype(jnp.float32)[..., None], axis=1)
  return jnp.einsum("ted,te->td", y_ted, w_te).astype(x_td.dtype)


def moe_block(x_btd, mp: dict, *, config: ModelConfig, proj=None,
              adapter: ExpertAdapter | None = None,
              experts_fn=experts_ffn, adapt_router: bool = False):
  """One MoE feed-forward: router, routed experts, shared experts.

  Args:
    x_btd: [B, T, D] normed hidden states.
    mp: one layer's MoE params: router [D, E], router_bias [E] (sigmoid
      routers), gate/up [E, D, F], down [E, F, D], and with shared experts
      shared_gate/shared_up [D, Fs], shared_down [Fs, D].
    config: model config.
    proj: `proj(name, h)` used for the shared experts' projections (the
      decoder passes its LoRA-aware projection over `mp`, so adapters can
      target 'shared_gate', 'shared_up', 'shared_down'); default a plain
      matmul.
    adapter: optional per-tenant expert adapter (see `experts_ffn`).
    experts_fn: `experts_ffn` or a drop-in with its signature (the
      expert-parallel version).
    adapt_router: run the router through `proj('router', x)` in float32
      (a per-tenant router LoRA, only when a bank targets 'router').

  Returns:
    (y [B, T, D] in x's dtype, router stats of `route`).
  """
  b, t, d = x_btd.shape
  x_td = x_btd.reshape(b * t, d)
  # The router runs in float32 (DeepSeek casts; for f32 models a no-op).
  if adapt_router:
    logits = proj("router", x_btd.astype(jnp.float32)).reshape(b * t, -1)
  else:
    logits = jnp.dot(x_td.astype(jnp.float32),
                     mp["router"].astype(jnp.float32))
  weights, ids, stats = route(logits, mp.get("router_bias"), config=config)
  experts = {n: mp[n] for n in ("gate", "up", "down")}
  y_td = experts_fn(x_td, experts, ids, weights, adapter=adapter)
  y_btd = y_td.reshape(b, t, d)
  if config.n_shared_experts:
    if proj is None:
      proj = lambda name, h: jnp.dot(h, mp[name].astype(h.dtype))
    gated = jax.nn.silu(proj("shared_gate", x_btd)) * proj("shared_up", x_btd)
    y_btd = y_btd + proj("shared_down", gated)
  return y_btd, stats
