"""The decode KV cache: one fixed-shape buffer per layer stack.

Owns `KVCache` (a pytree: k, v of shape [L, B, S, K, hd], or, in the
per-layer layout, tuples of L buffers [B, S, K, hd]), its allocation and
logical axes. Cache index == token position: row b's token at position p
is stored at [:, b, p]. A sequence slot is reused by writing a new prompt
from position 0; entries past the current position are never attended
(the mask is `key_pos <= query_pos`), so stale data needs no clearing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mintjax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """k, v: [L, B, S, K, hd] with S = max_len, or tuples of L [B, S, K, hd]
  buffers (`per_layer`: the engine's layout on CPU, where a layer's cache
  is attended and written in place instead of sliced out of the stack).

  Multi-head latent attention caches its latents instead: k is c_kv
  [L, B, S, 1, kv_lora_rank] and v the RoPE key part [L, B, S, 1, rope].
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def max_len(self) -> int:
    return int(self.k[0].shape[1] if self.per_layer else self.k.shape[2])

  @property
  def batch(self) -> int:
    return int(self.k[0].shape[0] if self.per_layer else self.k.shape[1])

  @property
  def dtype(self):
    return self.k[0].dtype if self.per_layer else self.k.dtype


def cache_shapes(config: ModelConfig, batch: int, max_len: int,
                 dtype: str | None = None, *, per_layer: bool = False
                 ) -> KVCache:
  """k, v shapes; with MLA they hold the latents (see `mintjax.model.mla`).
  `per_layer` gives tuples of L per-layer shapes."""
  dt = jnp.dtype(dtype or config.dtype)
  lead = (config.num_layers, batch, max_len)
  if config.uses_mla:
    k_shape = lead + (1, config.kv_lora_rank)
    v_shape = lead + (1, config.qk_rope_head_dim)
  else:
    k_shape = v_shape = lead + (config.num_kv_heads, config.head_dim)
  if per_layer:
    return KVCache(
        tuple(jax.ShapeDtypeStruct(k_shape[1:], dt) for _ in range(lead[0])),
        tuple(jax.ShapeDtypeStruct(v_shape[1:], dt) for _ in range(lead[0])))
  return KVCache(jax.ShapeDtypeStruct(k_shape, dt),
                 jax.ShapeDtypeStruct(v_shape, dt))


def init_cache(config: ModelConfig, batch: int, max_len: int,
               dtype: str | None = None, sharding=None, *,
               per_layer: bool = False) -> KVCache:
  """A zero cache for `batch` sequence slots of up to `max_len` tokens."""
  shapes = cache_shapes(config, batch, max_len, dtype, per_layer=per_layer)
  make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if sharding is None:
    return make()
  return jax.jit(make, out_shardings=sharding)()


def cache_logical_axes() -> KVCache:
  axes = ("layers", "batch", "cache_len", "kv_heads_n", "head_dim")
  return KVCache(axes, axes)
