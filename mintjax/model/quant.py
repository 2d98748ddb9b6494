"""An int8 weight-only base: per-channel quantized kernels, dequantized per layer.

Owns `Int8Weight` (int8 values + float32 per-output-channel scales, a pytree
that slices like the float kernel it replaces), `quantize_params` (float base
tree -> int8 tree), `dequantize` (the model calls it on each layer's slice
inside the scan, so at most one layer is ever float at a time),
`take_rows` (the embedding lookup) and `logical_axes` / `abstract_params`
(sharding and ahead-of-time shapes of an int8 tree). Whole int8 bases
(quantize, save, load) are `mintjax.model.int8_base`.

Scheme: symmetric absmax per output channel. A kernel W [..., D_in, D_out]
(x @ W layout) becomes q = round(W / s) in [-127, 127] with
s [..., 1, D_out] = max |W| over D_in / 127; the embedding [V, D] is scaled per
row (s [V, 1]), which is also the per-output-channel scale of a tied LM head.
Norms, biases and MoE routers stay float (tiny, and a router's argmax is
sensitive to rounding). Training is QLoRA-style: the int8 base is frozen and
only the adapter bank gets gradients.

Why not Qwix: Qwix quantizes a model by intercepting the ops of Flax Linen /
NNX modules (`qwix.quantize_model`); mintjax's decoder is plain functions over
a parameter dict, so there are no modules to intercept, and reaching into
Qwix's internal QArray to store weights would tie the base format to the
private API of a 0.1.x library for what is a few lines of absmax arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Parameter names that stay float: RMSNorm weights, biases, MoE routers.
_FLOAT_KEYS = ("norm", "bias", "router")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A per-channel int8 kernel: value = q * scale (scale broadcasts).

  Attributes:
    q: int8 [..., D_in, D_out] (or [V, D] for the embedding).
    scale: float32 [..., 1, D_out] (or [V, 1]).
  """
  q: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.q.shape

  @property
  def dtype(self):
    return self.q.dtype


def _is_q(x) -> bool:
  return isinstance(x, Int8Weight)


def key_names(path) -> list[str]:
  return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _kind(path, ndim: int) -> str | None:
  """'rows' (embedding), 'kernel' (reduce over D_in) or None (keep float)."""
  names = key_names(path)
  if any(f in n for n in names for f in _FLOAT_KEYS):
    return None
  if names and names[-1] == "embed" and len(names) == 1:
    return "rows"
  return "kernel" if ndim >= 2 else None


def quantize(w, axis: int) -> Int8Weight:
  """Symmetric absmax int8 of `w`, one scale per slice along `axis`."""
  w32 = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return Int8Weight(q, scale.astype(jnp.float32))


def quantize_params(params: dict) -> dict:
  """The int8 tree of a float base tree (see the module docstring).

  Already-quantized leaves are kept; the result has the same keys.
  """
  def one(path, x):
    if _is_q(x):
      return x
    kind = _kind(path, np.ndim(x))
    if kind is None:
      return x
    return quantize(x, axis=-1 if kind == "rows" else -2)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)


def dequantize(tree, dtype=None):
  """`tree` with every `Int8Weight` replaced by q * scale in `dtype`
  (default float32). Float leaves pass through unchanged, so a float base
  costs nothing."""
  dt = jnp.dtype(dtype or jnp.float32)

  def one(x):
    if not _is_q(x):
      return x
    return (x.q.astype(jnp.float32) * x.scale).astype(dt)
  return jax.tree.map(one, tree, is_leaf=_is_q)


def take_rows(embed, tokens_bt, dtype):
  """Embedding lookup [B, T, D] in `dtype`; dequantizes only the rows read."""
  if not _is_q(embed):
    return jnp.take(embed, tokens_bt, axis=0).astype(dtype)
  q = jnp.take(embed.q, tokens_bt, axis=0).astype(jnp.float32)
  s = jnp.take(embed.scale, tokens_bt, axis=0)
  return (q * s).astype(dtype)


def is_quantized(params) -> bool:
  return any(_is_q(x) for x in jax.tree.leaves(params, is_leaf=_is_q))


def logical_axes(axes_tree: dict, params: dict) -> dict:
  """The logical axes of an int8 tree from its float tree's axes: a scale
  keeps the kernel's axes except the reduced (size-1) dim, which is None."""
  def one(axes, x):
    if not _is_q(x):
      return axes
    kept = tuple(None if d == 1 and full != 1 else a for a, d, full in
                 zip(axes, x.scale.shape, x.q.shape))
    return Int8Weight(tuple(axes), kept)
  return jax.tree.map(one, axes_tree, params,
                      is_leaf=lambda a: isinstance(a, tuple) and all(
                          isinstance(e, (str, type(None))) for e in a))


def abstract_params(shapes: dict) -> dict:
  """ShapeDtypeStructs of the int8 tree of a float tree of shapes."""
  def one(path, s):
    kind = _kind(path, len(s.shape))
    if kind is None:
      return s
    axis = -1 if kind == "rows" else -2
    scale_shape = list(s.shape)
    scale_shape[axis] = 1
    return Int8Weight(jax.ShapeDtypeStruct(s.shape, jnp.int8),
                      jax.ShapeDtypeStruct(tuple(scale_shape), jnp.float32))
  return jax.tree_util.tree_map_with_path(one, shapes)


def nbytes(tree) -> int:
  """Bytes of every array leaf (int8 values and scales counted)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))
