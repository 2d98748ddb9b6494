"""Cohorts: more users than slots, trained a slot-bank-full at a time.

Owns `plan_cohorts` (users -> fixed-size groups), `SlotMap` (slot <-> user
for the cohort currently in the bank, with checks), `init_adapter` (a new
user's adapter initialised like PEFT: A random, B zero, so a fresh adapter is
exactly the base model) and `cohort_bank` (the host-built bank holding one
cohort, placed with the step's shardings). `init_cohort` + `cohort_state`
are the one way to set a cohort up for training (slot map, bank, optimizer
state), shared by the training workflow, the scaling study and the
benchmarks. Loading the next cohort replaces array values only; the compiled
step is reused. For `AdapterSpec(variant=
'vera')` a new adapter is initialised per the VeRA paper (lambda_b = 0,
lambda_d = 0.1: again exactly the base model), the cohort bank is a
`VeraBank`, and `read_adapter` reads a slot back as `VeraWeights`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Mapping, Sequence

import jax
import numpy as np

from mintjax.adapters.bank import AdapterBank, bank_from_weights, read_slot
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.adapters.vera import (VeraBank, VeraWeights, read_vera_slot,
                                   vera_bank_from_weights)
from mintjax.config import ModelConfig
from mintjax.train import optimizer as opt_lib


class SlotMapError(KeyError):
  """A user is not (or cannot be) mapped to a bank slot."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0])


def plan_cohorts(users: Sequence[str], slots_per_cohort: int
                 ) -> list[list[str]]:
  """Splits sorted unique users into cohorts of at most `slots_per_cohort`."""
  if slots_per_cohort < 1:
    raise ValueError(
        f"need at least one trainable slot per cohort, got {slots_per_cohort}"
        "; num_slots must be >= 2 (slot 0 is the null adapter)")
  users = sorted(set(users))
  return [users[i:i + slots_per_cohort]
          for i in range(0, len(users), slots_per_cohort)]


@dataclasses.dataclass(frozen=True)
class SlotMap:
  """Which user occupies which slot (slot 0 is the null adapter).

  Attributes:
    slot_of_user: user -> slot in 1..num_slots-1.
    num_slots: bank slots S.
  """

  slot_of_user: Mapping[str, int]
  num_slots: int

  @classmethod
  def for_cohort(cls, users: Sequence[str], num_slots: int) -> "SlotMap":
    if len(users) > num_slots - 1:
      raise SlotMapError(
          f"cohort of {len(users)} users does not fit {num_slots - 1} "
          f"trainable slots; use smaller cohorts or more slots")
    return cls({u: i + 1 for i, u in enumerate(users)}, num_slots)

  def slot(self, user: str) -> int:
    try:
      return self.slot_of_user[user]
    except KeyError:
      raise SlotMapError(
          f"unknown user {user!r}: the slot map holds "
          f"{sorted(self.slot_of_user)}; load the user's cohort first"
      ) from None

  @property
  def users(self) -> list[str]:
    return list(self.slot_of_user)

  def to_json(self) -> dict:
    return {"slot_of_user": dict(self.slot_of_user),
            "num_slots": self.num_slots}

  @classmethod
  def from_json(cls, d: Mapping) -> "SlotMap":
    return cls(dict(d["slot_of_user"]), int(d["num_slots"]))


def _seed_for(seed: int, user: str) -> int:
  digest = hashlib.sha256(f"init:{seed}:{user}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


def init_adapter(config: ModelConfig, targets: Sequence[str], rank: int,
                 alpha: float, user: str, seed: int, *,
                 use_rslora: bool = False) -> AdapterWeights:
  """A fresh adapter initialised like PEFT (seeded by seed and user).

  A is Kaiming-uniform (PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e.
  U(-1/sqrt(d_in), 1/sqrt(d_in))) and B is zero, so the new adapter leaves
  the base model's outputs unchanged until it is trained.
  """
  rng = np.random.default_rng(_seed_for(seed, user))
  a, b = {}, {}
  for t in targets:
    d_in, d_out = config.projection_shape(t)
    bound = 1.0 / math.sqrt(d_in)
    a[t] = rng.uniform(-bound, bound, (config.num_layers, d_in, rank)
                       ).astype(np.float32)
    b[t] = np.zeros((config.num_layers, rank, d_out), np.float32)
  return AdapterWeights(a, b, rank=rank, alpha=float(alpha),
                        use_rslora=use_rslora)


def init_for_spec(config: ModelConfig, spec: AdapterSpec, rank: int,
                  alpha: float, user: str, seed: int, *,
                  use_rslora: bool = False) -> AdapterWeights | VeraWeights:
  """A fresh adapter of the spec's variant (see `init_adapter`)."""
  if spec.variant == "vera":
    return VeraWeights.init(config, spec.targets, rank, spec.basis_seed,
                            alpha=alpha)
  return init_adapter(config, spec.targets, rank, alpha, user, seed,
                      use_rslora=use_rslora)


def read_adapter(spec: AdapterSpec, bank, slot: int, alpha: float,
                 use_rslora: bool = False) -> AdapterWeights | VeraWeights:
  """One slot of a (host) cohort bank as the weights the registry stores."""
  if isinstance(bank, VeraBank):
    return read_vera_slot(bank, slot, spec.basis_seed, alpha=alpha)
  return read_slot(bank, slot, alpha=alpha, use_rslora=use_rslora)


def cohort_bank(config: ModelConfig, spec: AdapterSpec, slot_map: SlotMap,
                weights_of_user: Mapping[str, AdapterWeights | VeraWeights],
                shardings=None) -> AdapterBank | VeraBank:
  """The bank holding one cohort's adapters (empty slots are null).

  Args:
    config: base config.
    spec: bank spec.
    slot_map: the cohort's slots.
    weights_of_user: initial weights of every user in the slot map.
    shardings: optional bank shardings to place the result with.
  """
  missing = [u for u in slot_map.users if u not in weights_of_user]
  if missing:
    raise SlotMapError(f"no initial weights for users {missing}")
  build = vera_bank_from_weights if spec.variant == "vera" else (
      bank_from_weights)
  bank = build(config, spec, {
      slot_map.slot(u): weights_of_user[u] for u in slot_map.users})
  if shardings is not None:
    bank = place_on_mesh(bank, shardings)
  return bank


def place_on_mesh(tree, shardings):
  """Host arrays -> global arrays laid out by `shardings`.

  Every process must pass the same host values; each one fills only its own
  shards, so this works unchanged on one host and on many (unlike
  `jax.device_put`, which needs the whole array on every process).
  """
  host = jax.tree.map(np.asarray, tree)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
      host, shardings)


def zero_opt_state(bank) -> opt_lib.SlotOptState:
  """Host zeros shaped like the optimizer state of `bank` (any process)."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                      jax.eval_shape(opt_lib.init_opt_state, bank))


def init_cohort(config: ModelConfig, spec: AdapterSpec, users: Sequence[str],
                *, alpha: float | None, seed: int = 0,
                use_rslora: bool = False
                ) -> dict[str, AdapterWeights | VeraWeights]:
  """Fresh adapters of rank `spec.max_rank` for `users` (`init_for_spec`).

  `alpha` None is allowed for VeRA only (its own default, alpha = r).
  """
  return {u: init_for_spec(config, spec, spec.max_rank, alpha, u, seed,
                           use_rslora=use_rslora) for u in users}


@dataclasses.dataclass(frozen=True)
class CohortState:
  """One cohort set up for training.

  Attributes:
    slot_map: user <-> slot (slot 0 is the null adapter).
    bank: `AdapterBank` or `VeraBank` with [S, ...] leaves holding the
      cohort's adapters (empty slots null).
    opt: `SlotOptState`, zero moments and counters for every slot.
  """

  slot_map: SlotMap
  bank: AdapterBank | VeraBank
  opt: opt_lib.SlotOptState


def cohort_state(config: ModelConfig, spec: AdapterSpec, users: Sequence[str],
                 weights_of_user: Mapping[str, AdapterWeights | VeraWeights],
                 *, shardings=None) -> CohortState:
  """The slot map, bank and fresh optimizer state of one cohort.

  Args:
    config: base config.
    spec: bank spec (S = spec.num_slots slots, users take slots 1..).
    users: the cohort, in slot order.
    weights_of_user: starting weights of every user (`init_cohort` for new
      users, registry revisions for known ones).
    shardings: optional (bank shardings, optimizer shardings), e.g.
      `TrainStep.state_shardings[1:]`; None leaves host numpy arrays.
  """
  slot_map = SlotMap.for_cohort(users, spec.num_slots)
  bank_sh, opt_sh = shardings if shardings is not None else (None, None)
  bank = cohort_bank(config, spec, slot_map, weights_of_user, bank_sh)
  opt = zero_opt_state(bank)
  if opt_sh is not None:
    opt = place_on_mesh(opt, opt_sh)
  return CohortState(slot_map, bank, opt)
