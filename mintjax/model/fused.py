"""The fused serving layout: q/k/v and gate/up as one projection each.

Owns `fuse_projections` / `unfuse_projections` (the layout change of a base
parameter tree), the fused tree's logical axes, `serving_layout` (cast,
fuse and, on CPU, `unstack_layers`: per-layer [out, in] weights), and the
two fused forward pieces `qkv` and `gate_up` that `mintjax.model.llama`
calls when a layer's parameters carry `qkv` / `gate_up`.

Why: projections that read the same input cost one matmul instead of three
(q, k, v) or two (gate, up), and the LoRA shrinks of those targets become one
einsum too (`lora_op.lora_deltas`); a decode step on CPU is bound by per-op
overhead as much as by bytes.

Layouts (D hidden, H/K query/kv heads, G = H // K, hd head dim, F ffn):

  qkv      [L, D, K * (G + 2) * hd]   grouped by kv head: for kv head j, its
                                      G query heads, then k head j, v head j
  qkv_bias [L, K * (G + 2) * hd]      (attention_bias only)
  gate_up  [L, D, F * 2]              interleaved per column: (gate_f, up_f)

Both shard cleanly over `tensor`: a contiguous split of the qkv axis into
n shards (n dividing K) hands each shard whole GQA groups (its query heads
with their own k/v head), and a split of gate_up into n shards (n dividing
F) hands each shard the same F/n columns of gate and of up. So the fused
axes take the logical names of the unfused ones they replace (`kv_heads`,
`mlp`), and no shard ever needs a column another shard holds.

Hugging Face, GGUF and checkpoint files keep the separate q/k/v and gate/up
layout: loaders and exporters never see the fused tree, which is made from
a loaded tree by `fuse_projections` (the Engine does it when serving).
Models without these projections (multi-head latent attention has no q/k/v;
MoE expert feed-forwards live outside `layers`) keep their own path: only
keys present in `params["layers"]` are fused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import amx
from cpu_kernels import swiglu as cpu_swiglu
from mintjax.adapters.bank import activation_axes
from mintjax.adapters.lora_op import OutInKernel, base_matmul, lora_deltas
from mintjax.adapters.slot_dense import SlotDenseLayer
from mintjax.config import ModelConfig

QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")


def _fuse_qkv_weight(q, k, v, config: ModelConfig):
  """[..., H*hd], [..., K*hd], [..., K*hd] -> [..., K*(G+2)*hd]."""
  c = config
  kh, g, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
  lead = q.shape[:-1]
  q = q.reshape(*lead, kh, g, hd)
  k = k.reshape(*lead, kh, 1, hd)
  v = v.reshape(*lead, kh, 1, hd)
  return jnp.concatenate([q, k, v], axis=-2).reshape(*lead, -1)


def _split_qkv(y, config: ModelConfig):
  """[..., K*(G+2)*hd] -> q [..., H, hd], k [..., K, hd], v [..., K, hd]."""
  c = config
  kh, g, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
  lead = y.shape[:-1]
  y = y.reshape(*lead, kh, g + 2, hd)
  q = y[..., :g, :].reshape(*lead, kh * g, hd)
  return q, y[..., g, :], y[..., g + 1, :]


def can_fuse(config: ModelConfig, layers: dict, tensor_shards: int = 1
             ) -> dict[str, bool]:
  """Which fusions a layer tree allows: {'qkv': ..., 'gate_up': ...}.

  A fusion needs its projections present as plain arrays and, on a mesh,
  a tensor axis that splits it into whole groups: n dividing K (qkv) and F
  (gate_up). Where it does not, the unfused projections shard as before.
  """
  n = tensor_shards
  # Plain arrays only: an int8 base (`quant.Int8Weight`) keeps its layout.
  dense = lambda names: all(isinstance(layers.get(k), (jax.Array, np.ndarray))
                            for k in names)
  return {"qkv": dense(QKV) and config.num_kv_heads % n == 0,
          "gate_up": dense(GATE_UP) and config.intermediate_size % n == 0}


def fuse_projections(params: dict, config: ModelConfig, *,
                     tensor_shards: int = 1) -> dict:
  """The serving layout of a base tree (see the module docstring).

  Returns a new tree (the input is not modified) whose `layers` hold `qkv`
  (and `qkv_bias`) instead of q/k/v and `gate_up` instead of gate/up, where
  `can_fuse` allows it for a tensor axis of `tensor_shards` devices.
  """
  layers = dict(params["layers"])
  ok = can_fuse(config, layers, tensor_shards)
  if ok["qkv"]:
    q, k, v = (layers.pop(n) for n in QKV)
    layers["qkv"] = _fuse_qkv_weight(q, k, v, config)
    if "q_bias" in layers:
      qb, kb, vb = (layers.pop(n + "_bias") for n in QKV)
      layers["qkv_bias"] = _fuse_qkv_weight(qb, kb, vb, config)
  if ok["gate_up"]:
    gate, up = layers.pop("gate"), layers.pop("up")
    layers["gate_up"] = jnp.stack([gate, up], axis=-1).reshape(
        *gate.shape[:-1], -1)
  return {**params, "layers": layers}


def unfuse_projections(params: dict, config: ModelConfig) -> dict:
  """The inverse of `fuse_projections` (the Hugging Face layout again)."""
  layers = dict(params["layers"])
  if "qkv" in layers:
    q, k, v = _split_qkv(layers.pop("qkv"), config)
    lead = q.shape[:-2]
    layers.update(q=q.reshape(*lead, -1), k=k.reshape(*lead, -1),
                  v=v.reshape(*lead, -1))
    if "qkv_bias" in layers:
      qb, kb, vb = _split_qkv(layers.pop("qkv_bias"), config)
      lead = qb.shape[:-2]
      layers.update(q_bias=qb.reshape(*lead, -1), k_bias=kb.reshape(*lead, -1),
                    v_bias=vb.reshape(*lead, -1))
  if "gate_up" in layers:
    gu = layers.pop("gate_up")
    gu = gu.reshape(*gu.shape[:-1], -1, 2)
    layers.update(gate=gu[..., 0], up=gu[..., 1])
  return {**params, "layers": layers}


def fused_logical_axes(axes: dict, params: dict) -> dict:
  """Logical axes of a (possibly) fused tree `params`, from the unfused
  tree's axes.

  The fused axes take the names of the axes they replace: whole GQA groups
  shard like kv heads, interleaved gate/up columns like the mlp axis.
  """
  layers = dict(axes["layers"])
  if "qkv" in params["layers"]:
    for n in QKV:
      layers.pop(n)
    layers["qkv"] = ("layers", "embed", "kv_heads")
    if "q_bias" in layers:
      for n in QKV:
        layers.pop(n + "_bias")
      layers["qkv_bias"] = ("layers", "kv_heads")
  if "gate_up" in params["layers"]:
    layers.pop("gate")
    layers.pop("up")
    layers["gate_up"] = ("layers", "embed", "mlp")
  return {**axes, "layers": layers}


# Kernels the per-layer layout stores transposed (`OutInKernel`): those read
# only through `lora_op.base_matmul` (MLA's own projections are not).
_OUT_IN = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")


def unstack_layers(params: dict, config: ModelConfig, *,
                   matmul: str = "xla") -> dict:
  """The per-layer layout: `layers` as a tuple of L per-layer trees, each
  weight in its own buffer, projection kernels as `OutInKernel`
  ([d_out, d_in]). `llama.forward` then unrolls the layer loop (see
  `llama._unrolled` for why). For one device: the layout has no logical
  axes (the Engine refuses it with a mesh).

  matmul='amx' stores the projection kernels, and the LM head as
  `lm_head_packed`, pre-packed for `cpu_kernels.amx.matmul` instead (bf16
  only; the caller checks `amx.available()`).
  """
  if matmul not in ("xla", "amx"):
    raise ValueError(f"unstack_layers: matmul must be 'xla' or 'amx', got "
                     f"{matmul!r}")
  stacked = params["layers"]
  n = next(iter(jax.tree.leaves(stacked))).shape[0]
  transpose = () if config.uses_mla else _OUT_IN
  kernel = amx.pack if matmul == "amx" else OutInKernel

  def layer(i):
    out = {}
    for name, x in stacked.items():
      if (name in transpose and isinstance(x, (jax.Array, np.ndarray))
          and x.ndim == 3):  # [L, d_in, d_out]; expert stacks stay as they are
        out[name] = kernel(jnp.asarray(x[i]).T)
      else:
        out[name] = jax.tree.map(lambda a: a[i], x)
    return out
  out = {**params, "layers": tuple(layer(i) for i in range(n))}
  if matmul == "amx" and not config.uses_mla:
    tied = config.tie_word_embeddings
    head = params["embed"] if tied else params["lm_head"]
    if isinstance(head, (jax.Array, np.ndarray)):  # not an int8 QTensor
      out["lm_head_packed"] = amx.pack(head if tied else jnp.asarray(head).T)
  return out


def serving_layout(params: dict, config: ModelConfig, axes: dict, *,
                   dtype: str, fuse: bool = True, tensor_shards: int = 1,
                   per_layer: bool = False, matmul: str = "xla"):
  """A loaded base tree prepared for serving: cast, then fused.

  Args:
    params: base tree in the loader's (Hugging Face) layout.
    config: its model config.
    axes: the tree's logical axes (`llama.param_logical_axes(config)`).
    dtype: weight and compute dtype ('float32' is the exactness mode the
      parity tests use; 'bfloat16' halves the bytes a step reads, and every
      matmul still accumulates in f32).
    fuse: fuse q/k/v and gate/up (`fuse_projections`).
    tensor_shards: size of the mesh's tensor axis (1 without a mesh).
    per_layer: split the layer stack into per-layer weights
      (`unstack_layers`; the Engine's choice for bf16 serving on CPU, one
      device only).
    matmul: with per_layer, 'amx' pre-packs the projections and LM head for
      `cpu_kernels.amx` (bf16 on AMX CPUs), 'xla' keeps XLA's dots.

  Returns:
    (params, config with `dtype`, logical axes of the returned tree; None
    for the per-layer layout).
  """
  config = dataclasses.replace(config, dtype=dtype)
  dt = jnp.dtype(dtype)
  params = jax.tree.map(
      lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      params)
  if fuse:
    params = fuse_projections(params, config, tensor_shards=tensor_shards)
  axes = fused_logical_axes(axes, params)
  if per_layer:
    params, axes = unstack_layers(params, config, matmul=matmul), None
  return params, config, axes


def _base(h_btd, w, bias):
  """h @ W (+ bias) with f32 accumulation, as `lora_op.lora_project`."""
  y = base_matmul(h_btd, w)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _deltas(h_btd, lb, names, adapter_idx_b, lora_impl):
  if lb is None:
    return [None] * len(names)
  if isinstance(lb, SlotDenseLayer):  # one shrink GEMM per target group
    return lb.deltas(h_btd, names, adapter_idx_b)
  loras = [lb.lora(n) if n in lb.lora_a else None for n in names]
  return lora_deltas(h_btd, loras, adapter_idx_b, lora_impl,
                     axes=[activation_axes(n) for n in names])


def qkv(h_btd, lp: dict, lb, adapter_idx_b, *, config: ModelConfig,
        lora_impl: str):
  """q [B, T, H, hd], k and v [B, T, K, hd] from the fused projection.

  Equals the three separate `lora_project` calls: the base columns are the
  same dot products, each target's LoRA delta is added in f32 before the
  cast to h's dtype.
  """
  c = config
  b, t, _ = h_btd.shape
  q, k, v = _split_qkv(_base(h_btd, lp["qkv"], lp.get("qkv_bias")), c)
  outs = []
  for y, d in zip((q, k, v),
                  _deltas(h_btd, lb, QKV, adapter_idx_b, lora_impl)):
    y = y.reshape(b, t, -1)
    if d is not None:
      y = y + d
    outs.append(y.astype(h_btd.dtype))
  q, k, v = outs
  return (q.reshape(b, t, c.num_heads, c.head_dim),
          k.reshape(b, t, c.num_kv_heads, c.head_dim),
          v.reshape(b, t, c.num_kv_heads, c.head_dim))


def gate_up(h_btd, lp: dict, lb, adapter_idx_b, *, lora_impl: str):
  """silu(gate) * up [B, T, F] from the fused projection."""
  y = _base(h_btd, lp["gate_up"], None)
  y = y.reshape(*y.shape[:-1], -1, 2)
  d_gate, d_up = _deltas(h_btd, lb, GATE_UP, adapter_idx_b, lora_impl)
  if (isinstance(lp["gate_up"], amx.PackedKernel)
      and h_btd.dtype == jnp.bfloat16):
    # The per-layer AMX layout: the native SwiGLU (XLA:CPU's elementwise
    # silu ran at ~2 ns an element here; cpu_kernels/swiglu.cc).
    return cpu_swiglu.swiglu(y, d_gate, d_up)
  gate, up = y[..., 0], y[..., 1]
  if d_gate is not None:
    gate = gate + d_gate
  if d_up is not None:
    up = up + d_up
  gate, up = gate.astype(h_btd.dtype), up.astype(h_btd.dtype)
  return jax.nn.silu(gate) * up
