"""Cohorts: more users than slots, trained a slot-bank-full at a time.

Owns `plan_cohorts` (users -> fixed-size groups), `SlotMap` (slot <-> user
for the cohort currently in the bank, with checks), `init_for_spec` (a new
user's adapter as its family initialises it: LoRA like PEFT, A random and B
zero; VeRA per its paper, lambda_b = 0; either way exactly the base model)
and `cohort_bank` (the host-built bank of the spec's family holding one
cohort, placed with the step's shardings). `init_cohort` + `cohort_state`
are the one way to set a cohort up for training (slot map, bank, optimizer
state), shared by the training workflow, the scaling study and the
benchmarks. Loading the next cohort replaces array values only; the compiled
step is reused. Everything family-specific (init, the trainer's bank type,
reading a slot back as the weights the store keeps) is asked of the bank
spec's family (`mintjax.adapters.family`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from mintjax.adapters.family import HostWeights, TrainerBank
from mintjax.adapters.lora import init_lora
from mintjax.adapters.spec import AdapterInfo, AdapterWeights, BankSpec
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


def init_adapter(config: ModelConfig, targets: Sequence[str], rank: int,
                 alpha: float, user: str, seed: int, *,
                 use_rslora: bool = False) -> AdapterWeights:
  """A fresh LoRA adapter initialised like PEFT (seeded by seed and user):
  A Kaiming-uniform, B zero (`mintjax.adapters.lora.init_lora`)."""
  return init_lora(config, AdapterInfo(tuple(targets), rank, alpha,
                                       use_rslora), user=user, seed=seed)


def init_for_spec(config: ModelConfig, spec: BankSpec, rank: int,
                  alpha: float, user: str, seed: int, *,
                  use_rslora: bool = False) -> HostWeights:
  """A fresh adapter of the bank spec's family (its `init`)."""
  info = AdapterInfo.for_bank(spec, alpha=alpha, rank=rank,
                              use_rslora=use_rslora)
  return spec.family.init(config, info, user=user, seed=seed)


def read_adapter(spec: BankSpec, bank: TrainerBank, slot: int, alpha: float,
                 use_rslora: bool = False) -> HostWeights:
  """One slot of a (host) cohort bank as the weights the registry stores
  (the family's host weights, at the slot's true rank)."""
  info = AdapterInfo.for_bank(spec, alpha=alpha, rank=int(bank.rank[slot]),
                              use_rslora=use_rslora)
  return spec.family.read_slot(bank, slot, info)


def cohort_bank(config: ModelConfig, spec: BankSpec, slot_map: SlotMap,
                weights_of_user: Mapping[str, HostWeights], shardings=None
                ) -> TrainerBank:
  """The trainer's bank (of the spec's family) holding one cohort's adapters
  (empty slots are null).

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
  bank = spec.family.bank_from_weights(config, spec, {
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


def init_cohort(config: ModelConfig, spec: BankSpec, users: Sequence[str],
                *, alpha: float, seed: int = 0, use_rslora: bool = False
                ) -> dict[str, HostWeights]:
  """Fresh adapters of rank `spec.max_rank` for `users` (`init_for_spec`)."""
  return {u: init_for_spec(config, spec, spec.max_rank, alpha, u, seed,
                           use_rslora=use_rslora) for u in users}


@dataclasses.dataclass(frozen=True)
class CohortState:
  """One cohort set up for training.

  Attributes:
    slot_map: user <-> slot (slot 0 is the null adapter).
    bank: the trainer's bank of the spec's family (LoRA `AdapterBank`,
      VeRA `VeraBank`) with [S, ...] leaves holding the cohort's adapters
      (empty slots null).
    opt: `SlotOptState`, zero moments and counters for every slot.
  """

  slot_map: SlotMap
  bank: TrainerBank
  opt: opt_lib.SlotOptState


def cohort_state(config: ModelConfig, spec: BankSpec, users: Sequence[str],
                 weights_of_user: Mapping[str, HostWeights],
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
