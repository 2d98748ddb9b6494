"""Multi-head latent attention (DeepSeek-V3, Kimi-K2) as a pure function.

Owns MLA's attention block: queries through a low-rank pair (q_a, RMSNorm,
q_b) or one q projection; keys and values from a shared latent
(kv_a -> [c_kv ; k_rope], RMSNorm on c_kv, kv_b -> per-head [k_nope ; v]);
decoupled RoPE on a separate per-head query part and one shared key part
(optionally interleaved, as DeepSeek-V3 lays it out); and the softmax
scale `qk_head_dim ** -0.5` times YaRN's `mscale_all_dim` correction.

The KV cache holds the compressed latents, as transformers does: cache.k
is c_kv [L, B, S, 1, kv_lora_rank] (normed) and cache.v the RoPE'd shared
key part [L, B, S, 1, qk_rope_head_dim], so a cached token costs
kv_lora_rank + qk_rope_head_dim values instead of 2 * H * head_dim.

Two equal ways to attend over the latents (`_absorb_pays`):
- expanded: keys and values of all S positions through kv_b, then ordinary
  attention (prefill and training, where T is about S);
- absorbed (DeepSeek-V2's weight absorption): kv_b's key half is folded
  into the queries and its value half applied after attention, so a query
  attends to the latents directly as one shared (MQA) head of width
  kv_lora + rope; a decode step then costs O(S * kv_lora) per head instead
  of expanding S keys. Used when few queries meet a long cache and kv_b
  carries no per-tenant adapter (a LoRA on kv_b acts on the expanded keys).

Parameters of one layer (x @ W layout; H heads, C = qk_nope + qk_rope):
  q [D, H*C]  or  q_a [D, q_lora], q_a_norm [q_lora], q_b [q_lora, H*C]
  kv_a [D, kv_lora + qk_rope], kv_a_norm [kv_lora]
  kv_b [kv_lora, H*(qk_nope + v_head)], o [H*v_head, D]  (o is applied by
  the decoder, like every architecture's output projection).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mintjax.config import ModelConfig
from mintjax.model.layers import (apply_rope, attention, rms_norm,
                                  yarn_softmax_scale)


def _deinterleave(x):
  """[..., d] pairs (x0, x1), (x2, x3)... -> [x0, x2, ..., x1, x3, ...].

  DeepSeek-V3 stores the RoPE channels interleaved; de-interleaving turns
  its pairwise rotation into rotate-half RoPE (transformers' equivalence).
  """
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _absorb_pays(t: int, s: int, c: ModelConfig) -> bool:
  """Absorption's per-(query, key) cost 2r - nope - v (r = kv_lora) against
  expansion's r * (nope + v) per key, paid once for all t queries."""
  r, nope, v = c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim
  return t < s and t * (2 * r - nope - v) < r * (nope + v)


def mla_attention(h_btd, lp: dict, cache_kv, step, *, config: ModelConfig,
                  proj, kv_b_adapted: bool = False, absorb: bool | None = None):
  """The attention of one MLA layer, before the output projection.

  Args:
    h_btd: [B, T, D] normed hidden states.
    lp: the layer's parameters (see the module docstring).
    cache_kv: (c_kv [B, S, 1, kv_lora], k_rope [B, S, 1, qk_rope]) of this
      layer, or None without a cache.
    step: the decoder's per-call inputs (`llama._StepInputs`).
    config: model config with `uses_mla`.
    proj: the decoder's `proj(name, h)` (LoRA-aware) projection.
    kv_b_adapted: the bank adapts kv_b (absorption is then never used).
    absorb: force the absorbed (True) or expanded (False) form; None picks
      by cost (`_absorb_pays`).

  Returns:
    (attn [B, T, H * v_head_dim], updated (c_kv, k_rope) or None).
  """
  c = config
  b, t, _ = h_btd.shape
  nh, nope, rope = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
  if c.q_lora_rank:
    q = proj("q_b", rms_norm(proj("q_a", h_btd), lp["q_a_norm"],
                             c.rms_norm_eps))
  else:
    q = proj("q", h_btd)
  q = q.reshape(b, t, nh, nope + rope)
  q_nope, q_rope = q[..., :nope], q[..., nope:]
  kv = proj("kv_a", h_btd)
  c_kv = rms_norm(kv[..., :c.kv_lora_rank], lp["kv_a_norm"], c.rms_norm_eps)
  k_rope = kv[..., c.kv_lora_rank:][:, :, None, :]  # [B, T, 1, rope]
  if c.rope_interleave:
    q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
  q_rope = apply_rope(q_rope, step.cos, step.sin)
  k_rope = apply_rope(k_rope, step.cos, step.sin)
  c_kv = c_kv[:, :, None, :]  # [B, T, 1, kv_lora]
  new_kv = None
  if cache_kv is not None:
    write = jax.vmap(
        lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), start, axis=0))
    c_all = write(cache_kv[0], c_kv, step.write_start_b)
    r_all = write(cache_kv[1], k_rope, step.write_start_b)
    new_kv = (c_all, r_all)
    c_kv, k_rope = c_all.astype(q.dtype), r_all.astype(q.dtype)
  s = c_kv.shape[1]
  scale = yarn_softmax_scale(c) / math.sqrt(nope + rope)
  q_seg, k_seg = step.segments
  if absorb is None:
    absorb = _absorb_pays(t, s, c)
  if absorb and not kv_b_adapted:
    w = lp["kv_b"].reshape(c.kv_lora_rank, nh, nope + c.v_head_dim)
    w = w.astype(q.dtype)
    q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w[..., :nope])
    latent = jnp.concatenate([c_kv, k_rope], axis=-1)  # [B, S, 1, r + rope]
    ctx = attention(jnp.concatenate([q_lat, q_rope], axis=-1), latent, c_kv,
                    step.q_pos_bt, step.k_pos_bs, q_segment_bt=q_seg,
                    k_segment_bs=k_seg, scale=scale)  # [B, T, H * r]
    out = jnp.einsum("bthr,rhv->bthv", ctx.reshape(b, t, nh, -1),
                     w[..., nope:])
    return out.reshape(b, t, nh * c.v_head_dim), new_kv
  kv_b = proj("kv_b", c_kv[:, :, 0, :]).reshape(b, s, nh, nope + c.v_head_dim)
  k_nope, v = kv_b[..., :nope], kv_b[..., nope:]
  k = jnp.concatenate(
      [k_nope, jnp.broadcast_to(k_rope, (b, s, nh, rope))], axis=-1)
  q = jnp.concatenate([q_nope, q_rope], axis=-1)
  out = attention(q, k, v, step.q_pos_bt, step.k_pos_bs, q_segment_bt=q_seg,
                  k_segment_bs=k_seg, scale=scale)
  return out, new_kv
