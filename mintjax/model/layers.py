"""Stateless building blocks of the decoder: RMSNorm, RoPE, attention.

Owns the numerics that must match transformers bit-for-bit in spirit:
RMSNorm in float32 then cast, rotate-half RoPE with linear and llama3
frequency scaling, and grouped-query attention with a position-based causal
mask (optionally restricted to packed segments).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mintjax.config import ModelConfig

_NEG_INF = -1e30


def rms_norm(x_btd, weight_d, eps: float):
  """RMSNorm as transformers computes it: in float32, scaled in x's dtype."""
  x32 = x_btd.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight_d.astype(x_btd.dtype) * x32.astype(x_btd.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] including RoPE scaling (numpy f32)."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64)
                                     / dim))
  s = config.rope_scaling
  if s is None or s.rope_type == "default":
    pass
  elif s.rope_type == "linear":
    inv = inv / s.factor
  elif s.rope_type == "llama3":
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = ((s.original_max_position_embeddings / wavelen -
               s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  elif s.rope_type == "yarn":
    inv = _yarn_inv_freq(inv, config)
  return inv.astype(np.float32)


def _yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(inv: np.ndarray, config: ModelConfig) -> np.ndarray:
  """YaRN: interpolate low frequencies, keep high ones (transformers' ramp)."""
  s, dim, base = config.rope_scaling, config.head_dim, config.rope_theta

  def correction_dim(rotations):
    return (dim * math.log(s.original_max_position_embeddings /
                           (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low),
                 0, 1)
  extrapolation = 1 - ramp
  return inv / s.factor * (1 - extrapolation) + inv * extrapolation


def rope_attention_factor(config: ModelConfig) -> float:
  """YaRN's cos/sin scale (1.0 for every other RoPE type)."""
  s = config.rope_scaling
  if s is None or s.rope_type != "yarn":
    return 1.0
  if s.attention_factor:
    return s.attention_factor
  if s.mscale and s.mscale_all_dim:
    return (_yarn_get_mscale(s.factor, s.mscale) /
            _yarn_get_mscale(s.factor, s.mscale_all_dim))
  return _yarn_get_mscale(s.factor)


def yarn_softmax_scale(config: ModelConfig) -> float:
  """DeepSeek's extra attention-logit scale under YaRN (mscale_all_dim)."""
  s = config.rope_scaling
  if s is None or s.rope_type == "default" or not s.mscale_all_dim:
    return 1.0
  return _yarn_get_mscale(s.factor, s.mscale_all_dim) ** 2


def rope_cos_sin(positions_bt, config: ModelConfig):
  """cos and sin tables [B, T, head_dim] for integer positions."""
  inv = jnp.asarray(rope_inv_freq(config))
  freqs = positions_bt.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  factor = rope_attention_factor(config)
  if factor != 1.0:
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd, cos_btd, sin_btd):
  """Rotate-half RoPE on [B, T, heads, head_dim]."""
  half = x_bthd.shape[-1] // 2
  x1, x2 = x_bthd[..., :half], x_bthd[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_btd[:, :, None, :].astype(x_bthd.dtype)
  sin = sin_btd[:, :, None, :].astype(x_bthd.dtype)
  return x_bthd * cos + rotated * sin


def attention(q_bthd, k_bskd, v_bskd, q_pos_bt, k_pos_bs, *,
              q_segment_bt=None, k_segment_bs=None, scale=None):
  """Grouped-query attention with a causal mask by position.

  Args:
    q_bthd: [B, T, H, hd] queries.
    k_bskd: [B, S, K, hd] keys (H % K == 0).
    v_bskd: [B, S, K, hv] values (hv == hd except in MLA).
    q_pos_bt: [B, T] query positions.
    k_pos_bs: [B, S] key positions; a key is visible when k_pos <= q_pos.
      Use a negative position for keys that must never be seen.
    q_segment_bt / k_segment_bs: optional packed-sequence ids; attention
      stays within equal ids.
    scale: logit scale; default 1 / sqrt(hd).

  Returns:
    [B, T, H * hv] in q's dtype.
  """
  b, t, h, hd = q_bthd.shape
  k_heads = k_bskd.shape[2]
  if t == 1 and q_segment_bt is None:
    return _one_query_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, k_pos_bs,
                                scale)
  q = q_bthd.reshape(b, t, k_heads, h // k_heads, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd,
                      preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(hd) if scale is None else scores * scale
  visible = ((k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]) &
             (k_pos_bs[:, None, :] >= 0))
  if q_segment_bt is not None:
    visible &= q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
  scores = jnp.where(visible[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h * v_bskd.shape[-1]).astype(q_bthd.dtype)


def _one_query_attention(q_b1hd, k_bskd, v_bskd, q_pos_b1, k_pos_bs, scale):
  """`attention` for one query per row (a decode step), written as
  multiply-reduces over the cache's own [B, S, K, hd] layout instead of two
  batched dots: at decode those dots are [G, hd] x [hd, S] per row and kv
  head, and XLA:CPU transposed the whole cache into their layout every
  layer and step. XLA may still lower a reduce to a small dot, but reads
  the cache where it is (30 layers of SmolLM2 at B = 16, S = 64: 7.6 ->
  4.6 ms; docs/BENCHMARKS.md). Same math as the dot path; sums in another
  order.
  """
  b, _, h, hd = q_b1hd.shape
  k_heads = k_bskd.shape[2]
  q_bkgd = q_b1hd.reshape(b, k_heads, h // k_heads, hd).astype(jnp.float32)
  scores_bskg = jnp.sum(q_bkgd[:, None] *
                        k_bskd.astype(jnp.float32)[:, :, :, None, :], axis=-1)
  scores_bskg = (scores_bskg / math.sqrt(hd) if scale is None
                 else scores_bskg * scale)
  visible_bs = (k_pos_bs <= q_pos_b1) & (k_pos_bs >= 0)
  scores_bskg = jnp.where(visible_bs[:, :, None, None], scores_bskg, _NEG_INF)
  probs_bskg = jax.nn.softmax(scores_bskg, axis=1)
  # The dot path rounds probabilities to v's dtype first; so does this.
  probs_bskg = probs_bskg.astype(v_bskd.dtype).astype(jnp.float32)
  out_bkgd = jnp.sum(probs_bskg[..., None] *
                     v_bskd.astype(jnp.float32)[:, :, :, None, :], axis=1)
  return out_bkgd.reshape(b, 1, h * v_bskd.shape[-1]).astype(q_b1hd.dtype)
