"""Sampling parameters and the on-device token sampler.

Owns `SamplingParams` (validated per request on the host), `RowSampling`
(the same parameters as fixed-shape per-row arrays, an argument of every
compiled step), `sample` (greedy / temperature / top-k / top-p sampling
of one token per row, with the chosen token's log-probability) and
`top_logprobs` (the MAX_TOP_LOGPROBS most likely tokens per row, computed
only when some row asked for them).

Randomness is reproducible per request whatever batch it rides in: row b's
key at position p is `fold_in(PRNGKey(seed_b), p)`, so the same request with
the same seed samples the same tokens alone or in a full batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Stop token ids per row on device (eos ids included); more is a request
# error.
MAX_STOP_TOKENS = 8
# Most likely tokens reported per position (OpenAI's limit is 20 too); the
# steps always compute this many, so the compiled shapes never depend on a
# request.
MAX_TOP_LOGPROBS = 20


class SamplingError(ValueError):
  """Sampling parameters are invalid."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded.

  Attributes:
    max_new_tokens: generated tokens at most (>= 1).
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of tokens whose probability reaches p
      (1.0 = no limit).
    seed: per-request random seed (ignored when greedy).
    stop: stop strings; the output is cut before the first match.
    stop_token_ids: token ids that end generation (the tokenizer's eos ids
      are always among them unless `ignore_eos`).
    ignore_eos: do not stop at the tokenizer's eos ids.
    top_logprobs: for each generated token, also report this many most
      likely tokens with their log-probabilities (0..MAX_TOP_LOGPROBS;
      `GenerationResult.top_logprobs`).
    prompt_logprobs: None, or report each prompt token's log-probability
      given the tokens before it, plus this many most likely tokens per
      position (0..MAX_TOP_LOGPROBS; `GenerationResult.prompt_logprobs`).
      Costs one more forward pass over the prompt.
  """

  max_new_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  top_logprobs: int = 0
  prompt_logprobs: int | None = None

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise SamplingError(
          f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if (not isinstance(self.temperature, (int, float)) or
        not math.isfinite(self.temperature) or self.temperature < 0):
      raise SamplingError(
          f"temperature must be a finite number >= 0 (0 = greedy), got "
          f"{self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise SamplingError(
          f"top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
    if (not isinstance(self.top_p, (int, float)) or
        not 0.0 < self.top_p <= 1.0):
      raise SamplingError(
          f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      raise SamplingError(f"seed must be an int in [0, 2**31), got "
                          f"{self.seed!r}")
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise SamplingError(
          f"stop must be non-empty strings, got {list(self.stop)!r}")
    if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
      raise SamplingError(
          f"stop_token_ids must be non-negative ints, got "
          f"{list(self.stop_token_ids)!r}")
    for name in ("top_logprobs", "prompt_logprobs"):
      v = getattr(self, name)
      if v is None and name == "prompt_logprobs":
        continue
      if (isinstance(v, bool) or not isinstance(v, int) or
          not 0 <= v <= MAX_TOP_LOGPROBS):
        raise SamplingError(
            f"{name} must be an int in [0, {MAX_TOP_LOGPROBS}]"
            f"{' or None' if name == 'prompt_logprobs' else ''}, got {v!r}")
    if len(self.stop_token_ids) > MAX_STOP_TOKENS - 1:
      raise SamplingError(
          f"at most {MAX_STOP_TOKENS - 1} stop_token_ids are supported, got "
          f"{len(self.stop_token_ids)}; use stop strings for the rest")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def stop_ids(self, eos_ids: int | Sequence[int] | None, vocab_size: int
               ) -> tuple[int, ...]:
    """The stop ids a row carries on device (eos ids first unless ignored).

    Args:
      eos_ids: the tokenizer's eos id or ids (`Tokenizer.eos_ids`), or None.
      vocab_size: ids must be below it.

    Raises:
      SamplingError: an id outside the vocabulary, or more than
        MAX_STOP_TOKENS ids in all.
    """
    if eos_ids is None or self.ignore_eos:
      eos_ids = ()
    elif isinstance(eos_ids, (int, np.integer)):
      eos_ids = (int(eos_ids),)
    ids = list(dict.fromkeys(list(eos_ids) + list(self.stop_token_ids)))
    bad = [t for t in ids if t >= vocab_size]
    if bad:
      raise SamplingError(
          f"stop_token_ids {bad} are outside the vocabulary of size "
          f"{vocab_size}")
    if len(ids) > MAX_STOP_TOKENS:
      raise SamplingError(
          f"{len(ids)} stop token ids (the model's eos ids {list(eos_ids)} "
          f"plus stop_token_ids) exceed the {MAX_STOP_TOKENS} a row holds; "
          "pass fewer stop_token_ids or use stop strings for the rest")
    return tuple(ids)

  @classmethod
  def from_dict(cls, d) -> "SamplingParams":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise SamplingError(
          f"unknown sampling parameters {sorted(unknown)}; known: "
          f"{sorted(known)}")
    return cls(**d)


@flax.struct.dataclass
class RowSampling:
  """Per-row sampling parameters as arrays (B rows).

  Attributes:
    temperature_b: [B] float32 (0 = greedy).
    top_k_b: [B] int32 (0 = no limit).
    top_p_b: [B] float32.
    seed_b: [B] uint32.
    stop_bk: [B, MAX_STOP_TOKENS] int32 stop ids, -1 padded.
    top_logprobs_b: [B] int32 top log-probabilities the row wants (0: none;
      the steps skip the top-k work when every row has 0).
  """

  temperature_b: jax.Array
  top_k_b: jax.Array
  top_p_b: jax.Array
  seed_b: jax.Array
  stop_bk: jax.Array
  top_logprobs_b: jax.Array


def empty_rows(batch: int) -> RowSampling:
  """Host (numpy) row parameters for `batch` idle rows: greedy, no stops."""
  return RowSampling(
      temperature_b=np.zeros((batch,), np.float32),
      top_k_b=np.zeros((batch,), np.int32),
      top_p_b=np.ones((batch,), np.float32),
      seed_b=np.zeros((batch,), np.uint32),
      stop_bk=np.full((batch, MAX_STOP_TOKENS), -1, np.int32),
      top_logprobs_b=np.zeros((batch,), np.int32))


def set_row(rows: RowSampling, b: int, params: SamplingParams,
            stop_ids: Sequence[int]) -> None:
  """Writes one request's parameters into row b of host arrays in place."""
  rows.temperature_b[b] = params.temperature
  rows.top_k_b[b] = params.top_k
  rows.top_p_b[b] = params.top_p
  rows.seed_b[b] = params.seed
  rows.stop_bk[b] = -1
  rows.stop_bk[b, :len(stop_ids)] = stop_ids
  rows.top_logprobs_b[b] = params.top_logprobs


def _filtered_logits(logits_bv, rows: RowSampling):
  """Temperature-scaled logits with top-k / top-p masked to -inf."""
  vocab = logits_bv.shape[-1]
  temp_b = jnp.maximum(rows.temperature_b, 1e-6)
  scaled = logits_bv / temp_b[:, None]
  sorted_bv = -jnp.sort(-scaled, axis=-1)  # descending
  k_b = jnp.where(rows.top_k_b > 0, jnp.minimum(rows.top_k_b, vocab), vocab)
  kth_b = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)
  # top-p over the sorted distribution: keep a token while the mass strictly
  # before it is below p, so the most likely token always survives.
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_sorted = mass_before < rows.top_p_b[:, None]
  num_keep_b = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
  pth_b = jnp.take_along_axis(sorted_bv, (num_keep_b - 1)[:, None], axis=-1)
  threshold = jnp.maximum(kth_b, pth_b)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits_bv, rows: RowSampling, pos_b):
  """Samples one token per row.

  Args:
    logits_bv: [B, V] float32 logits for the next token.
    rows: per-row sampling parameters.
    pos_b: [B] int32 position the sampled token will occupy (keys the RNG).

  Returns:
    (token_b [B] int32, logprob_b [B] float32): the token and its
    log-probability under the model's unmodified distribution.
  """
  logits_bv = logits_bv.astype(jnp.float32)
  vocab = logits_bv.shape[-1]
  # argmax as two plain reductions (the max, then the first index holding
  # it): XLA:CPU's variadic argmax reduction over [B, V] cost ~1.4 ms of a
  # ~45 ms SmolLM2 decode step. A NaN row (no index equals its max) gets
  # the last id rather than one out of range.
  max_b = jnp.max(logits_bv, axis=-1)
  ids_bv = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, 1)
  greedy_b = jnp.min(jnp.where(logits_bv == max_b[:, None], ids_bv, vocab - 1),
                     axis=-1)

  def draw(_):
    filtered = _filtered_logits(logits_bv, rows)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(
        rows.seed_b, pos_b)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(rows.temperature_b > 0, drawn, greedy_b)

  # An all-greedy batch (the common serving case) skips the vocabulary sort.
  token_b = jax.lax.cond(jnp.any(rows.temperature_b > 0), draw,
                         lambda _: greedy_b, None)
  # log p(token) from two reductions, no [B, V] array; the operations and
  # their order are `jax.nn.log_softmax`'s, so the value equals the one
  # `top_logprobs` reports for the same token.
  log_sum_b = jnp.log(jnp.sum(jnp.exp(logits_bv - max_b[:, None]), axis=-1))
  logit_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
  return token_b, (logit_b - max_b) - log_sum_b


def is_stop(token_b, rows: RowSampling):
  """[B] bool: the token is one of the row's stop ids."""
  return jnp.any(token_b[:, None] == rows.stop_bk, axis=-1)


def top_logprobs(logits_bv, rows: RowSampling):
  """The MAX_TOP_LOGPROBS most likely tokens per row, best first.

  Computed only when some row asked (`rows.top_logprobs_b > 0`); otherwise
  zeros come back without touching the vocabulary, so requests that want
  none pay one `any` per step.

  Args:
    logits_bv: [B, V] logits for the next token.
    rows: per-row sampling parameters.

  Returns:
    (ids_bk [B, K] int32, logprobs_bk [B, K] float32), K = MAX_TOP_LOGPROBS,
    log-probabilities under the model's unmodified distribution.
  """
  b, k = logits_bv.shape[0], min(MAX_TOP_LOGPROBS, logits_bv.shape[-1])

  def compute(_):
    lp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    lp_bk, ids_bk = jax.lax.top_k(lp_bv, k)
    return ids_bk.astype(jnp.int32), lp_bk

  def skip(_):
    return jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

  return jax.lax.cond(jnp.any(rows.top_logprobs_b > 0), compute, skip, None)


def top_pairs(ids_k, logprobs_k, n: int) -> list[tuple[int, float]]:
  """The first n (token id, logprob) pairs of one position (host side)."""
  return [(int(ids_k[j]), float(logprobs_k[j])) for j in range(n)]
