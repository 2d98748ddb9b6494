"""The multi-tenant training run: cohorts, resume, publish with provenance.

Owns `train_and_publish(config, workdir)`, the application behind
`launch/train.py`. One run is five named steps:

  plan_run        base loaded (`mintjax.model.sources`), every JSONL record
                  validated and tokenized, the run fingerprinted and users
                  split into cohorts of num_slots - 1, all before any step;
                  `check_registry_base` refuses a registry whose adapters
                  were trained on another base.
  start_run       mesh, the one compiled train step, base placed by its
                  logical axes, checkpointer, and the checkpoint to resume
                  from (rerunning the same command resumes).
  cohort_start    each cohort's state (`mintjax.train.cohort.cohort_state`):
                  new users start PEFT-style, known users from their latest
                  revision, or the checkpoint's bank and optimizer on resume.
  train_cohort    `steps_per_cohort` steps; bank, optimizer, data-iterator
                  state and slot map checkpointed every `checkpoint_every`
                  steps (async Orbax).
  evaluate_cohort / publish_cohort
                  at cohort end each user's adapter is evaluated on held-out
                  records and published (all of the cohort or none) with
                  provenance; a cohort already published by this run (same
                  run fingerprint) is skipped, so a resumed run never
                  publishes twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from mintjax import progress as progress_lib
from mintjax import sharding
from mintjax.adapters.spec import AdapterInfo, BankSpec
from mintjax.eval import prompt_format
from mintjax.eval.evaluate import evaluate_jobs
from mintjax.model.base import BaseModel
from mintjax.model.sources import load_base_source
from mintjax.store.errors import UnknownRefError
from mintjax.store.registry import Registry
from mintjax.store.revision import check_base
from mintjax.train import data as data_lib
from mintjax.train import optimizer as opt_lib
from mintjax.train.checkpoint import TrainCheckpointer
from mintjax.train.cohort import (CohortState, SlotMap, cohort_state,
                                  init_cohort, place_on_mesh, plan_cohorts,
                                  read_adapter)
from mintjax.train.step import Batch, StepConfig, TrainStep, make_train_step


def make_spec(cfg) -> BankSpec:
  targets = cfg.lora.targets
  if isinstance(targets, str):
    targets = tuple(t.strip() for t in targets.split(",") if t.strip())
  # lora.variant 'vera' trains VeRA vectors on a frozen basis instead.
  return BankSpec(targets=tuple(targets), max_rank=int(cfg.lora.rank),
                  num_slots=int(cfg.num_slots),
                  variant=str(cfg.lora.get("variant", "lora")),
                  basis_seed=int(cfg.lora.get("basis_seed", 0)))


def make_opt_config(cfg) -> opt_lib.OptimizerConfig:
  return opt_lib.OptimizerConfig(**dict(cfg.optimizer))


# ----------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Everything a run needs, validated before any step.

  Attributes:
    cfg: the run config.
    base: the loaded base.
    spec: bank spec (num_slots, max_rank, targets, variant).
    records / heldout: user -> JSONL records (training / held-out).
    examples / heldout_examples: user -> tokenized examples.
    data_fps: user -> fingerprint of the user's training records.
    run_fp: fingerprint of (base, config, data); marks checkpoints and
      published revisions as this run's.
    cohorts: users per cohort, in training order.
  """

  cfg: ml_collections.ConfigDict
  base: BaseModel
  spec: BankSpec
  records: Mapping[str, list]
  heldout: Mapping[str, list]
  examples: Mapping[str, list]
  heldout_examples: Mapping[str, list]
  data_fps: Mapping[str, str]
  run_fp: str
  cohorts: list[list[str]]

  @property
  def steps(self) -> int:
    return int(self.cfg.steps_per_cohort)

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(int(b) for b in self.cfg.buckets)

  @property
  def loss_window(self) -> int:
    return int(self.cfg.get("loss_window", 0))


def _run_fingerprint(cfg: ml_collections.ConfigDict, base_fp: str,
                     data_fps: dict) -> str:
  h = hashlib.sha256()
  h.update(base_fp.encode())
  h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  h.update(json.dumps(data_fps, sort_keys=True).encode())
  return "sha256:" + h.hexdigest()


def _check_loss_window(examples, window: int) -> None:
  """Refuses examples whose completion does not fit the loss window."""
  worst = None
  for exs in examples.values():
    for e in exs:
      span = len(e.tokens) - 1 - max(e.prompt_len - 1, 0)
      if span > window and (worst is None or span > worst[0]):
        worst = (span, e.source)
  if worst is not None:
    raise data_lib.DataError(
        f"{worst[1]}: the completion (with eos) is {worst[0]} tokens but "
        f"loss_window={window} positions get the LM head; raise "
        f"loss_window to at least {worst[0]} or set it to 0 (head on every "
        "position). Nothing was trained.")


def plan_run(cfg: ml_collections.ConfigDict,
             base: BaseModel | None = None) -> RunPlan:
  """Loads the base and data and checks them; trains nothing."""
  base = base or load_base_source(cfg.base, int(cfg.get("base_seed", 0)))
  if base.tokenizer is None:
    raise ValueError(f"base {cfg.base!r} has no tokenizer; training data "
                     "cannot be tokenized")
  spec = make_spec(cfg)
  make_opt_config(cfg)  # a bad optimizer section fails before any data work
  records = data_lib.read_records(cfg.train_data)
  heldout = (data_lib.read_records(cfg.heldout_data)
             if cfg.get("heldout_data") else {})
  max_length = min(int(cfg.max_length), max(int(b) for b in cfg.buckets))
  examples = data_lib.load_examples(records, base.tokenizer, max_length,
                                    cfg.overflow, cfg.prompt_style)
  heldout_ex = data_lib.load_examples(heldout, base.tokenizer, max_length,
                                      "truncate", cfg.prompt_style)
  if int(cfg.get("loss_window", 0)):
    _check_loss_window(examples, int(cfg.loss_window))
  data_fps = {u: data_lib.data_fingerprint(r) for u, r in records.items()}
  return RunPlan(
      cfg=cfg, base=base, spec=spec, records=records, heldout=heldout,
      examples=examples, heldout_examples=heldout_ex, data_fps=data_fps,
      run_fp=_run_fingerprint(cfg, base.fingerprint, data_fps),
      cohorts=plan_cohorts(list(records), spec.num_slots - 1))


def check_registry_base(plan: RunPlan, registry: Registry) -> None:
  """Refuses users whose registered adapter was trained on another base."""
  cfg, base = plan.cfg, plan.base
  for u in plan.records:
    try:
      rec = registry.adapter(u)
    except Exception:  # pylint: disable=broad-except  # not created yet
      continue
    check_base(
        u, rec["base_fingerprint"], base.fingerprint,
        in_use=f"in registry {cfg.registry}; this config's base {cfg.base!r}"
        " is",
        fix="use the matching base or train under new adapter ids. Nothing "
        "was trained or published.")


# ------------------------------------------------------------ start run


class _Metrics:
  """Progress log lines plus metrics.jsonl in the workdir (process 0)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The run's devices and files, built once.

  Attributes:
    step_fn: the compiled train step.
    params: base params placed on the step's shardings.
    base_host: the base with host params (multi-process), for evaluation.
    ckpt: train-state checkpointer under the workdir.
    metrics: metrics.jsonl writer.
    resume: (bank, opt, meta) of the latest checkpoint, or None.
  """

  step_fn: TrainStep
  params: Any
  base_host: BaseModel
  ckpt: TrainCheckpointer
  metrics: _Metrics
  resume: tuple | None


def start_run(plan: RunPlan, workdir: str) -> Runtime:
  """Compiles the step, places the base and finds the checkpoint to resume."""
  cfg, base, spec = plan.cfg, plan.base, plan.spec
  mesh = sharding.make_mesh(**dict(cfg.mesh))
  step_fn = make_train_step(base.config, spec, make_opt_config(cfg), mesh,
                            StepConfig(lora_impl=cfg.lora_impl,
                                       remat=bool(cfg.remat),
                                       loss_window=plan.loss_window))
  params_sh, bank_sh, opt_sh = step_fn.state_shardings
  params = place_on_mesh(base.params, params_sh)
  base_host = base if jax.process_count() == 1 else BaseModel(
      base.config, jax.device_get(base.params), base.fingerprint,
      base.tokenizer)
  ckpt = TrainCheckpointer(workdir, int(cfg.keep_checkpoints),
                           bool(cfg.async_checkpoint))
  latest = ckpt.latest_step()
  resume = None
  if latest is not None:
    users = plan.cohorts[0]
    like = cohort_state(base.config, spec, users, init_cohort(
        base.config, spec, users, alpha=float(cfg.lora.alpha), seed=0),
                        shardings=(bank_sh, opt_sh))
    resume = ckpt.restore(latest, like.bank, like.opt,
                          expect={"run_fingerprint": plan.run_fp})
    logging.info("resuming from checkpoint step %d (cohort %d, step %d)",
                 latest, resume[2]["cohort"], resume[2]["step_in_cohort"])
  return Runtime(step_fn, params, base_host, ckpt, _Metrics(workdir), resume)


# --------------------------------------------------------- cohort state


def _already_published(registry, users, run_fp: str, cohort: int) -> bool:
  for u in users:
    try:
      rev = registry.resolve(u)
    except Exception:  # pylint: disable=broad-except  # unknown adapter / none
      return False
    prov = rev.provenance or {}
    if prov.get("run_fingerprint") != run_fp or prov.get("cohort") != cohort:
      return False
  return True


def _starting_weights(plan: RunPlan, registry: Registry, users
                      ) -> tuple[dict, dict]:
  """(user -> starting weights, user -> parent revision of known users)."""
  cfg, spec = plan.cfg, plan.spec
  init, parents = {}, {}
  for u in users:
    rev = None
    if cfg.continue_from_registry:
      try:
        rev, w = registry.load(u, expect_base=plan.base.fingerprint)
      except UnknownRefError:  # a new user: no revision yet
        rev = None
    if rev is not None and (w.rank != spec.max_rank or
                            w.variant != spec.variant):
      # Starting over silently would discard the user's trained adapter.
      raise ValueError(
          f"{rev.ref} is a {w.variant} adapter of rank {w.rank}, but this "
          f"run trains {spec.variant} rank {spec.max_rank}; set "
          "lora.rank/lora.variant to match it, or "
          "continue_from_registry=False to start the user from scratch")
    if rev is not None:
      init[u], parents[u] = w, rev.revision
    else:
      init.update(init_cohort(plan.base.config, spec, [u],
                              alpha=float(cfg.lora.alpha), seed=int(cfg.seed),
                              use_rslora=bool(cfg.lora.use_rslora)))
  return init, parents


@dataclasses.dataclass(frozen=True)
class CohortStart:
  """Where one cohort's training starts.

  Attributes:
    index: cohort number c.
    state: slot map, bank and optimizer state.
    parents: user -> revision each known user continues from.
    start_step: first step within the cohort (> 0 when resuming).
    iter_state: the data iterator's saved state when resuming, else None.
  """

  index: int
  state: CohortState
  parents: Mapping[str, int]
  start_step: int = 0
  iter_state: Any = None


def cohort_start(plan: RunPlan, rt: Runtime, registry: Registry, c: int
                 ) -> CohortStart:
  """Cohort c's state: from the registry/fresh, or from the checkpoint."""
  users = plan.cohorts[c]
  init, parents = _starting_weights(plan, registry, users)
  start_cohort = rt.resume[2]["cohort"] if rt.resume else 0
  if rt.resume is not None and c == start_cohort:
    bank, opt, meta = rt.resume
    slot_map = SlotMap.for_cohort(users, plan.spec.num_slots)
    if SlotMap.from_json(meta["slot_map"]) != slot_map:
      raise ValueError(
          f"checkpoint slot map {meta['slot_map']} differs from cohort {c}"
          f" {slot_map.to_json()}; use a fresh --workdir")
    return CohortStart(c, CohortState(slot_map, bank, opt), parents,
                       meta["step_in_cohort"], meta["data_iter"])
  state = cohort_state(plan.base.config, plan.spec, users, init,
                       shardings=rt.step_fn.state_shardings[1:])
  return CohortStart(c, state, parents)


# --------------------------------------------------------- train cohort


@dataclasses.dataclass
class RunProgress:
  """What the run has done so far (mutated by the steps).

  Attributes:
    steps: train steps run by this invocation.
    timing: steady-state throughput: 'step_seconds', 'steps',
      'completion_tokens', 'input_tokens' of the steps after each cohort's
      first, and 'first_step_seconds' (includes compilation).
    published: user -> published ref.
    evals: user -> held-out evaluation (None without held-out data).
  """

  steps: int = 0
  timing: dict = dataclasses.field(default_factory=lambda: dict(
      step_seconds=0.0, steps=0, completion_tokens=0, input_tokens=0,
      first_step_seconds=0.0))
  published: dict = dataclasses.field(default_factory=dict)
  evals: dict = dataclasses.field(default_factory=dict)

  def result(self, stopped: bool) -> dict[str, Any]:
    return dict(published=self.published, steps=self.steps,
                evals=self.evals, stopped=stopped, timing=self.timing)


def train_cohort(plan: RunPlan, rt: Runtime, start: CohortStart,
                 progress: RunProgress, *, stop_after_steps: int | None = None
                 ) -> tuple[Any, bool]:
  """Runs cohort `start.index` to its last step, checkpointing on the way.

  Returns:
    (the trained bank, whether `stop_after_steps` stopped the run first).
  """
  cfg, c, steps = plan.cfg, start.index, plan.steps
  slot_map, users = start.state.slot_map, plan.cohorts[start.index]
  bank, opt = start.state.bank, start.state.opt
  pc, pi = jax.process_count(), jax.process_index()
  pipeline = data_lib.make_pipeline(
      plan.examples, slot_map.slot_of_user, global_batch=int(cfg.batch_size),
      num_steps=steps, buckets=plan.buckets, seed=int(cfg.seed) + c,
      pad_id=plan.base.tokenizer.pad_id, process_index=pi, process_count=pc,
      vocab_size=plan.base.config.vocab_size,
      num_slots=plan.spec.num_slots)
  it = iter(pipeline.to_iter_dataset())
  if start.iter_state is not None:
    it.set_state(start.iter_state)
  timing, step_fn = progress.timing, rt.step_fn
  t0, tokens_seen = time.perf_counter(), 0
  # ETA, loss and tokens/s on stderr (process 0 only); the first step of
  # the first cohort also compiles, which the bar's rate absorbs.
  bar = progress_lib.bar(
      total=steps, initial=start.start_step, unit="step",
      desc=f"train cohort {c + 1}/{len(plan.cohorts)}", disable=pi != 0)
  for s in range(start.start_step, steps):
    local = next(it)
    batch = Batch(**{k: jax.make_array_from_process_local_data(
        getattr(step_fn.batch_sharding, k), v) for k, v in local.items()})
    t_step = time.perf_counter()
    bank, opt, m = step_fn(rt.params, bank, opt, batch)
    jax.block_until_ready(m["loss"])
    t_step = time.perf_counter() - t_step
    # Steady-state throughput: the first step of each cohort (which compiles
    # on the first cohort) is left out.
    if s == start.start_step:
      timing["first_step_seconds"] += t_step
    else:
      timing["step_seconds"] += t_step
      timing["steps"] += 1
      timing["completion_tokens"] += int(local["loss_mask"].sum()) * pc
      timing["input_tokens"] += int((local["segment_ids"] > 0).sum()) * pc
    progress.steps += 1
    gstep = c * steps + s + 1
    tokens_seen += int(local["loss_mask"].sum()) * pc
    bar.update(1)
    if (s + 1) % int(cfg.log_every) == 0 or s + 1 == steps:
      m = jax.device_get(m)
      tps = tokens_seen / max(time.perf_counter() - t0, 1e-9)
      logging.info("cohort %d step %d/%d loss %.4f tokens/s %.1f", c, s + 1,
                   steps, float(m["loss"]), tps)
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{tps:.0f}")
      rt.metrics.write(dict(
          step=gstep, cohort=c, step_in_cohort=s + 1, loss=float(m["loss"]),
          tokens_per_s=tps, loss_per_user={
              u: float(m["loss_s"][slot_map.slot(u)]) for u in users
              if m["present_s"][slot_map.slot(u)]}))
    if (s + 1) % int(cfg.checkpoint_every) == 0 or s + 1 == steps:
      rt.ckpt.save(gstep, bank, opt, dict(
          run_fingerprint=plan.run_fp, cohort=c, step_in_cohort=s + 1,
          data_iter=it.get_state(), slot_map=slot_map.to_json()),
                   force=True)
    if stop_after_steps is not None and progress.steps >= stop_after_steps:
      bar.close()
      return bank, True
  bar.close()
  return bank, False


# ------------------------------------------------- evaluate and publish


def _to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate_cohort(plan: RunPlan, base: BaseModel, host_bank,
                    slot_map: SlotMap) -> dict[str, dict | None]:
  """user -> held-out loss / exact match of the adapter and of the base
  (None for users without held-out records)."""
  heldout_ex = plan.heldout_examples
  users = slot_map.users
  jobs = [(u, slot_map.slot(u), heldout_ex[u]) for u in users
          if heldout_ex.get(u)]
  jobs += [(("base", u), 0, heldout_ex[u]) for u in users
           if heldout_ex.get(u)]
  eval_bank = plan.spec.family.to_lora_bank(host_bank)
  results = evaluate_jobs(base, eval_bank, jobs,
                          int(plan.cfg.get("eval_batch_size", 16)),
                          plan.cfg.lora_impl) if jobs else {}
  evals = {}
  for u in users:
    ev = None
    if u in results:
      r, b = results[u], results[("base", u)]
      ev = dict(heldout_loss=r.loss, exact_match=r.exact_match,
                base_heldout_loss=b.loss, base_exact_match=b.exact_match,
                heldout_fingerprint=data_lib.data_fingerprint(
                    plan.heldout[u]))
    evals[u] = ev
  return evals


def publish_cohort(plan: RunPlan, registry: Registry, start: CohortStart,
                   host_bank, evals: Mapping[str, dict | None], *,
                   base: BaseModel) -> dict[str, str]:
  """Publishes every user of the cohort (all or none) with provenance.

  Returns:
    user -> published ref 'id@revision'.
  """
  cfg, spec, c = plan.cfg, plan.spec, start.index
  slot_map = start.state.slot_map
  users = slot_map.users
  items = []
  for u in users:
    registry.create_adapter(u, spec=AdapterInfo.for_bank(
        spec, rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
        use_rslora=bool(cfg.lora.use_rslora)),
                            base_fingerprint=base.fingerprint, owner=u,
                            exist_ok=True, config=base.config)
    w = read_adapter(spec, host_bank, slot_map.slot(u),  # VeRA: vectors
                     float(cfg.lora.alpha), bool(cfg.lora.use_rslora))
    provenance = dict(
        base_fingerprint=base.fingerprint, data_fingerprint=plan.data_fps[u],
        training_config=cfg.to_dict(), steps=plan.steps, seed=int(cfg.seed),
        num_examples=len(plan.records[u]), run_fingerprint=plan.run_fp,
        cohort=c, evaluation=evals[u],
        data_formats=list(data_lib.data_formats(plan.records[u])),
        prompt_format=prompt_format.for_training(
            base.tokenizer, cfg.prompt_style,
            data_lib.data_formats(plan.records[u])).to_provenance())
    items.append((u, w, json.loads(json.dumps(provenance, default=str)),
                  start.parents.get(u)))
  revs = registry.publish_many(items)
  out = {}
  for u, rev in zip(users, revs):
    ref = f"{rev.adapter_id}@{rev.revision}"
    out[u] = ref
    ev = evals[u]
    if ev is not None:
      registry.record_eval(ref, "heldout_loss", ev["heldout_loss"],
                           ev["heldout_fingerprint"])
      registry.record_eval(ref, "exact_match", ev["exact_match"],
                           ev["heldout_fingerprint"])
  logging.info("cohort %d published %s", c, sorted(out.values()))
  return out


# ------------------------------------------------------------ the run


def train_and_publish(cfg: ml_collections.ConfigDict, workdir: str,
                      stop_after_steps: int | None = None,
                      base: BaseModel | None = None) -> dict[str, Any]:
  """Trains every user's adapter in cohorts and publishes each cohort.

  Args:
    cfg: run config (see configs/smollm2_personal.py).
    workdir: run directory (checkpoints, metrics.jsonl). Rerunning with the
      same workdir and config resumes.
    stop_after_steps: stop (as if killed) after this many steps of this
      invocation, once their checkpoint is written; for resume tests.
    base: an already loaded base (skips `cfg.base`).

  Returns:
    {'published': {user: ref}, 'steps': steps run now, 'evals': {user:
    {...}}, 'stopped': bool, 'timing': see `RunProgress.timing`}.
  """
  os.makedirs(workdir, exist_ok=True)
  plan = plan_run(cfg, base)
  registry = Registry.open(cfg.registry)
  check_registry_base(plan, registry)
  rt = start_run(plan, workdir)
  progress = RunProgress()
  first = rt.resume[2]["cohort"] if rt.resume else 0
  for c in range(first, len(plan.cohorts)):
    if _already_published(registry, plan.cohorts[c], plan.run_fp, c):
      logging.info("cohort %d already published by this run; skipping", c)
      continue
    start = cohort_start(plan, rt, registry, c)
    bank, stopped = train_cohort(plan, rt, start, progress,
                                 stop_after_steps=stop_after_steps)
    if stopped:
      rt.ckpt.close()
      return progress.result(stopped=True)
    rt.ckpt.wait()
    host_bank = _to_host(bank)
    if jax.process_index() == 0:  # evaluation and the catalog: process 0
      evals = evaluate_cohort(plan, rt.base_host, host_bank,
                              start.state.slot_map)
      progress.evals.update(evals)
      progress.published.update(publish_cohort(
          plan, registry, start, host_bank, evals, base=rt.base_host))
    rt.metrics.write(dict(cohort=c, published=sorted(plan.cohorts[c]),
                          evals={u: progress.evals.get(u)
                                 for u in plan.cohorts[c]}))
  rt.ckpt.close()
  return progress.result(stopped=False)
