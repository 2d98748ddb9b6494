"""The compiled serving steps: bucketed prefill and multi-step decode.

Owns `DecodeState` (the per-row decode cursor), `StepFns` and
`make_step_fns`, the one factory that jits both steps with the KV cache
donated and, on a mesh, explicit output shardings (so a step's outputs feed
the next call with identical shardings and nothing recompiles).

Conventions (B sequence rows, P prefill rows, T a prompt bucket, N decode
steps per call, S = max_len):

- Row b's KV cache holds positions 0 .. pos_b - 1. `token_b` is the last
  sampled token, not yet in the cache; it will be written at `pos_b`.
- Prefill runs P prompts right-padded to a bucket length T on a scratch
  cache, copies it into rows `rows_p` of the serving cache (a row index of B
  drops that prefill row: padding), and samples each prompt's first token.
  Padding positions >= the prompt length are written too, but a row only
  ever attends to positions <= its current one and decode overwrites them.
- Decode runs up to N steps in one `lax.while_loop` (Python is not in the
  per-token loop) and stops early when no row is active.

Adapters are data: the bank and `adapter_idx` are ordinary arguments, so
changing which adapters are resident never recompiles a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mintjax import sharding
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.kv_cache import KVCache, cache_logical_axes, cache_shapes
from mintjax.serve import sampling as sampling_lib


@flax.struct.dataclass
class DecodeState:
  """Per-row decode cursor (B rows).

  Attributes:
    token_b: [B] int32 last sampled token (to be fed next).
    pos_b: [B] int32 position `token_b` will be written at.
    remaining_b: [B] int32 tokens the row may still generate.
    active_b: [B] bool row is generating.
    adapter_idx_b: [B] int32 bank slot of the row (0 = base).
  """

  token_b: jax.Array
  pos_b: jax.Array
  remaining_b: jax.Array
  active_b: jax.Array
  adapter_idx_b: jax.Array


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted steps of one engine.

  prefill(params, bank, cache, tokens_pt, lengths_p, rows_p, adapter_idx_p,
          rows: RowSampling[P]) -> (cache, token_p, logprob_p, top_ids_pk,
                                    top_logprobs_pk)
  decode(params, bank, cache, state: DecodeState, rows: RowSampling[B],
         lora_rank=None)
      -> (cache, state, tokens_bn, logprobs_bn, valid_bn, top_ids_bnk,
          top_logprobs_bnk)
  score(params, bank, tokens_1t, adapter_idx_1) -> (logprob_1t, top_ids_1tk,
      top_logprobs_1tk): prompt log-probabilities (see `_score`); compiled
      on first use per bucket, only for requests that ask for them.

  K = sampling.MAX_TOP_LOGPROBS; the top-k outputs are zeros unless some
  row asked for top log-probabilities.
  """

  prefill: Callable
  decode: Callable
  steps_per_call: int
  score: Callable | None = None


def _prefill(params, bank, cache: KVCache, tokens_pt, lengths_p, rows_p,
             adapter_idx_p, rows: sampling_lib.RowSampling, *,
             config: ModelConfig, lora_impl: str, mesh: Mesh | None,
             rules=None):
  """Prefills P right-padded prompts into rows `rows_p` of the cache.

  Args:
    tokens_pt: [P, T] int32 prompts, right-padded.
    lengths_p: [P] int32 true prompt lengths (1 <= length <= T).
    rows_p: [P] int32 destination rows; B (out of range) drops the row.
    adapter_idx_p: [P] int32 bank slots.
    rows: per-prefill-row sampling parameters ([P] leaves).

  Returns:
    (cache, token_p [P] int32 first generated token, logprob_p [P] float32,
    top_ids_pk [P, K] int32, top_logprobs_pk [P, K] float32).
  """
  p, t = tokens_pt.shape
  with _rules(mesh, rules):
    scratch = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        cache_shapes(config, p, t, cache.dtype.name,
                     per_layer=cache.per_layer))
    pos_pt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (p, t))
    _, scratch, hidden_ptd = llama.forward(
        params, bank, adapter_idx_p, tokens_pt, pos_pt, config=config,
        cache=scratch, lora_impl=lora_impl, return_hidden=True)
  # mode='drop' turns padding rows (index B) into no-ops.
  if cache.per_layer:
    put = lambda bufs, news: tuple(
        buf.at[rows_p, :t].set(new, mode="drop")
        for buf, new in zip(bufs, news))
  else:
    put = lambda buf, new: buf.at[:, rows_p, :t].set(new, mode="drop")
  cache = KVCache(put(cache.k, scratch.k), put(cache.v, scratch.v))
  # The LM head runs on each prompt's last position only (not all T).
  last_p1d = jnp.take_along_axis(
      hidden_ptd, (lengths_p - 1)[:, None, None], axis=1)
  last_pv = llama.lm_head(params, last_p1d, config=config)[:, 0]
  token_p, logprob_p = sampling_lib.sample(last_pv, rows, lengths_p)
  top_ids_pk, top_lps_pk = sampling_lib.top_logprobs(last_pv, rows)
  return cache, token_p, logprob_p, top_ids_pk, top_lps_pk


def _score(params, bank, tokens_1t, adapter_idx_1, *, config: ModelConfig,
           lora_impl: str, mesh: Mesh | None, rules=None):
  """Log-probabilities of a prompt's tokens (no cache, no sampling).

  Args:
    tokens_1t: [1, T] int32 prompt, right-padded to a bucket.
    adapter_idx_1: [1] int32 bank slot.

  Returns:
    (logprob_1t [1, T] float32: position t holds log p(token t+1 | tokens
    <= t), the last position 0; top_ids_1tk [1, T, K] int32 and
    top_logprobs_1tk [1, T, K] float32: the K most likely next tokens).
  """
  with _rules(mesh, rules):
    logits_1tv, _ = llama.forward(params, bank, adapter_idx_1, tokens_1t,
                                  config=config, lora_impl=lora_impl)
  lp_1tv = jax.nn.log_softmax(logits_1tv.astype(jnp.float32), axis=-1)
  nxt_1t = jnp.concatenate([tokens_1t[:, 1:], tokens_1t[:, :1] * 0], axis=1)
  lp_1t = jnp.take_along_axis(lp_1tv, nxt_1t[..., None], axis=-1)[..., 0]
  k = min(sampling_lib.MAX_TOP_LOGPROBS, lp_1tv.shape[-1])
  top_lps, top_ids = jax.lax.top_k(lp_1tv, k)
  return lp_1t, top_ids.astype(jnp.int32), top_lps


def _decode(params, bank, cache: KVCache, state: DecodeState,
            rows: sampling_lib.RowSampling, *, config: ModelConfig,
            lora_impl: str, steps: int, mesh: Mesh | None, rules=None,
            lora_rank: int | None = None):
  """Up to `steps` decode steps for every active row.

  `lora_rank` (static) narrows the LoRA work to that many rank columns
  (exact when every active row's adapter has a true rank <= lora_rank; the
  engine picks the smallest of `bank.rank_buckets` that holds them).

  Returns:
    (cache, state, tokens_bn [B, N] int32, logprobs_bn [B, N] float32,
    valid_bn [B, N] bool: the token at [b, n] was generated by row b,
    top_ids_bnk [B, N, K] int32, top_logprobs_bnk [B, N, K] float32).
  """
  b = state.token_b.shape[0]
  k = sampling_lib.MAX_TOP_LOGPROBS
  max_len = cache.max_len

  def cond(carry):
    i, _, st, *_ = carry
    return (i < steps) & jnp.any(st.active_b)

  def body(carry):
    i, cache, st, toks, lps, valid, top_ids, top_lps = carry
    with _rules(mesh, rules):
      logits_b1v, cache = llama.forward(
          params, bank, st.adapter_idx_b, st.token_b[:, None],
          st.pos_b[:, None], config=config, cache=cache, lora_impl=lora_impl,
          lora_rank=lora_rank)
    nxt_pos = st.pos_b + 1
    token_b, logprob_b = sampling_lib.sample(logits_b1v[:, 0], rows, nxt_pos)
    ids_bk, tlp_bk = sampling_lib.top_logprobs(logits_b1v[:, 0], rows)
    act = st.active_b
    remaining = st.remaining_b - act.astype(jnp.int32)
    stopped = sampling_lib.is_stop(token_b, rows)
    still = act & ~stopped & (remaining > 0) & (nxt_pos < max_len)
    st = DecodeState(
        token_b=jnp.where(act, token_b, st.token_b),
        pos_b=jnp.where(act, nxt_pos, st.pos_b),
        remaining_b=remaining, active_b=still,
        adapter_idx_b=st.adapter_idx_b)
    toks = toks.at[:, i].set(token_b)
    lps = lps.at[:, i].set(logprob_b)
    valid = valid.at[:, i].set(act)
    top_ids = top_ids.at[:, i, :ids_bk.shape[-1]].set(ids_bk)
    top_lps = top_lps.at[:, i, :tlp_bk.shape[-1]].set(tlp_bk)
    return i + 1, cache, st, toks, lps, valid, top_ids, top_lps

  k = min(k, config.vocab_size)
  init = (jnp.int32(0), cache, state, jnp.zeros((b, steps), jnp.int32),
          jnp.zeros((b, steps), jnp.float32), jnp.zeros((b, steps), bool),
          jnp.zeros((b, steps, k), jnp.int32),
          jnp.zeros((b, steps, k), jnp.float32))
  _, cache, state, toks, lps, valid, top_ids, top_lps = jax.lax.while_loop(
      cond, body, init)
  return cache, state, toks, lps, valid, top_ids, top_lps


def _rules(mesh: Mesh | None, rules=None):
  if mesh is None:
    return contextlib.nullcontext()
  return sharding.use_mesh_rules(mesh, rules)


def cache_sharding(config: ModelConfig, batch: int, max_len: int,
                   mesh: Mesh | None, dtype: str | None = None, *,
                   rules=None):
  """The serving cache's shardings on `mesh` (None without a mesh)."""
  if mesh is None:
    return None
  return sharding.logical_sharding(
      cache_logical_axes(), cache_shapes(config, batch, max_len, dtype), mesh,
      rules)


def make_step_fns(config: ModelConfig, *, batch: int, max_len: int,
                  steps_per_call: int, lora_impl: str = "auto",
                  mesh: Mesh | None = None,
                  cache_dtype: str | None = None, rules=None) -> StepFns:
  """Builds the jitted prefill and decode steps for one engine.

  Prefill is one jitted function; it compiles once per (prefill rows,
  bucket) shape, which the engine warms up for every bucket. The KV cache is
  donated to both steps.

  Args:
    config: base model config.
    batch: B, sequence rows of the serving cache.
    max_len: S, cache length.
    steps_per_call: N, decode steps per device call.
    lora_impl: gather-LoRA implementation for `llama.forward`.
    mesh: optional device mesh; parameters, bank and cache are expected to
      be placed by their logical axes already.
    cache_dtype: KV cache dtype (default: the model dtype).
    rules: logical-axis rules for the activation constraints and the cache
      (default `sharding.DEFAULT_RULES`); params, bank and cache must be
      placed with the same rules.
  """
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
  prefill_kw, decode_kw = {}, {}
  if mesh is not None:
    c_sh = cache_sharding(config, batch, max_len, mesh, cache_dtype,
                          rules=rules)
    rep = sharding.replicated(mesh)
    prefill_kw = dict(out_shardings=(c_sh, rep, rep, rep, rep))
    decode_kw = dict(out_shardings=(c_sh, rep, rep, rep, rep, rep, rep))
  prefill = jax.jit(
      lambda *a: _prefill(*a, config=config, lora_impl=lora_impl, mesh=mesh,
                          rules=rules),
      donate_argnums=(2,), **prefill_kw)
  decode = jax.jit(
      lambda *a, lora_rank=None: _decode(
          *a, config=config, lora_impl=lora_impl, steps=steps_per_call,
          mesh=mesh, rules=rules, lora_rank=lora_rank),
      donate_argnums=(2,), static_argnames=("lora_rank",), **decode_kw)
  score = jax.jit(lambda *a: _score(*a, config=config, lora_impl=lora_impl,
                                    mesh=mesh, rules=rules))
  return StepFns(prefill=prefill, decode=decode, steps_per_call=steps_per_call,
                 score=score)


def compiled_count(fns: StepFns) -> int:
  """Programs compiled so far by the steps (jit cache entries)."""
  return fns.prefill._cache_size() + fns.decode._cache_size()  # pylint: disable=protected-access


# Every XLA compilation in the process (any jitted function, including slot
# writes and stray eager ops), counted from JAX's monitoring events. The
# listener is registered by the first `backend_compiles()` call (the engine
# makes one when it is built), not at import: importing mintjax changes no
# global JAX state.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_backend_compiles = [0]
_listening = [False]


def _on_duration_event(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == _BACKEND_COMPILE_EVENT:
    _backend_compiles[0] += 1


def backend_compiles() -> int:
  """XLA compilations in this process since the first call (all functions).

  Only differences between two calls are meaningful: the first call starts
  the count (it registers a `jax.monitoring` listener, once per process).
  """
  if not _listening[0]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
    _listening[0] = True
  return _backend_compiles[0]
