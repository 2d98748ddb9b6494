"""The end-to-end personal-models demo behind `make demo`.

Owns `run_demo(workdir, ...)`, which ties every part of mintjax together on
one base model and returns a summary dict:

  1. base       converts the base (default: the embedded SmolLM2-135M-Instruct
                GGUF) into an Orbax base checkpoint in the workdir, or reuses
                the one a previous run wrote there.
  2. foundation greedy completions of a few prompts through the plain model,
                and one mixed batch whose rows use the base and two randomly
                initialised adapters (the base row must equal the plain model).
  3. workload   N users' personal facts (`mintjax.apps.personal_data`):
                trained under some phrasings, asked held-out under others.
  4. train      all N adapters in one cohort by the training workflow
                (`mintjax.apps.train_workflow`) on the given recipe, each
                published as a registry revision with provenance and its
                held-out evaluation (adapter vs base).
  5. serve      one mixed batch through the `Engine`: every request names a
                different user's adapter, plus base-only rows; then a second
                round that shows the residency tiers at work.
  6. summary    held-out accuracy (base vs adapted, mean and worst user),
                adapter vs base size, training and decode tokens/s, residency
                hit rates and where everything was written.

Each run starts the workload, registry and training state afresh (a second
`make demo` retrains), but keeps the converted base, so only the first run
pays for the conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mintjax.adapters.bank import bank_from_weights
from mintjax.adapters.spec import BankSpec, AdapterWeights
from mintjax.apps import personal_data
from mintjax.apps.train_workflow import train_and_publish
from mintjax.model import checkpoint as base_checkpoint
from mintjax.model import llama
from mintjax.model.base import BaseModel
from mintjax.model.sources import SMOLLM2, load_base_source, resolve_base_source
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.store.registry import Registry

DEFAULT_BASE = SMOLLM2  # the embedded SmolLM2-135M-Instruct GGUF
MARKER = ".mintjax_demo"
# Sub-directories each run owns and recreates; "base" is kept as a cache.
FRESH_DIRS = ("data", "registry", "train")
FOUNDATION_PROMPTS = ("The capital of France is",
                      "The largest planet in the solar system is",
                      "Water is made of hydrogen and")


class Progress:
  """Prints '[elapsed] stage: message' lines and times each stage."""

  def __init__(self, log: Callable[[str], None] = print):
    self.log = log
    self.t0 = time.perf_counter()
    self.stage_seconds: dict[str, float] = {}
    self._stage, self._stage_t0 = None, self.t0

  def __call__(self, msg: str) -> None:
    elapsed = time.perf_counter() - self.t0
    self.log(f"[{elapsed:6.1f}s] {self._stage or 'demo'}: {msg}")

  def stage(self, name: str, title: str) -> None:
    self.end()
    self._stage, self._stage_t0 = name, time.perf_counter()
    self(f"--- {title} ---")

  def end(self) -> None:
    if self._stage is not None:
      took = time.perf_counter() - self._stage_t0
      self.stage_seconds[self._stage] = round(took, 2)
      self(f"done in {took:.1f}s")
      self._stage = None


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir or checks it is a demo's; clears per-run state."""
  if os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise ValueError(f"demo workdir {workdir!r} is a file; pass a "
                       "directory (e.g. --workdir=demo_out)")
    if os.listdir(workdir) and not os.path.exists(
        os.path.join(workdir, MARKER)):
      raise ValueError(
          f"demo workdir {workdir!r} is not empty and was not written by the "
          f"demo (no {MARKER} file); the demo clears its data/, registry/ "
          "and train/ sub-directories on each run, so pass an empty or new "
          "directory instead")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, MARKER), "w", encoding="utf-8") as f:
    f.write("written by mintjax.apps.demo.run_demo\n")
  for d in FRESH_DIRS:
    shutil.rmtree(os.path.join(workdir, d), ignore_errors=True)


def cached_base(workdir: str, base_source: str, progress: Progress
                ) -> tuple[BaseModel, str, bool]:
  """Loads the workdir's converted base, converting `base_source` first if
  the cache is missing or was converted from another source.

  Returns:
    (base, checkpoint directory, whether it was converted now).
  """
  ckpt_dir = os.path.join(workdir, "base")
  source_file = os.path.join(workdir, "base_source.json")
  source = resolve_base_source(base_source)
  cached = None
  if os.path.exists(source_file) and os.path.exists(
      os.path.join(ckpt_dir, base_checkpoint.META_FILE)):
    with open(source_file, encoding="utf-8") as f:
      cached = json.load(f).get("source")
  if cached == source:
    progress(f"reusing the converted base in {ckpt_dir} (from {source})")
    return base_checkpoint.load_base(ckpt_dir), ckpt_dir, False
  progress(f"converting {source} -> {ckpt_dir}")
  base = load_base_source(source)
  base_checkpoint.save_base(ckpt_dir, base, overwrite=True)
  # Written after the checkpoint is complete, so a crash in between only
  # makes the next run convert again.
  with open(source_file, "w", encoding="utf-8") as f:
    json.dump({"source": source, "fingerprint": base.fingerprint}, f)
  return base, ckpt_dir, True


def params_nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def greedy_complete(base: BaseModel, prompts: Sequence[str],
                    adapter_idx: Sequence[int] | None = None, bank=None,
                    max_new_tokens: int = 6) -> tuple[list[list[int]],
                                                      np.ndarray]:
  """Greedy continuations of raw prompts by full forward passes.

  Rows are right-padded into one fixed [B, L] buffer, so every step reuses
  one compiled forward; causal attention keeps the padding after a row's
  end from affecting it. Deliberately independent of the serving engine,
  so it checks the model itself.

  Returns:
    (new token ids per row, [B, V] logits of the first generated position).
  """
  tok = base.tokenizer
  ids = [tok.encode(p, add_bos=True) for p in prompts]
  b = len(ids)
  length = max(len(x) for x in ids) + max_new_tokens
  buf = np.full((b, length), tok.pad_id, np.int32)
  for r, x in enumerate(ids):
    buf[r, :len(x)] = x
  lens = np.array([len(x) for x in ids])
  idx = jnp.asarray(adapter_idx if adapter_idx is not None else [0] * b,
                    jnp.int32)
  out, first = [[] for _ in range(b)], None
  for _ in range(max_new_tokens):
    logits = llama.jit_forward(base.params, bank, idx if bank is not None
                               else None, jnp.asarray(buf),
                               config=base.config)
    last = np.asarray(logits)[np.arange(b), lens - 1]
    if first is None:
      first = last
    nxt = last.argmax(-1)
    for r in range(b):
      out[r].append(int(nxt[r]))
      buf[r, lens[r]] = nxt[r]
    lens = lens + 1
  return out, first


def foundation_section(base: BaseModel, progress: Progress,
                       seed: int = 0) -> dict:
  """Greedy completions, then base + two random adapters in one batch."""
  tok = base.tokenizer
  plain, _ = greedy_complete(base, FOUNDATION_PROMPTS)
  completions = {}
  for p, ids in zip(FOUNDATION_PROMPTS, plain):
    completions[p] = tok.decode(ids)
    progress(f"{p!r} -> {completions[p]!r}")
  targets = ("q", "v", "gate", "up", "down")
  spec = BankSpec(targets=targets, max_rank=8, num_slots=3)
  # std 0.1 makes the random deltas large enough to change greedy outputs
  # (at PEFT's usual init the B factor is zero and nothing would change).
  bank = bank_from_weights(base.config, spec, {
      s: AdapterWeights.random(base.config, targets, rank=8, alpha=16.0,
                               seed=seed + s, std=0.1) for s in (1, 2)})
  prompt = FOUNDATION_PROMPTS[0]
  mixed, first = greedy_complete(base, [prompt] * 3, [0, 1, 2], bank)
  plain_first = greedy_complete(base, [prompt], max_new_tokens=1)[1]
  rows = []
  for slot, ids in zip((0, 1, 2), mixed):
    name = "base" if slot == 0 else f"random adapter {slot}"
    rows.append(dict(slot=slot, text=tok.decode(ids)))
    progress(f"mixed batch row {slot} ({name}): {prompt!r} -> "
             f"{tok.decode(ids)!r}")
  base_row_equal = (mixed[0] == plain[0] and np.allclose(
      first[0], plain_first[0], atol=1e-4, rtol=1e-4))
  rows_differ = bool(not np.allclose(first[0], first[1]) and
                     not np.allclose(first[0], first[2]) and
                     not np.allclose(first[1], first[2]))
  progress(f"base row equals the plain model: {base_row_equal}; the three "
           f"rows' logits all differ: {rows_differ}")
  if not base_row_equal:
    raise AssertionError(
        "the base row (adapter slot 0) of a mixed batch differs from the "
        "plain model; the null adapter must be exactly the base")
  return dict(completions=completions, mixed_batch=rows,
              base_row_equals_plain=bool(base_row_equal),
              rows_differ=rows_differ)


def train_config(recipe: ml_collections.ConfigDict, num_users: int, *,
                 base_dir: str, data: dict, registry_dir: str,
                 overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The demo's training config: a copy of `recipe` (the launcher passes
  `configs/smollm2_personal.py:demo` or `demo_tiny`) with one cohort
  holding every user."""
  cfg = recipe.copy_and_resolve_references()
  cfg.base = base_dir
  cfg.train_data = data["train"]
  cfg.heldout_data = data["heldout"]
  cfg.registry = registry_dir
  cfg.num_slots = num_users + 1
  # One row per user per step, rounded up to a multiple of the devices the
  # rows are split over (users then repeat within the batch).
  n = jax.device_count()
  cfg.batch_size = -(-num_users // n) * n
  for k, v in (overrides or {}).items():
    node, *path = k.split(".")
    target = cfg
    for p in [node] + path[:-1]:
      target = target[p]
    target[path[-1] if path else node] = v
  return cfg


def serve_section(base: BaseModel, registry, cfg, data: dict,
                  progress: Progress, *, num_base_rows: int = 2,
                  device_slots: int = 32, show: int = 8) -> dict:
  """Serves two rounds of mixed batches through the `Engine`.

  Round 1: each user's first held-out question under that user's adapter
  (one request per user, all different adapters) plus `num_base_rows`
  base-only rows. Round 2: each user's second held-out question, which finds
  the adapters again in the device or host tier.
  """
  truth = data["truth"]
  users = sorted(truth)
  by_user: dict[str, list[dict]] = {}
  for r in data["heldout_records"]:
    by_user.setdefault(r["user"], []).append(r)
  targets = tuple(t.strip() for t in cfg.lora.targets.split(","))
  max_batch = min(32, len(users) + num_base_rows)
  ecfg = EngineConfig(num_slots=min(device_slots, len(users)),
                      max_batch=max_batch, max_len=int(cfg.max_length) + 16,
                      min_bucket=16, steps_per_call=4,
                      prefill_batch=min(16, max_batch),
                      max_rank=int(cfg.lora.rank), targets=targets)
  progress(f"engine: {ecfg.num_slots} device slots, batch {ecfg.max_batch}; "
           "compiling prefill/decode")
  engine = Engine(base, registry, ecfg)
  progress("engine ready")
  rounds, answers = [], []
  for rnd in (0, 1):
    reqs, meta = [], []
    for u in users:
      recs = by_user[u]
      r = recs[rnd % len(recs)]
      reqs.append(dict(prompt=r["prompt"], adapter=u, add_bos=True,
                       max_new_tokens=6, request_id=f"{u}/{rnd}"))
      meta.append((u, r))
    if rnd == 0:
      for i in range(num_base_rows):
        r = by_user[users[i % len(users)]][0]
        reqs.append(dict(prompt=r["prompt"], adapter=None, add_bos=True,
                         max_new_tokens=6, request_id=f"base/{i}"))
        meta.append((None, r))
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    took = time.perf_counter() - t0
    correct = 0
    for res, (u, r) in zip(results, meta):
      want = r["completion"].strip()
      got = res.text.strip()
      ok = got == want
      if u is not None:
        correct += ok
      answers.append(dict(round=rnd, user=u, prompt=r["prompt"],
                          answer=res.text, expected=want,
                          correct=bool(ok), revision=res.revision))
    n_users = len(users)
    rounds.append(dict(requests=len(reqs), seconds=round(took, 2),
                       served_accuracy=correct / n_users))
    progress(f"round {rnd + 1}: {len(reqs)} requests ({n_users} adapters"
             f"{f', {num_base_rows} base rows' if rnd == 0 else ''}) in "
             f"{took:.1f}s; served answers correct {correct}/{n_users}")
    if rnd == 0:
      shown = [a for a in answers if a["user"] is not None][:show]
      shown += [a for a in answers if a["user"] is None]
      for a in shown:
        who = a["user"] or "(base)"
        mark = ("ok" if a["correct"] else "WRONG") if a["user"] else ""
        progress(f"  {who:>10} {a['prompt']!r:34} -> {a['answer']!r:14} "
                 f"(expected {a['expected']!r}) {mark}")
  stats = engine.stats()
  res = stats.get("residency", {})
  return dict(rounds=rounds, answers=answers,
              decode_tokens_per_s=stats["decode_tokens_per_s"],
              generated_tokens=stats["generated_tokens"],
              compilations_since_warmup=stats["compilations_since_warmup"],
              hit_rates={tier: res[tier]["hit_rate"] for tier in res},
              residency=res)


def run_demo(workdir: str = "demo_out", num_users: int = 64,
             base_source: str = DEFAULT_BASE, *,
             recipe: ml_collections.ConfigDict, seed: int = 0,
             facts: Sequence[str] = ("cat", "hometown", "color"),
             overrides: dict | None = None, device_slots: int = 32,
             log: Callable[[str], None] = print) -> dict:
  """Runs the whole demo (see the module docstring) and returns its summary.

  Args:
    workdir: output directory (created; per-run sub-directories are
      cleared; the converted base is kept and reused).
    num_users: N users, all trained together in one cohort.
    base_source: anything `mintjax.model.sources.load_base_source` accepts
      ('smollm2', the embedded GGUF; 'random:tiny', a GGUF file, an HF
      folder, a base checkpoint directory).
    recipe: the training config to start from
      (`configs/smollm2_personal.py:demo`, or `demo_tiny` for
      'random:tiny'); it is copied, not changed.
    seed: workload seed.
    facts: fact kinds per user (see `personal_data.FACTS`).
    overrides: training config overrides, e.g. {'steps_per_cohort': 10,
      'optimizer.learning_rate': 1e-3}.
    device_slots: serving engine's device adapter slots.
    log: where progress lines go.

  Returns:
    The summary dict (also written to <workdir>/summary.json).
  """
  if num_users < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}")
  workdir = os.path.abspath(workdir)
  progress = Progress(log)
  _prepare_workdir(workdir)

  progress.stage("base", "1/5 base model")
  base, base_dir, converted = cached_base(workdir, base_source, progress)
  c = base.config
  base_bytes = params_nbytes(base.params)
  progress(f"{c.num_layers} layers, hidden {c.hidden_size}, vocab "
           f"{c.vocab_size}: {base_bytes / 2**20:.0f} MiB, fingerprint "
           f"{base.short_fingerprint}")

  progress.stage("foundation", "2/5 greedy completions and a mixed batch")
  foundation = foundation_section(base, progress, seed)

  progress.stage("workload", "3/5 personal-model workload")
  train, heldout, truth = personal_data.make_personal_data(
      num_users, seed, facts)
  data_dir = os.path.join(workdir, "data")
  data = dict(
      train=personal_data.write_jsonl(train, os.path.join(
          data_dir, "train.jsonl")),
      heldout=personal_data.write_jsonl(heldout, os.path.join(
          data_dir, "heldout.jsonl")),
      truth=truth, heldout_records=heldout)
  example = sorted(truth)[0]
  progress(f"{num_users} users x {len(facts)} facts: {len(train)} training "
           f"and {len(heldout)} held-out prompts (held-out questions are "
           f"paraphrases never trained on); e.g. {example}: {truth[example]}")

  progress.stage("train", f"4/5 training {num_users} adapters together")
  registry_dir = os.path.join(workdir, "registry")
  cfg = train_config(recipe, num_users, base_dir=base_dir, data=data,
                     registry_dir=registry_dir, overrides=overrides)
  progress(f"rank {cfg.lora.rank} LoRA on {cfg.lora.targets}, "
           f"{cfg.steps_per_cohort} steps of {cfg.batch_size} rows, lr "
           f"{cfg.optimizer.learning_rate}, loss window {cfg.loss_window}")
  trained = train_and_publish(cfg, os.path.join(workdir, "train"),
                              base=base)
  timing = trained["timing"]
  secs = max(timing["step_seconds"], 1e-9)
  evals = trained["evals"]
  adapted = {u: e["exact_match"] for u, e in evals.items() if e}
  base_acc = {u: e["base_exact_match"] for u, e in evals.items() if e}
  worst_user = min(adapted, key=adapted.get)
  progress(f"published {len(trained['published'])} revisions; held-out "
           f"exact match: adapted {np.mean(list(adapted.values())):.3f} "
           f"(worst {worst_user}: {adapted[worst_user]:.3f}), base "
           f"{np.mean(list(base_acc.values())):.3f}")

  progress.stage("serve", "5/5 serving one mixed batch")
  registry = Registry.open(registry_dir)
  try:
    served = serve_section(base, registry, cfg, data, progress,
                           device_slots=device_slots)
    first_ref = trained["published"][worst_user]
    adapter_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(
        registry.load(first_ref)[1].lora_a)) + sum(
            int(x.nbytes) for x in jax.tree.leaves(
                registry.load(first_ref)[1].lora_b))
    revisions = {u: len(registry.history(u)) for u in truth}
  finally:
    registry.close()
  progress.end()

  summary = dict(
      workdir=workdir, base_checkpoint=base_dir, base_converted_now=converted,
      base_fingerprint=base.fingerprint, registry=registry_dir,
      train_workdir=os.path.join(workdir, "train"),
      data=dict(train=data["train"], heldout=data["heldout"]),
      num_users=num_users,
      foundation=foundation,
      heldout_accuracy=dict(
          base_mean=float(np.mean(list(base_acc.values()))),
          adapted_mean=float(np.mean(list(adapted.values()))),
          adapted_worst=float(adapted[worst_user]), worst_user=worst_user,
          base_best=float(max(base_acc.values()))),
      served_accuracy=[r["served_accuracy"] for r in served["rounds"]],
      adapter_bytes=adapter_bytes, base_bytes=base_bytes,
      adapter_fraction_of_base=adapter_bytes / base_bytes,
      train_steps=trained["steps"],
      train_tokens_per_s=timing["input_tokens"] / secs,
      train_completion_tokens_per_s=timing["completion_tokens"] / secs,
      train_first_step_seconds=timing["first_step_seconds"],
      decode_tokens_per_s=served["decode_tokens_per_s"],
      residency_hit_rates=served["hit_rates"], residency=served["residency"],
      serve_compilations_after_warmup=served["compilations_since_warmup"],
      revisions_per_user=revisions, published=trained["published"],
      answers=served["answers"], stage_seconds=progress.stage_seconds,
      total_seconds=round(time.perf_counter() - progress.t0, 2))
  with open(os.path.join(workdir, "summary.json"), "w",
            encoding="utf-8") as f:
    json.dump(summary, f, indent=1, default=str)
  for line in format_summary(summary):
    log(line)
  return summary


def format_summary(s: dict) -> list[str]:
  """The printed summary table."""
  acc = s["heldout_accuracy"]
  res = s.get("residency", {})
  tiers = []
  for tier in ("device", "host"):
    t = res.get(tier, {})
    looked = t.get("hits", 0) + t.get("misses", 0)
    tiers.append(f"{tier} {s['residency_hit_rates'].get(tier, 0.0):.0%} of "
                 f"{looked} lookups")
  hits = ", ".join(tiers) + (f"; {res.get('store', {}).get('loads', 0)} "
                             "loads from the store")
  stages = ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
  return [
      "",
      "=== mintjax demo summary ===",
      f"users / adapters          {s['num_users']} (one revision each: "
      f"{all(n == 1 for n in s['revisions_per_user'].values())})",
      f"held-out exact match      base {acc['base_mean']:.1%}  ->  adapted "
      f"{acc['adapted_mean']:.1%} (worst user {acc['worst_user']}: "
      f"{acc['adapted_worst']:.1%})",
      f"served answers correct    " + ", ".join(
          f"round {i + 1} {a:.1%}" for i, a in enumerate(
              s["served_accuracy"])),
      f"adapter size              {s['adapter_bytes'] / 2**20:.2f} MiB = "
      f"{s['adapter_fraction_of_base']:.3%} of the base "
      f"({s['base_bytes'] / 2**20:.0f} MiB)",
      f"training                  {s['train_tokens_per_s']:.0f} tokens/s "
      f"({s['train_completion_tokens_per_s']:.0f} completion tokens/s), "
      f"{s['train_steps']} steps",
      f"decode                    {s['decode_tokens_per_s']:.1f} tokens/s "
      f"(mixed batches, {s['serve_compilations_after_warmup']} compilations "
      "after warm-up)",
      f"residency hit rates       {hits}",
      f"base checkpoint           {s['base_checkpoint']}"
      f"{' (converted now)' if s['base_converted_now'] else ' (cached)'}",
      f"registry                  {s['registry']}",
      f"training checkpoints      {s['train_workdir']}",
      f"time                      {s['total_seconds']:.0f}s ({stages})",
  ]
