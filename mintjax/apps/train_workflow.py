"""The multi-tenant training run: cohorts, resume, publish with provenance.

Owns `train_and_publish(config, workdir)`, the library function behind
`launch/train.py`, and `load_base_source`. One run:

  base        loaded from a checkpoint dir, GGUF file, HF folder or
              'random:<variant>'; placed on the mesh by its logical axes.
  data        every JSONL record validated and tokenized before any step.
  cohorts     users sorted and split into groups of num_slots - 1; each
              cohort is loaded into the bank (new users start PEFT-style, known
              users from their latest revision) and trained for
              `steps_per_cohort` steps by one compiled step.
  checkpoint  bank, optimizer, data-iterator state and slot map every
              `checkpoint_every` steps (async Orbax); rerunning the same
              command resumes from the latest one.
  publish     at cohort end each user's adapter is evaluated on held-out
              records and published (all of the cohort or none) with
              provenance; a cohort already published by this run (same run
              fingerprint) is skipped, so a resumed run never publishes twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mintjax import sharding
from mintjax.adapters.spec import AdapterSpec
from mintjax.config import ModelConfig
from mintjax.eval.evaluate import evaluate_jobs
from mintjax.eval import prompt_format
from mintjax.model.base import BaseModel, random_base
from mintjax.store.errors import BaseMismatchError, UnknownRefError
from mintjax.train import data as data_lib
from mintjax.train import optimizer as opt_lib
from mintjax.train.checkpoint import TrainCheckpointer
from mintjax.adapters.vera import VeraBank
from mintjax.train.cohort import (SlotMap, cohort_bank, init_for_spec,
                                  plan_cohorts, read_adapter)
from mintjax.train.step import Batch, StepConfig, make_train_step

RANDOM_VARIANTS = {
    "tiny": ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                        intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=1e5, tie_word_embeddings=True),
}


def load_base_source(source: str, seed: int = 0) -> BaseModel:
  """Loads a base: 'random:<variant>', a GGUF file, an HF folder or an
  Orbax base checkpoint directory."""
  if source.startswith("random:"):
    variant = source.split(":", 1)[1]
    if variant not in RANDOM_VARIANTS:
      raise ValueError(f"unknown random base variant {variant!r}; choose "
                       f"from {sorted(RANDOM_VARIANTS)}")
    return random_base(RANDOM_VARIANTS[variant], seed=seed)
  if source.endswith(".gguf") and os.path.isfile(source):
    from mintjax.model.gguf import load_gguf  # pylint: disable=g-import-not-at-top
    return load_gguf(source)
  if os.path.isdir(source) and os.path.isfile(
      os.path.join(source, "config.json")):
    from mintjax.model.hf import load_hf  # pylint: disable=g-import-not-at-top
    return load_hf(source)
  if os.path.isdir(source):
    from mintjax.model.checkpoint import load_base  # pylint: disable=g-import-not-at-top
    return load_base(source)
  raise ValueError(
      f"base source {source!r} is not 'random:<variant>', an existing .gguf "
      "file, a Hugging Face folder (config.json + *.safetensors) or a base "
      "checkpoint directory")


def _place(tree, shardings):
  """Puts host arrays on (possibly multi-process) shardings, same everywhere."""
  host = jax.tree.map(np.asarray, tree)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
      host, shardings)


def _zero_opt(bank) -> opt_lib.SlotOptState:
  """Host zeros shaped like the optimizer state of `bank` (any process)."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                      jax.eval_shape(opt_lib.init_opt_state, bank))


def _to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _run_fingerprint(cfg: ml_collections.ConfigDict, base_fp: str,
                     data_fps: dict) -> str:
  h = hashlib.sha256()
  h.update(base_fp.encode())
  h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  h.update(json.dumps(data_fps, sort_keys=True).encode())
  return "sha256:" + h.hexdigest()


def make_spec(cfg) -> AdapterSpec:
  targets = cfg.lora.targets
  if isinstance(targets, str):
    targets = tuple(t.strip() for t in targets.split(",") if t.strip())
  # lora.variant 'vera' trains VeRA vectors on a frozen basis instead.
  return AdapterSpec(targets=tuple(targets), max_rank=int(cfg.lora.rank),
                     num_slots=int(cfg.num_slots),
                     variant=str(cfg.lora.get("variant", "lora")),
                     basis_seed=int(cfg.lora.get("basis_seed", 0)))


def make_opt_config(cfg) -> opt_lib.OptimizerConfig:
  return opt_lib.OptimizerConfig(**dict(cfg.optimizer))


class _Metrics:
  """Progress log lines plus metrics.jsonl in the workdir (process 0)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


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
    {...}}, 'stopped': bool, 'timing': {'step_seconds', 'steps',
    'completion_tokens', 'input_tokens' of the steps after each cohort's
    first, and 'first_step_seconds' (includes compilation)}}.
  """
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  # --- base, spec, data: everything is validated before any step ----------
  base = base or load_base_source(cfg.base, int(cfg.get("base_seed", 0)))
  if base.tokenizer is None:
    raise ValueError(f"base {cfg.base!r} has no tokenizer; training data "
                     "cannot be tokenized")
  spec = make_spec(cfg)
  opt_cfg = make_opt_config(cfg)
  records = data_lib.read_records(cfg.train_data)
  heldout = (data_lib.read_records(cfg.heldout_data)
             if cfg.get("heldout_data") else {})
  buckets = tuple(int(b) for b in cfg.buckets)
  max_length = min(int(cfg.max_length), max(buckets))
  examples = data_lib.load_examples(records, base.tokenizer, max_length,
                                    cfg.overflow, cfg.prompt_style)
  heldout_ex = data_lib.load_examples(heldout, base.tokenizer, max_length,
                                      "truncate", cfg.prompt_style)
  loss_window = int(cfg.get("loss_window", 0))
  if loss_window:
    _check_loss_window(examples, loss_window)
  data_fps = {u: data_lib.data_fingerprint(r) for u, r in records.items()}
  run_fp = _run_fingerprint(cfg, base.fingerprint, data_fps)
  registry = Registry.open(cfg.registry)
  for u in records:
    try:
      rec = registry.adapter(u)
    except Exception:  # pylint: disable=broad-except  # not created yet
      continue
    if rec["base_fingerprint"] != base.fingerprint:
      raise BaseMismatchError(
          f"adapter {u!r} in registry {cfg.registry} was trained on base "
          f"{rec['base_fingerprint'][:19]}..., this config's base "
          f"{cfg.base!r} is {base.fingerprint[:19]}...; use the matching "
          "base or train under new adapter ids. Nothing was trained or "
          "published.")
  cohorts = plan_cohorts(list(records), spec.num_slots - 1)
  steps = int(cfg.steps_per_cohort)

  # --- mesh and the compiled step -----------------------------------------
  mesh = sharding.make_mesh(**dict(cfg.mesh))
  step_fn = make_train_step(base.config, spec, opt_cfg, mesh, StepConfig(
      lora_impl=cfg.lora_impl, remat=bool(cfg.remat),
      loss_window=loss_window))
  params_sh, bank_sh, opt_sh = step_fn.state_shardings
  params = _place(base.params, params_sh)
  base_host = base if jax.process_count() == 1 else BaseModel(
      base.config, jax.device_get(base.params), base.fingerprint,
      base.tokenizer)
  ckpt = TrainCheckpointer(workdir, int(cfg.keep_checkpoints),
                           bool(cfg.async_checkpoint))
  metrics = _Metrics(workdir)
  latest = ckpt.latest_step()
  resume = None
  if latest is not None:
    empty = {u: init_for_spec(base.config, spec, int(cfg.lora.rank),
                              float(cfg.lora.alpha), u, 0)
             for u in cohorts[0]}
    like_bank = cohort_bank(base.config, spec, SlotMap.for_cohort(
        cohorts[0], spec.num_slots), empty, bank_sh)
    like_opt = _place(_zero_opt(like_bank), opt_sh)
    resume = ckpt.restore(latest, like_bank, like_opt,
                          expect={"run_fingerprint": run_fp})
    logging.info("resuming from checkpoint step %d (cohort %d, step %d)",
                 latest, resume[2]["cohort"], resume[2]["step_in_cohort"])
  start_cohort = resume[2]["cohort"] if resume else 0
  published, evals, steps_run = {}, {}, 0
  # Steady-state throughput: the first step of each cohort (which compiles
  # on the first cohort) is left out.
  timing = dict(step_seconds=0.0, steps=0, completion_tokens=0,
                input_tokens=0, first_step_seconds=0.0)
  pc, pi = jax.process_count(), jax.process_index()

  for c in range(start_cohort, len(cohorts)):
    users = cohorts[c]
    slot_map = SlotMap.for_cohort(users, spec.num_slots)
    if _already_published(registry, users, run_fp, c):
      logging.info("cohort %d already published by this run; skipping", c)
      continue
    parents = {}
    init = {}
    for u in users:
      rev = None
      if cfg.continue_from_registry:
        try:
          rev, w = registry.load(u, expect_base=base.fingerprint)
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
        init[u] = init_for_spec(base.config, spec, int(cfg.lora.rank),
                                float(cfg.lora.alpha), u, int(cfg.seed),
                                bool(cfg.lora.use_rslora))
    if resume is not None and c == start_cohort:
      bank, opt, meta = resume
      if SlotMap.from_json(meta["slot_map"]) != slot_map:
        raise ValueError(
            f"checkpoint slot map {meta['slot_map']} differs from cohort {c}"
            f" {slot_map.to_json()}; use a fresh --workdir")
      start_step, iter_state = meta["step_in_cohort"], meta["data_iter"]
    else:
      bank = cohort_bank(base.config, spec, slot_map, init, bank_sh)
      opt = _place(_zero_opt(bank), opt_sh)
      start_step, iter_state = 0, None
    pipeline = data_lib.make_pipeline(
        examples, slot_map.slot_of_user, global_batch=int(cfg.batch_size),
        num_steps=steps, buckets=buckets, seed=int(cfg.seed) + c,
        pad_id=base.tokenizer.pad_id, process_index=pi, process_count=pc)
    it = iter(pipeline.to_iter_dataset())
    if iter_state is not None:
      it.set_state(iter_state)
    t0, tokens_seen, last_log = time.perf_counter(), 0, time.perf_counter()
    for s in range(start_step, steps):
      local = next(it)
      batch = Batch(**{k: jax.make_array_from_process_local_data(
          getattr(step_fn.batch_sharding, k), v) for k, v in local.items()})
      t_step = time.perf_counter()
      bank, opt, m = step_fn(params, bank, opt, batch)
      jax.block_until_ready(m["loss"])
      t_step = time.perf_counter() - t_step
      if s == start_step:
        timing["first_step_seconds"] += t_step
      else:
        timing["step_seconds"] += t_step
        timing["steps"] += 1
        timing["completion_tokens"] += int(local["loss_mask"].sum()) * pc
        timing["input_tokens"] += int((local["segment_ids"] > 0).sum()) * pc
      steps_run += 1
      gstep = c * steps + s + 1
      tokens_seen += int(local["loss_mask"].sum()) * pc
      if (s + 1) % int(cfg.log_every) == 0 or s + 1 == steps:
        m = jax.device_get(m)
        now = time.perf_counter()
        tps = tokens_seen / max(now - t0, 1e-9)
        logging.info("cohort %d step %d/%d loss %.4f tokens/s %.1f", c, s + 1,
                     steps, float(m["loss"]), tps)
        metrics.write(dict(step=gstep, cohort=c, step_in_cohort=s + 1,
                           loss=float(m["loss"]), tokens_per_s=tps,
                           loss_per_user={u: float(m["loss_s"][slot_map.slot(
                               u)]) for u in users
                                          if m["present_s"][slot_map.slot(u)]}))
        last_log = now
      if (s + 1) % int(cfg.checkpoint_every) == 0 or s + 1 == steps:
        ckpt.save(gstep, bank, opt, dict(
            run_fingerprint=run_fp, cohort=c, step_in_cohort=s + 1,
            data_iter=it.get_state(), slot_map=slot_map.to_json()),
                  force=True)
      if stop_after_steps is not None and steps_run >= stop_after_steps:
        ckpt.close()
        return dict(published=published, steps=steps_run, evals=evals,
                    stopped=True, timing=timing)
    del last_log
    ckpt.wait()
    # --- evaluate and publish the cohort (process 0) ----------------------
    host_bank = _to_host(bank)
    if pi == 0:
      published.update(_publish_cohort(
          cfg, registry, base_host, spec, host_bank, slot_map, parents,
          heldout, heldout_ex, records, data_fps, run_fp, c, steps, evals))
    metrics.write(dict(cohort=c, published=sorted(users), evals={
        u: evals.get(u) for u in users}))
  ckpt.close()
  return dict(published=published, steps=steps_run, evals=evals,
              stopped=False, timing=timing)


def _publish_cohort(cfg, registry, base, spec, host_bank, slot_map, parents,
                    heldout, heldout_ex, records, data_fps, run_fp, cohort,
                    steps, evals_out) -> dict:
  """Evaluates the cohort's slots and publishes them all (or none)."""
  users = slot_map.users
  jobs = [(u, slot_map.slot(u), heldout_ex[u]) for u in users
          if heldout_ex.get(u)]
  jobs += [(("base", u), 0, heldout_ex[u]) for u in users
           if heldout_ex.get(u)]
  eval_bank = (host_bank.materialize() if isinstance(host_bank, VeraBank)
               else host_bank)
  results = evaluate_jobs(base, eval_bank, jobs,
                          int(cfg.get("eval_batch_size", 16)),
                          cfg.lora_impl) if jobs else {}
  items = []
  for u in users:
    registry.create_adapter(u, spec=dict(
        targets=list(spec.targets), rank=int(cfg.lora.rank),
        alpha=float(cfg.lora.alpha), use_rslora=bool(cfg.lora.use_rslora),
        variant=spec.variant, **({"basis_seed": spec.basis_seed}
                                 if spec.variant == "vera" else {})),
                            base_fingerprint=base.fingerprint, owner=u,
                            exist_ok=True, config=base.config)
    w = read_adapter(spec, host_bank, slot_map.slot(u),  # VeRA: vectors
                     float(cfg.lora.alpha), bool(cfg.lora.use_rslora))
    ev = None
    if u in results:
      r, b = results[u], results[("base", u)]
      ev = dict(heldout_loss=r.loss, exact_match=r.exact_match,
                base_heldout_loss=b.loss, base_exact_match=b.exact_match,
                heldout_fingerprint=data_lib.data_fingerprint(heldout[u]))
    evals_out[u] = ev
    provenance = dict(
        base_fingerprint=base.fingerprint, data_fingerprint=data_fps[u],
        training_config=cfg.to_dict(), steps=steps, seed=int(cfg.seed),
        num_examples=len(records[u]), run_fingerprint=run_fp, cohort=cohort,
        evaluation=ev, prompt_format=prompt_format.for_training(
            base.tokenizer, cfg.prompt_style).to_provenance())
    items.append((u, w, json.loads(json.dumps(provenance, default=str)),
                  parents.get(u)))
  revs = registry.publish_many(items)
  out = {}
  for u, rev in zip(users, revs):
    ref = f"{rev.adapter_id}@{rev.revision}"
    out[u] = ref
    ev = evals_out[u]
    if ev is not None:
      registry.record_eval(ref, "heldout_loss", ev["heldout_loss"],
                           ev["heldout_fingerprint"])
      registry.record_eval(ref, "exact_match", ev["exact_match"],
                           ev["heldout_fingerprint"])
  logging.info("cohort %d published %s", cohort, sorted(out.values()))
  return out
