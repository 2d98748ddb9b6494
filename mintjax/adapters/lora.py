"""The LoRA family: an adapter is its A/B factors, the bank stores them as is.

Owns `LoraFamily` (`FAMILY`, registered as 'lora'): a new adapter is
initialised like PEFT (A Kaiming-uniform, B zero, so it leaves the base
model unchanged until trained), a stored row holds A [L, d_in, r] then
B [L, r, d_out] per target, the trainer's bank is the serving `AdapterBank`
itself with both factors trained, and padding past a slot's true rank is
masked out of the gradients. PEFT LoRA folders map onto it key for key
(`mintjax.store.peft_io`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.family import AdapterFamily
from mintjax.adapters.spec import (AdapterError, AdapterInfo, AdapterWeights,
                                   BankSpec, factor_shapes)
from mintjax.config import ModelConfig


def _seed_for(seed: int, user: str) -> int:
  digest = hashlib.sha256(f"init:{seed}:{user}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


def init_lora(config: ModelConfig, info: AdapterInfo, *, user: str,
              seed: int) -> AdapterWeights:
  """A fresh adapter initialised like PEFT (seeded by seed and user).

  A is Kaiming-uniform (PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e.
  U(-1/sqrt(d_in), 1/sqrt(d_in))) and B is zero, so the new adapter leaves
  the base model's outputs unchanged until it is trained.

  Returns:
    AdapterWeights with A[t]: [L, d_in, r] and B[t]: [L, r, d_out] float32
    (routed-expert targets: [L, E, d_in, r] and [L, E, r, d_out]).
  """
  rng = np.random.default_rng(_seed_for(seed, user))
  a, b = {}, {}
  for t in info.targets:
    shape_a, shape_b = factor_shapes(config, t, info.rank)
    bound = 1.0 / math.sqrt(shape_a[-2])
    a[t] = rng.uniform(-bound, bound, shape_a).astype(np.float32)
    b[t] = np.zeros(shape_b, np.float32)
  return AdapterWeights(a, b, rank=info.rank, alpha=info.alpha,
                        use_rslora=info.use_rslora)


class LoraFamily(AdapterFamily):
  """LoRA (Hu et al., 2021): y = x W + scale * (x A) B."""

  name = "lora"
  tensor_names = ("lora_a", "lora_b")
  weights_type = AdapterWeights
  bank_type = bank_lib.AdapterBank
  supports_rslora = True

  def init(self, config, info, *, user, seed):
    return init_lora(config, info, user=user, seed=seed)

  def stored_shapes(self, rank, shape):
    # shape is (L, d_in, d_out), or (L, E, d_in, d_out) for routed experts.
    *lead, d_in, d_out = shape
    return (*lead, d_in, rank), (*lead, rank, d_out)

  def shapes_of(self, weights):
    shapes = {}
    for t in weights.lora_a:
      if t not in weights.lora_b:
        raise AdapterError(f"lora_b lacks target {t!r} that lora_a has")
      a, b = np.shape(weights.lora_a[t]), np.shape(weights.lora_b[t])
      if len(a) not in (3, 4) or len(b) != len(a) or a[:-2] != b[:-2]:
        raise AdapterError(
            f"lora_a[{t!r}] {a} / lora_b[{t!r}] {b} must be [L, d_in, r] / "
            "[L, r, d_out] (routed experts: [L, E, d_in, r] / "
            "[L, E, r, d_out])")
      shapes[t] = (*a[:-1], b[-1])
    return shapes

  def tensors(self, weights):
    return weights.lora_a, weights.lora_b

  def from_tensors(self, info, first, second, meta):
    # The loader has folded PEFT's per-module scales into B already
    # (`mintjax.store.peft_io.fold_b_scale`): the factors are as used.
    del meta
    return AdapterWeights(dict(first), dict(second), rank=info.rank,
                          alpha=info.alpha, use_rslora=info.use_rslora)

  def to_lora(self, weights, shapes):
    del shapes
    return weights

  def bank_shapes(self, config, spec: BankSpec):
    return bank_lib.bank_shapes(config, spec)

  def bank_logical_axes(self, spec: BankSpec):
    return bank_lib.bank_logical_axes(spec)

  def bank_from_weights(self, config, spec: BankSpec,
                        weights: Mapping[int, AdapterWeights]):
    return bank_lib.bank_from_weights(config, spec, weights)

  def read_slot(self, bank, slot, info):
    return bank_lib.read_slot(bank, slot, alpha=info.alpha,
                              use_rslora=info.use_rslora)

  def trainable(self, bank):
    return {"lora_a": bank.lora_a, "lora_b": bank.lora_b}

  def rank_mask(self, bank):
    keep_sr = (jnp.arange(bank.max_rank)[None, :] < bank.rank[:, None]
               ).astype(jnp.float32)
    s, r = keep_sr.shape
    # A [S, L, (E,) d_in, R] and B [S, L, (E,) R, d_out].
    mask_a = lambda x: keep_sr.reshape(s, *(1,) * (x.ndim - 2), r)
    mask_b = lambda x: keep_sr.reshape(s, *(1,) * (x.ndim - 3), r, 1)
    return {"lora_a": {t: mask_a(x) for t, x in bank.lora_a.items()},
            "lora_b": {t: mask_b(x) for t, x in bank.lora_b.items()}}

  def to_lora_bank(self, bank):
    return bank

  def peft_factors(self, info, first, second, shapes):
    # Written as stored: per-layer B factors stay in the revision's meta.
    del shapes
    return info, first, second


FAMILY = LoraFamily()
