"""Scale Down and Scale Up: train many adapter shapes on one personal workload.

Owns `Arm` (one adapter shape class: variant, rank, target projections, its
stored bytes), `make_workload` (the personal-facts data set of
`mintjax.apps.personal_data`, tokenized once for a base's tokenizer) and
`train_arm`, which trains one adapter per user for a fixed number of steps
through the real compiled multi-tenant train step (`make_train_step`, one
bank of `num_users + 1` slots, per-slot AdamW) and scores held-out exact match
(paraphrased questions) and train-prompt recall every `eval_every` steps with
`evaluate_jobs`. `steps_to` reads the first step at which a curve reaches a
level. Scale Down sweeps arms on one base; Scale Up trains the same arms on
the pretrained base and on a randomly initialised twin of the same shape
(`random_twin`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from mintjax import sharding
from mintjax.adapters.spec import ALL_TARGETS, BankSpec
from mintjax.apps.personal_data import make_personal_data
from mintjax.eval.evaluate import evaluate_jobs
from mintjax.model.base import BaseModel, random_base
from mintjax.train import data as data_lib
from mintjax.train import optimizer as opt_lib
from mintjax.train.cohort import cohort_state, init_cohort
from mintjax.train.step import Batch, StepConfig, make_train_step

QV = ("q", "v")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One adapter shape class of the sweep.

  Attributes:
    rank: adapter rank r.
    targets: projections carrying the adapter.
    variant: the bank spec's adapter family ('lora', or 'vera' where
      supported).
    scale: alpha / r of every adapter of the arm (LoRA arms use 2; VeRA's
      paper has no alpha, so its arm uses 1, i.e. alpha = r).
  """

  rank: int
  targets: tuple[str, ...] = QV
  variant: str = "lora"
  scale: float = 2.0

  @property
  def name(self) -> str:
    t = "qv" if tuple(self.targets) == QV else (
        "all7" if tuple(self.targets) == ALL_TARGETS else
        "".join(self.targets))
    # Arms of the default family keep their published names ('r1-qv').
    prefix = "" if self.variant == Arm.variant else f"{self.variant}-"
    return f"{prefix}r{self.rank}-{t}"

  @property
  def alpha(self) -> float:
    return float(self.scale * self.rank)

  def spec(self, num_slots: int) -> BankSpec:
    return BankSpec(targets=tuple(self.targets), max_rank=self.rank,
                    num_slots=num_slots, variant=self.variant)

  def adapter_bytes(self, config) -> int:
    """Per-user stored bytes (float32) of one adapter of this arm."""
    return int(self.spec(2).params_per_adapter(config, self.rank)) * 4


@dataclasses.dataclass(frozen=True)
class Workload:
  """The personal-facts workload tokenized for one tokenizer.

  Attributes:
    users: user ids.
    train: user -> training examples (3 phrasings per fact).
    heldout: user -> held-out examples (an unseen paraphrase per fact).
    num_train_records: training records over all users.
  """

  users: tuple[str, ...]
  train: Mapping[str, list]
  heldout: Mapping[str, list]
  num_train_records: int


def make_workload(tokenizer, num_users: int, seed: int = 0,
                  facts: Sequence[str] = ("cat", "hometown", "color"),
                  max_length: int = 64) -> Workload:
  """Generates and tokenizes the personal workload (raw prompt style)."""
  train, heldout, _ = make_personal_data(num_users, seed, facts)
  group = lambda recs: {u: [r for r in recs if r["user"] == u]
                        for u in sorted({r["user"] for r in recs})}
  tr = data_lib.load_examples(group(train), tokenizer, max_length, "error")
  ho = data_lib.load_examples(group(heldout), tokenizer, max_length, "error")
  return Workload(tuple(sorted(tr)), tr, ho, len(train))


def random_twin(base: BaseModel, seed: int = 1) -> BaseModel:
  """A randomly initialised model with the base's shape and tokenizer."""
  return random_base(base.config, seed=seed, tokenizer=base.tokenizer)


def mesh_for_batch(batch_size: int):
  """An fsdp mesh over as many devices as evenly split `batch_size` rows.

  Batch rows shard over the mesh, so a batch smaller than (or not a
  multiple of) the device count runs on the largest dividing subset.
  """
  n = len(jax.devices())
  while batch_size % n:
    n -= 1
  return sharding.make_mesh(fsdp=-1, devices=jax.devices()[:n])


def bucket_for(workload: Workload) -> int:
  """The one length bucket every example fits (a multiple of 8)."""
  longest = max(len(e.tokens) - 1 for exs in (*workload.train.values(),
                                              *workload.heldout.values())
                for e in exs)
  return -(-longest // 8) * 8


def _score(base, host_bank, slot_map, workload, batch_size, lora_impl):
  jobs = []
  for u in workload.users:
    jobs.append((("heldout", u), slot_map.slot(u), workload.heldout[u]))
    jobs.append((("train", u), slot_map.slot(u), workload.train[u]))
  res = evaluate_jobs(base, host_bank, jobs, batch_size, lora_impl)
  out = {}
  for kind in ("heldout", "train"):
    rows = [res[(kind, u)] for u in workload.users]
    n = sum(r.num_examples for r in rows)
    out[f"{kind}_em"] = sum(r.exact_match * r.num_examples for r in rows) / n
    tok = sum(r.tokens for r in rows)
    out[f"{kind}_loss"] = sum(r.loss * r.tokens for r in rows) / max(tok, 1)
  return out


def train_arm(base: BaseModel, arm: Arm, workload: Workload, *, steps: int,
              batch_size: int, eval_every: int, learning_rate: float,
              seed: int = 0, lora_impl: str = "auto",
              eval_batch_size: int = 32) -> dict:
  """Trains one adapter per user with `arm`'s shape and records curves.

  Every user's adapter starts PEFT-style (B = 0, so step 0 scores the base)
  and all users train together in one compiled step: a global batch of
  `batch_size` rows cycles through the users, and each user's slot is
  updated only on steps where its examples are present.

  Args:
    base: base model (its tokenizer made `workload`).
    arm: adapter shape class.
    workload: tokenized personal data.
    steps: train steps.
    batch_size: rows per step.
    eval_every: score held-out and train prompts every this many steps (and
      at step 0 and the last step).
    learning_rate: constant AdamW learning rate (gradient clip 1.0).
    seed: adapter init and data order seed.
    lora_impl: gather-LoRA implementation.
    eval_batch_size: rows per evaluation forward.

  Returns:
    A JSON-ready dict: arm fields, adapter_bytes, curve (list of {step,
    heldout_em, train_em, heldout_loss, train_loss}), final held-out and
    train exact match, train seconds and seconds per step.
  """
  if steps < 1 or eval_every < 1:
    raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be "
                     ">= 1")
  cfg = base.config
  users = list(workload.users)
  spec = arm.spec(len(users) + 1)
  mesh = mesh_for_batch(batch_size)
  opt_cfg = opt_lib.OptimizerConfig(learning_rate=learning_rate,
                                    clip_norm=1.0)
  step_fn = make_train_step(cfg, spec, opt_cfg, mesh,
                            StepConfig(lora_impl=lora_impl))
  params_sh, bank_sh, opt_sh = step_fn.state_shardings
  params = jax.device_put(base.params, params_sh)
  # Every user starts from its family's init that leaves the base unchanged
  # (LoRA: B = 0; VeRA: lambda_b = 0 on the shape class's shared basis).
  state = cohort_state(cfg, spec, users, init_cohort(
      cfg, spec, users, alpha=arm.alpha, seed=seed), shardings=(bank_sh,
                                                               opt_sh))
  slot_map, bank, opt = state.slot_map, state.bank, state.opt
  pipeline = data_lib.make_pipeline(
      workload.train, slot_map.slot_of_user, global_batch=batch_size,
      num_steps=steps, buckets=(bucket_for(workload),), seed=seed,
      pad_id=base.tokenizer.pad_id)
  curve = []

  def record(step):
    lora_bank = spec.family.to_lora_bank(bank)
    scores = _score(base, jax.device_get(lora_bank), slot_map, workload,
                    eval_batch_size, lora_impl)
    curve.append(dict(step=step, **scores))

  record(0)
  train_s, compile_s = 0.0, 0.0
  for s, local in enumerate(pipeline.to_iter_dataset()):
    batch = Batch(**{k: jax.device_put(v, getattr(step_fn.batch_sharding, k))
                     for k, v in local.items()})
    t0 = time.perf_counter()
    bank, opt, m = step_fn(params, bank, opt, batch)
    jax.block_until_ready(m["loss"])
    # The first call compiles; it is reported apart from the step time.
    if s == 0:
      compile_s = time.perf_counter() - t0
    else:
      train_s += time.perf_counter() - t0
    if (s + 1) % eval_every == 0 or s + 1 == steps:
      record(s + 1)
  final = curve[-1]
  return dict(
      arm=arm.name, rank=arm.rank, targets=list(arm.targets),
      variant=arm.variant, adapter_bytes=arm.adapter_bytes(cfg),
      users=len(users), steps=steps, batch_size=batch_size,
      learning_rate=learning_rate, curve=curve,
      heldout_em=final["heldout_em"], train_em=final["train_em"],
      first_step_compile_s=compile_s,
      step_s=train_s / max(steps - 1, 1))


def steps_to(curve: Sequence[Mapping], key: str, level: float
             ) -> int | None:
  """First recorded step whose `key` is >= level (None if never)."""
  for point in curve:
    if point[key] >= level - 1e-9:
      return int(point["step"])
  return None


def smallest_reaching(results: Sequence[Mapping], reference: Mapping,
                      fraction: float = 0.95) -> Mapping | None:
  """The arm with the fewest adapter bytes whose held-out exact match is at
  least `fraction` of `reference`'s (None if none is)."""
  level = fraction * reference["heldout_em"]
  ok = [r for r in results if r["heldout_em"] >= level - 1e-9]
  return min(ok, key=lambda r: (r["adapter_bytes"], -r["heldout_em"])
             ) if ok else None
