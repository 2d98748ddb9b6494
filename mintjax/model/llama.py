"""The decoder (Llama 2/3, Mistral, Qwen2, Qwen3, MoE families) as pure functions.

Owns the base parameter tree, its logical axis names, random init, and
`forward`: a pure function of (base params, adapter bank, adapter_idx,
tokens, positions, cache). Layers are stacked on a leading axis and run
under `jax.lax.scan`, so compile time does not grow with depth.

Parameter tree (D hidden, F ffn, V vocab, L layers, H/K query/kv heads):

  embed            [V, D]
  layers/attn_norm [L, D]        layers/mlp_norm [L, D]
  layers/q [L, D, H*hd]  k, v [L, D, K*hd]  o [L, H*hd, D]
  layers/q_bias [L, H*hd]  k_bias, v_bias [L, K*hd]   (attention_bias only)
  layers/gate, up [L, D, F]      layers/down [L, F, D]
  final_norm       [D]
  lm_head          [D, V]        (absent with tied embeddings)

Qwen3 adds layers/q_norm, k_norm [L, hd]. Multi-head latent attention
(DeepSeek-V3, Kimi-K2) replaces q/k/v with the MLA projections of
`mintjax.model.mla`. Mixture-of-experts models (`mintjax.model.moe`) keep
attention and norms in `layers` and put the feed-forward of their
Lm MoE layers in `moe` (router [Lm, D, E], router_bias [Lm, E] for sigmoid
routers, gate/up [Lm, E, D, Fe], down [Lm, E, Fe, D], shared_gate/shared_up
[Lm, D, Fs], shared_down [Lm, Fs, D] with shared experts); their Ld dense
layers' gate/up/down go to `dense_mlp` [Ld, ...] (a model whose layers are
all dense keeps them in `layers`, as above). The scan runs over all L layers
and picks a layer's feed-forward with `lax.cond` only when both kinds occur.

Kernels are `x @ W` layout, i.e. the transpose of Hugging Face's [out, in].

Input checks. Inside jit, out-of-range indices are not errors: a gather
clamps them, so adapter index 7 of a 3-slot bank (or -1) would silently
read slot 2, another tenant's adapter, and a token id >= vocab gives NaN
logits. `forward` and `jit_forward` therefore refuse such values whenever
they are concrete arrays (`check_inputs`); when they are traced (inside a
caller's jit) the caller must validate them first, as the Engine (request
prompts, residency slots) and the training data pipeline do.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import amx
from cpu_kernels import attention as cpu_attention
from mintjax import sharding
from mintjax.adapters import expert_lora
from mintjax.adapters.bank import AdapterBank, activation_axes
from mintjax.adapters.lora_op import lora_project
from mintjax.adapters.slot_dense import SlotDenseLayer
from mintjax.config import ModelConfig
from mintjax.model import expert_parallel, fused, mla, moe, quant
from mintjax.model.kv_cache import KVCache
from mintjax.model.layers import apply_rope, attention, rms_norm, rope_cos_sin


def param_shapes(config: ModelConfig) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct` leaves (with
  `quant.Int8Weight` nodes where `config.weight_format` is 'int8')."""
  dt = jnp.dtype(config.dtype)
  shapes = _shapes_and_axes(config)
  shapes = jax.tree.map(lambda sa: jax.ShapeDtypeStruct(sa[0], dt), shapes,
                        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                        and isinstance(x[0], tuple))
  if config.weight_format == "int8":
    return quant.abstract_params(shapes)
  return shapes


def param_logical_axes(config: ModelConfig) -> dict:
  """Logical axis names for every parameter (same tree as the params)."""
  axes = jax.tree.map(lambda sa: sa[1], _shapes_and_axes(config),
                      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                      and isinstance(x[0], tuple))
  if config.weight_format == "int8":
    return quant.logical_axes(axes, param_shapes(config))
  return axes


def _shapes_and_axes(config: ModelConfig) -> dict:
  """The parameter tree with (shape, logical axes) leaves."""
  c = config
  L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
  layers = {"attn_norm": ((L, D), ("layers", "norm")),
            "mlp_norm": ((L, D), ("layers", "norm"))}
  if c.uses_mla:
    layers.update(_mla_shapes_and_axes(c))
  else:
    layers.update(
        q=((L, D, c.q_dim), ("layers", "embed", "q_heads")),
        k=((L, D, c.kv_dim), ("layers", "embed", "kv_heads")),
        v=((L, D, c.kv_dim), ("layers", "embed", "kv_heads")),
        o=((L, c.q_dim, D), ("layers", "q_heads", "embed")))
  if c.attention_bias:
    layers.update(q_bias=((L, c.q_dim), ("layers", "q_heads")),
                  k_bias=((L, c.kv_dim), ("layers", "kv_heads")),
                  v_bias=((L, c.kv_dim), ("layers", "kv_heads")))
  if c.qk_norm:
    layers.update(q_norm=((L, c.head_dim), ("layers", "norm")),
                  k_norm=((L, c.head_dim), ("layers", "norm")))

  def swiglu(n, f, prefix=""):
    return {prefix + "gate": ((n, D, f), ("layers", "embed", "mlp")),
            prefix + "up": ((n, D, f), ("layers", "embed", "mlp")),
            prefix + "down": ((n, f, D), ("layers", "mlp", "embed"))}

  params = {"embed": ((c.vocab_size, D), ("vocab", "embed")),
            "layers": layers, "final_norm": ((D,), ("norm",))}
  if not c.num_moe_layers:
    layers.update(swiglu(L, F))
  else:
    if c.num_dense_layers:
      params["dense_mlp"] = swiglu(c.num_dense_layers, F)
    n, e, fe = c.num_moe_layers, c.num_experts, c.moe_intermediate_size
    moe_p = {
        "router": ((n, D, e), ("layers", "embed", None)),
        "gate": ((n, e, D, fe), ("layers", "experts", "embed", "mlp")),
        "up": ((n, e, D, fe), ("layers", "experts", "embed", "mlp")),
        "down": ((n, e, fe, D), ("layers", "experts", "mlp", "embed")),
    }
    if c.router_scoring == "sigmoid":
      moe_p["router_bias"] = ((n, e), ("layers", None))
    if c.n_shared_experts:
      moe_p.update(swiglu(n, c.shared_expert_size, "shared_"))
    params["moe"] = moe_p
  if not c.tie_word_embeddings:
    params["lm_head"] = ((D, c.vocab_size), ("embed", "vocab"))
  return params


def _mla_shapes_and_axes(c: ModelConfig) -> dict:
  L, D = c.num_layers, c.hidden_size
  out = {}
  for name in c.projection_names():
    if name in ("gate", "up", "down"):
      continue
    d_in, d_out = c.projection_shape(name)
    in_ax = "q_heads" if name == "o" else (
        "latent" if name in ("q_b", "kv_b") else "embed")
    out_ax = "embed" if name == "o" else (
        "q_heads" if name in ("q", "q_b", "kv_b") else "latent")
    out[name] = ((L, d_in, d_out), ("layers", in_ax, out_ax))
  if c.q_lora_rank:
    out["q_a_norm"] = ((L, c.q_lora_rank), ("layers", "norm"))
  out["kv_a_norm"] = ((L, c.kv_lora_rank), ("layers", "norm"))
  return out


def init_params(config: ModelConfig, seed: int = 0, std: float = 0.02
                ) -> dict:
  """Random parameters (normal(0, std) kernels, unit norms, zero biases)."""
  if config.weight_format == "int8":
    return quant.quantize_params(init_params(
        config.replace(weight_format="float"), seed, std))
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, s in leaves:
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      arr = np.ones(s.shape, np.float32)
    elif "bias" in name:
      arr = rng.normal(0, std, s.shape).astype(np.float32)
    else:
      arr = rng.normal(0, std, s.shape).astype(np.float32)
    out.append(jnp.asarray(arr, s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


class _StepInputs(NamedTuple):
  """What every layer of one forward call reads (the same for all layers).

  adapter_idx_b: [B] bank slot per row.
  cos, sin: [B, T, head_dim] RoPE tables of the query positions.
  q_pos_bt: [B, T] query positions.
  k_pos_bs: [B, S] key positions (the cache's, or the queries').
  write_start_b: [B] cache row where this call's keys are written.
  segments: (q_segment_bt, k_segment_bs), each optional.
  """
  adapter_idx_b: jax.Array
  cos: jax.Array
  sin: jax.Array
  q_pos_bt: jax.Array
  k_pos_bs: jax.Array
  write_start_b: jax.Array
  segments: tuple


def _layer(x_btd, lp, lb, cache_kv, step: _StepInputs, *,
           config: ModelConfig, lora_impl: str, mlp=None):
  """One decoder block. Returns (x, (k_layer, v_layer) or None, stats).

  `mlp` is None for a dense block (gate/up/down in `lp`); otherwise
  `mlp(h_btd, proj_over) -> (y_btd, router stats)` (see `_mlp_fn`).
  """
  c = config
  adapter_idx_b, cos, sin = step.adapter_idx_b, step.cos, step.sin
  q_pos_bt, k_pos_bs = step.q_pos_bt, step.k_pos_bs
  write_start_b, segments = step.write_start_b, step.segments
  b, t, _ = x_btd.shape

  def proj_over(weights):
    def proj(name, h):
      if isinstance(lb, SlotDenseLayer):  # the slot-dense view (engine, CPU)
        return lora_project(h, weights[name], weights.get(name + "_bias"),
                            delta=lb.deltas(h, (name,), adapter_idx_b)[0])
      if lb is None or name not in lb.lora_a:
        return lora_project(h, weights[name], weights.get(name + "_bias"))
      # The true rank rides along so kernels skip padded rank; the axes
      # place a kernel's shards like this projection's activations.
      return lora_project(h, weights[name], weights.get(name + "_bias"),
                          lb.lora(name), adapter_idx_b, lora_impl,
                          axes=activation_axes(name))
    return proj

  proj = proj_over(lp)
  h = rms_norm(x_btd, lp["attn_norm"], c.rms_norm_eps)
  if c.uses_mla:
    attn, new_kv = mla.mla_attention(
        h, lp, cache_kv, step, config=c, proj=proj,
        kv_b_adapted=lb is not None and "kv_b" in lb.lora_a)
    return _layer_tail(x_btd, attn, lp, proj, proj_over, config=c, mlp=mlp,
                       new_kv=new_kv)
  if mlp is None and "gate_up" in lp:  # the fused serving layout
    mlp = functools.partial(_fused_ffn, lp=lp, lb=lb,
                            adapter_idx_b=adapter_idx_b, lora_impl=lora_impl)
  if "qkv" in lp:  # the fused serving layout (`mintjax.model.fused`)
    q, k, v = fused.qkv(h, lp, lb, adapter_idx_b, config=c,
                        lora_impl=lora_impl)
  else:
    q = proj("q", h).reshape(b, t, c.num_heads, c.head_dim)
    k = proj("k", h).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = proj("v", h).reshape(b, t, c.num_kv_heads, c.head_dim)
  if c.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
    q = rms_norm(q, lp["q_norm"], c.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], c.rms_norm_eps)
  q = apply_rope(q, cos, sin)
  k = apply_rope(k, cos, sin)
  new_kv = None
  if cache_kv is not None:
    k_cache, v_cache = cache_kv  # [B, S, K, hd]
    write = jax.vmap(
        lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), start, axis=0))
    k_all = write(k_cache, k, write_start_b)
    v_all = write(v_cache, v, write_start_b)
    new_kv = (k_all, v_all)
    k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
  q_seg, k_seg = segments
  if (t == 1 and q_seg is None and q.dtype == jnp.bfloat16
      and isinstance(lp.get("qkv", lp.get("q")), amx.PackedKernel)
      and cpu_attention.supports(c.num_heads, c.num_kv_heads, c.head_dim)):
    # The per-layer AMX layout (Engine, bf16 on CPU): the native decode
    # attention, which XLA:CPU's multiply-reduce ran ~10x slower.
    attn = cpu_attention.decode_attention(q, k, v, q_pos_bt, k_pos_bs)
  else:
    attn = attention(q, k, v, q_pos_bt, k_pos_bs, q_segment_bt=q_seg,
                     k_segment_bs=k_seg)
  return _layer_tail(x_btd, attn, lp, proj, proj_over, config=c, mlp=mlp,
                     new_kv=new_kv)


def _layer_tail(x_btd, attn, lp, proj, proj_over, *, config: ModelConfig,
                mlp, new_kv):
  """Output projection and feed-forward (dense, or `mlp` for MoE models)."""
  c = config
  attn = sharding.constrain(attn, ("batch", "length", "q_heads"))
  x_btd = x_btd + proj("o", attn)
  h = rms_norm(x_btd, lp["mlp_norm"], c.rms_norm_eps)
  if mlp is None:
    gated = jax.nn.silu(proj("gate", h)) * proj("up", h)
    gated = sharding.constrain(gated, ("batch", "length", "mlp"))
    y, stats = proj("down", gated), None
  else:
    y, stats = mlp(h, proj_over)
  x_btd = x_btd + y
  x_btd = sharding.constrain(x_btd, ("batch", "length", "embed_act"))
  return x_btd, new_kv, stats


def _fused_ffn(h_btd, proj_over, *, lp, lb, adapter_idx_b, lora_impl):
  """SwiGLU of a dense layer in the fused layout (one gate_up matmul)."""
  gated = fused.gate_up(h_btd, lp, lb, adapter_idx_b, lora_impl=lora_impl)
  gated = sharding.constrain(gated, ("batch", "length", "mlp"))
  return proj_over(lp)("down", gated), None


def _dense_ffn(h_btd, weights, proj_over):
  """SwiGLU of a dense layer of an MoE model (weights from `dense_mlp`)."""
  proj = proj_over(weights)
  gated = jax.nn.silu(proj("gate", h_btd)) * proj("up", h_btd)
  gated = sharding.constrain(gated, ("batch", "length", "mlp"))
  return proj("down", gated)


def _experts_fn(adapter_rows=None):
  """Grouped experts: expert-parallel under mesh rules whose mesh has an
  `expert` axis (`sharding.make_mesh(expert=n)`), else `moe.experts_ffn`.
  `adapter_rows` ([T] slots) travel with the tokens there, for the expert
  LoRA hook."""
  active = sharding.active_mesh_rules()
  if active is not None and active[0].shape.get("expert", 1) > 1:
    return functools.partial(expert_parallel.experts_ffn_sharded,
                             mesh=active[0], adapter_rows=adapter_rows)
  return moe.experts_ffn


def _mlp_fn(params, layer_idx, *, config: ModelConfig, lb=None, slot_t=None):
  """The feed-forward of layer `layer_idx` of an MoE model, or None (dense).

  With a layer bank `lb` holding routed-expert targets, each routed row gets
  its (slot, expert) LoRA (`expert_lora.expert_hook`; slot_t [B*T] slots).

  Returns `mlp(h_btd, proj_over) -> (y_btd, stats)`. The layer's weights are
  read from the `moe`/`dense_mlp` stacks at its index within its kind; with
  both kinds present, `lax.cond` picks the kind at run time, so one scan
  covers every layer and no stack is sliced or copied.
  """
  c = config
  if not c.num_moe_layers:
    return None
  moe_index = np.cumsum([c.is_moe_layer(i) for i in range(c.num_layers)]) - 1
  dense_index = np.arange(c.num_layers) - moe_index - 1
  is_moe = jnp.asarray([c.is_moe_layer(i) for i in range(c.num_layers)])

  def at(tree, index):
    # An int8 base (mintjax.model.quant) is dequantized one layer at a time.
    return quant.dequantize(jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False),
        tree), c.dtype)

  def run_moe(h, proj_over):
    mp = at(params["moe"], jnp.asarray(moe_index, jnp.int32)[layer_idx])
    hook = expert_lora.expert_hook(lb, slot_t)
    return moe.moe_block(
        # router_bias steers the choice in `moe.route`; it is no bias of
        # the router's projection, so `proj` must not see it.
        h, mp, config=c, adapter=hook,
        proj=proj_over({k: v for k, v in mp.items() if k != "router_bias"}),
        experts_fn=_experts_fn(slot_t if hook is not None else None),
        adapt_router=lb is not None and "router" in lb.lora_a)

  def run_dense(h, proj_over):
    mp = at(params["dense_mlp"], jnp.asarray(dense_index,
                                             jnp.int32)[layer_idx])
    return _dense_ffn(h, mp, proj_over), moe.empty_stats(c.num_experts)

  if not c.num_dense_layers:
    return run_moe

  def mlp(h, proj_over):
    return jax.lax.cond(is_moe[layer_idx], lambda h: run_moe(h, proj_over),
                        lambda h: run_dense(h, proj_over), h)
  return mlp


def _write_new_rows(buf_lbs, layer_bs, layer_idx, start_b, *, t_new: int):
  """Writes this call's t_new new cache rows of one layer into the stack.

  buf_lbs: [L, B, S, ...] the cache stack (a loop carry, updated in place);
  layer_bs: [B, S, ...] the layer's cache with the new rows written at
  start_b. Writing back the whole layer instead copied its [B, S, ...]
  cache once more per layer and step (the decode HLO showed three full
  layer copies per k and v); only the [B, t_new, ...] rows are new.
  """
  if isinstance(buf_lbs, tuple):  # per-layer buffers: the layer is the new one
    return buf_lbs[:layer_idx] + (layer_bs,) + buf_lbs[layer_idx + 1:]
  b = layer_bs.shape[0]
  rows_b = jnp.arange(b)[:, None]
  pos_bt = start_b[:, None] + jnp.arange(t_new)[None, :]
  new_bt = layer_bs[rows_b, pos_bt]  # [B, t_new, ...]
  return buf_lbs.at[layer_idx, rows_b, pos_bt].set(new_bt.astype(buf_lbs.dtype))


def check_inputs(bank: AdapterBank | None, adapter_idx_b, tokens_bt, *,
                 config: ModelConfig) -> None:
  """Refuses out-of-range token ids and adapter slots (concrete arrays only).

  Args:
    bank: adapter bank with S slots, or None.
    adapter_idx_b: [B] slot per row; must be integers in [0, S).
    tokens_bt: [B, T] token ids; must be integers in [0, V).
    config: model config (V = vocab_size).

  Raises:
    ValueError: naming the bad values, the valid range and the fix.
  """
  def concrete(x):
    return x is not None and not isinstance(x, jax.core.Tracer)

  if concrete(tokens_bt):
    tok = np.asarray(tokens_bt)
    if not np.issubdtype(tok.dtype, np.integer):
      raise ValueError(
          f"tokens must be integer ids, got dtype {tok.dtype}; convert "
          "them with np.asarray(tokens, np.int32) (never truncate floats)")
    if tok.size and (tok.min() < 0 or tok.max() >= config.vocab_size):
      bad = tok[(tok < 0) | (tok >= config.vocab_size)]
      raise ValueError(
          f"token ids {bad[:3].tolist()} are outside the vocabulary "
          f"[0, {config.vocab_size}); tokenize with this model's tokenizer")
  if bank is not None and concrete(adapter_idx_b):
    idx = np.asarray(adapter_idx_b)
    if not np.issubdtype(idx.dtype, np.integer):
      raise ValueError(
          f"adapter_idx must be integer slots, got dtype {idx.dtype}")
    s = bank.num_slots
    if idx.size and (idx.min() < 0 or idx.max() >= s):
      bad = idx[(idx < 0) | (idx >= s)]
      raise ValueError(
          f"adapter_idx {bad[:3].tolist()} are outside the bank's slots "
          f"[0, {s}); an out-of-range slot would read another adapter, so "
          "load the adapter into a slot first (0 = base)")


def forward(params: dict, bank: AdapterBank | None, adapter_idx_b,
            tokens_bt, positions_bt=None, *, config: ModelConfig,
            cache: KVCache | None = None, segment_ids_bt=None,
            lora_impl: str = "auto", remat: bool = False,
            return_hidden: bool = False, return_router_stats: bool = False,
            lora_rank: int | None = None):
  """Runs the decoder on a batch where each row may use a different adapter.

  Args:
    params: base parameter tree (frozen; see the module docstring).
    bank: adapter bank or None for the plain base model.
    adapter_idx_b: [B] int32 slot per row (0 = base); ignored without bank.
    tokens_bt: [B, T] int32 token ids.
    positions_bt: [B, T] int32 positions; defaults to arange(T). Rows must
      be contiguous (position t+1 follows t).
    config: model config.
    cache: optional KV cache [L, B, S, K, hd]. Each row's new keys/values are
      written at its positions (starting at positions[:, 0]); attention then
      covers cache entries at positions <= the query's. Requires
      positions[:, 0] + T <= S.
    segment_ids_bt: optional packed-sequence ids (no cache).
    lora_impl: gather-LoRA implementation ('auto' picks per backend).
    remat: rematerialise each layer in the backward pass (training).
    return_hidden: also return the final normed hidden states.
    lora_rank: static rank width of the LoRA work (`AdapterBank.layer`);
      exact only when every row's slot has a true rank <= lora_rank. None
      uses the bank's max_rank.
    return_router_stats: also return the MoE router statistics of every
      layer (`moe.route`'s stats stacked on a leading [L] axis; zeros for
      dense layers; None for a model without experts).

  Returns:
    (logits [B, T, V] float32, updated cache or None), then the hidden
    states [B, T, D] with `return_hidden`, then the router stats with
    `return_router_stats`.

  Raises:
    ValueError: concrete token ids outside [0, V) or adapter slots outside
      the bank (see `check_inputs`; traced values are the caller's to check).
  """
  c = config
  check_inputs(bank, adapter_idx_b, tokens_bt, config=c)
  b, t = tokens_bt.shape
  if positions_bt is None:
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if bank is not None and adapter_idx_b is None:
    raise ValueError("adapter_idx is required when an adapter bank is given")
  dt = jnp.dtype(c.dtype)
  x = quant.take_rows(params["embed"], tokens_bt, dt)
  x = sharding.constrain(x, ("batch", "length", "embed_act"))
  cos, sin = rope_cos_sin(positions_bt, c)
  if cache is not None:
    if segment_ids_bt is not None:
      raise ValueError("segment_ids are not supported together with a cache")
    if cache.per_layer and not isinstance(params["layers"], (tuple, list)):
      raise ValueError(
          "a per-layer KV cache needs the per-layer weight layout "
          "(fused.serving_layout(per_layer=True)); init the cache stacked")
    k_pos_bs = jnp.broadcast_to(
        jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    segments = (None, None)
  else:
    k_pos_bs = positions_bt
    segments = (segment_ids_bt, segment_ids_bt)
  step = _StepInputs(adapter_idx_b, cos, sin, positions_bt, k_pos_bs,
                     positions_bt[:, 0], segments)
  slot_t = None if bank is None else jnp.repeat(adapter_idx_b, t)

  def body(carry, xs):
    x, kv = carry
    lp, layer_idx = xs
    lp = quant.dequantize(lp, dt)  # int8 base: only this layer goes float
    lb = bank.layer(layer_idx, lora_rank) if bank is not None else None
    layer_kv = None
    if kv is not None:
      layer_kv = (kv[0][layer_idx], kv[1][layer_idx])
    x, new_kv, stats = _layer(x, lp, lb, layer_kv, step, config=c,
                              lora_impl=lora_impl,
                              mlp=_mlp_fn(params, layer_idx, config=c, lb=lb,
                                          slot_t=slot_t))
    if kv is not None:
      kv = tuple(_write_new_rows(buf, new, layer_idx, step.write_start_b,
                                 t_new=t) for buf, new in zip(kv, new_kv))
    return (x, kv), stats

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  kv0 = (cache.k, cache.v) if cache is not None else None
  if isinstance(params["layers"], (tuple, list)):
    (x, kv), stats = _unrolled(body, (x, kv0), params["layers"])
  else:
    (x, kv), stats = jax.lax.scan(
        body, (x, kv0), (params["layers"], jnp.arange(c.num_layers)))
  hidden = rms_norm(x, params["final_norm"], c.rms_norm_eps)
  logits = lm_head(params, hidden, config=c)
  new_cache = KVCache(*kv) if cache is not None else None
  out = (logits, new_cache)
  if return_hidden:
    out += (hidden,)
  if return_router_stats:
    out += (stats,)
  return out


def _unrolled(body, carry, layers):
  """`lax.scan(body, carry, (layers, arange(L)))` for per-layer weights.

  The per-layer serving layout (`fused.serving_layout(per_layer=True)`)
  keeps each layer's weights in their own buffers, and the layer loop runs
  unrolled with Python-int layer indices: on XLA:CPU a scan slices every
  weight out of its [L, ...] stack into a fresh buffer each layer and step
  before the matmul reads it, which cost as much as the matmuls at decode.
  """
  stats = []
  for layer_idx, lp in enumerate(layers):
    carry, st = body(carry, (lp, layer_idx))
    stats.append(st)
  if stats[0] is None:
    return carry, None
  return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def lm_head(params: dict, hidden_btd, *, config: ModelConfig):
  """Logits [B, T, V] float32 from final (normed) hidden states [B, T, D].

  Callers that need only some positions (prefill's last token, completion
  tokens in training) take `return_hidden=True`, select positions, and call
  this; XLA then drops the unused full-width head from `forward`.
  """
  if "lm_head_packed" in params:  # the per-layer AMX layout (fused.py)
    return amx.matmul(hidden_btd, params["lm_head_packed"])
  head = quant.dequantize(params["embed"] if config.tie_word_embeddings
                          else params["lm_head"], hidden_btd.dtype)
  head = head.T if config.tie_word_embeddings else head
  return jnp.einsum("btd,dv->btv", hidden_btd, head.astype(hidden_btd.dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "lora_impl"))
def _jit_forward(params, bank, adapter_idx_b, tokens_bt, *, config,
                 lora_impl="auto"):
  return forward(params, bank, adapter_idx_b, tokens_bt, config=config,
                 lora_impl=lora_impl)[0]


def jit_forward(params, bank, adapter_idx_b, tokens_bt, *, config,
                lora_impl="auto"):
  """Jitted cache-free forward returning logits (tests, evaluation).

  Inputs are checked here, outside jit, where their values are known.
  """
  check_inputs(bank, adapter_idx_b, tokens_bt, config=config)
  return _jit_forward(params, bank, adapter_idx_b, tokens_bt, config=config,
                      lora_impl=lora_impl)
