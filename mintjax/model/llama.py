"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as pure functions.

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

from mintjax import sharding
from mintjax.adapters.bank import AdapterBank, activation_axes
from mintjax.adapters.lora_op import lora_project
from mintjax.config import ModelConfig
from mintjax.model import quant
from mintjax.model.kv_cache import KVCache
from mintjax.model.layers import apply_rope, attention, rms_norm, rope_cos_sin


def param_shapes(config: ModelConfig) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct` leaves."""
  dt = jnp.dtype(config.dtype)
  c = config
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)
  layers = {
      "attn_norm": s(c.num_layers, c.hidden_size),
      "q": s(c.num_layers, c.hidden_size, c.q_dim),
      "k": s(c.num_layers, c.hidden_size, c.kv_dim),
      "v": s(c.num_layers, c.hidden_size, c.kv_dim),
      "o": s(c.num_layers, c.q_dim, c.hidden_size),
      "mlp_norm": s(c.num_layers, c.hidden_size),
      "gate": s(c.num_layers, c.hidden_size, c.intermediate_size),
      "up": s(c.num_layers, c.hidden_size, c.intermediate_size),
      "down": s(c.num_layers, c.intermediate_size, c.hidden_size),
  }
  if c.attention_bias:
    layers.update(q_bias=s(c.num_layers, c.q_dim),
                  k_bias=s(c.num_layers, c.kv_dim),
                  v_bias=s(c.num_layers, c.kv_dim))
  params = {"embed": s(c.vocab_size, c.hidden_size), "layers": layers,
            "final_norm": s(c.hidden_size)}
  if not c.tie_word_embeddings:
    params["lm_head"] = s(c.hidden_size, c.vocab_size)
  return params


def param_logical_axes(config: ModelConfig) -> dict:
  """Logical axis names for every parameter (same tree as the params)."""
  layers = {
      "attn_norm": ("layers", "norm"),
      "q": ("layers", "embed", "q_heads"),
      "k": ("layers", "embed", "kv_heads"),
      "v": ("layers", "embed", "kv_heads"),
      "o": ("layers", "q_heads", "embed"),
      "mlp_norm": ("layers", "norm"),
      "gate": ("layers", "embed", "mlp"),
      "up": ("layers", "embed", "mlp"),
      "down": ("layers", "mlp", "embed"),
  }
  if config.attention_bias:
    layers.update(q_bias=("layers", "q_heads"), k_bias=("layers", "kv_heads"),
                  v_bias=("layers", "kv_heads"))
  axes = {"embed": ("vocab", "embed"), "layers": layers,
          "final_norm": ("norm",)}
  if not config.tie_word_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def init_params(config: ModelConfig, seed: int = 0, std: float = 0.02
                ) -> dict:
  """Random parameters (normal(0, std) kernels, unit norms, zero biases)."""
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
           config: ModelConfig, lora_impl: str):
  """One decoder block. Returns (x, (k_layer, v_layer) or None)."""
  c = config
  adapter_idx_b, cos, sin = step.adapter_idx_b, step.cos, step.sin
  q_pos_bt, k_pos_bs = step.q_pos_bt, step.k_pos_bs
  write_start_b, segments = step.write_start_b, step.segments
  b, t, _ = x_btd.shape

  def proj(name, h):
    if lb is None or name not in lb.lora_a:
      return lora_project(h, lp[name], lp.get(name + "_bias"))
    # The true rank rides along so kernels skip padded rank; the axes place
    # a kernel's shards like this projection's activations on a mesh.
    return lora_project(h, lp[name], lp.get(name + "_bias"), lb.lora(name),
                        adapter_idx_b, lora_impl,
                        axes=activation_axes(name))

  h = rms_norm(x_btd, lp["attn_norm"], c.rms_norm_eps)
  q = proj("q", h).reshape(b, t, c.num_heads, c.head_dim)
  k = proj("k", h).reshape(b, t, c.num_kv_heads, c.head_dim)
  v = proj("v", h).reshape(b, t, c.num_kv_heads, c.head_dim)
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
  attn = attention(q, k, v, q_pos_bt, k_pos_bs, q_segment_bt=q_seg,
                   k_segment_bs=k_seg)
  attn = sharding.constrain(attn, ("batch", "length", "q_heads"))
  x_btd = x_btd + proj("o", attn)
  h = rms_norm(x_btd, lp["mlp_norm"], c.rms_norm_eps)
  gated = jax.nn.silu(proj("gate", h)) * proj("up", h)
  gated = sharding.constrain(gated, ("batch", "length", "mlp"))
  x_btd = x_btd + proj("down", gated)
  x_btd = sharding.constrain(x_btd, ("batch", "length", "embed_act"))
  return x_btd, new_kv


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
            return_hidden: bool = False):
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

  Returns:
    (logits [B, T, V] float32, updated cache or None) and, with
    `return_hidden`, the hidden states [B, T, D] as a third element.

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
    k_pos_bs = jnp.broadcast_to(
        jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    segments = (None, None)
  else:
    k_pos_bs = positions_bt
    segments = (segment_ids_bt, segment_ids_bt)
  step = _StepInputs(adapter_idx_b, cos, sin, positions_bt, k_pos_bs,
                     positions_bt[:, 0], segments)

  def body(carry, xs):
    x, kv = carry
    lp, layer_idx = xs
    lp = quant.dequantize(lp, dt)  # int8 base: only this layer goes float
    lb = bank.layer(layer_idx) if bank is not None else None
    layer_kv = None
    if kv is not None:
      layer_kv = (kv[0][layer_idx], kv[1][layer_idx])
    x, new_kv = _layer(x, lp, lb, layer_kv, step, config=c,
                       lora_impl=lora_impl)
    if kv is not None:
      kv = tuple(jax.lax.dynamic_update_index_in_dim(buf, new, layer_idx, 0)
                 for buf, new in zip(kv, new_kv))
    return (x, kv), None

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  kv0 = (cache.k, cache.v) if cache is not None else None
  (x, kv), _ = jax.lax.scan(
      body, (x, kv0), (params["layers"], jnp.arange(c.num_layers)))
  hidden = rms_norm(x, params["final_norm"], c.rms_norm_eps)
  logits = lm_head(params, hidden, config=c)
  new_cache = KVCache(*kv) if cache is not None else None
  if return_hidden:
    return logits, new_cache, hidden
  return logits, new_cache


def lm_head(params: dict, hidden_btd, *, config: ModelConfig):
  """Logits [B, T, V] float32 from final (normed) hidden states [B, T, D].

  Callers that need only some positions (prefill's last token, completion
  tokens in training) take `return_hidden=True`, select positions, and call
  this; XLA then drops the unused full-width head from `forward`.
  """
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
