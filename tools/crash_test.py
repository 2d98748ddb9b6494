"""Crash-injection and concurrency harness for the adapter registry.

Owns the worker processes the store tests and this tool start:
  * `publish_loop`: publishes revisions of one adapter forever, each from a
    seed recorded in its provenance, so a checker can regenerate the exact
    weights every committed revision must hold;
  * `concurrent`: publishes N revisions alternating between a shared adapter
    and the worker's own adapter;
and the checks run afterwards (`check_registry`): `gc` + `verify` pass,
revision numbers are 1..n without gaps, every revision reads back bit-exact.

Run 200 SIGKILL trials and print the tally:

    .venv/bin/python -m tools.crash_test --trials=200
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.registry import Registry

CONFIG = ModelConfig("llama", vocab_size=300, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
TARGETS = ("q", "v")
RANK = 2
BASE = "sha256:crashtestbase"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODE = flags.DEFINE_enum("mode", "trials", ["trials", "publish_loop",
                                             "concurrent"], "what to run")
_PATH = flags.DEFINE_string("path", None, "registry directory (workers)")
_ADAPTER = flags.DEFINE_string("adapter", "victim", "adapter id (workers)")
_SEED = flags.DEFINE_integer("seed", 0, "first weights seed (workers)")
_WORKER = flags.DEFINE_integer("worker", 0, "worker index (concurrent)")
_COUNT = flags.DEFINE_integer("count", 8, "revisions per worker (concurrent)")
_TRIALS = flags.DEFINE_integer("trials", 200, "SIGKILL trials to run")
_MAX_DELAY = flags.DEFINE_float("max_delay_s", 0.3,
                                "kill within this long after the first publish")


def weights_for(seed: int) -> AdapterWeights:
  """The adapter weights a worker publishes for `seed`."""
  return AdapterWeights.random(CONFIG, TARGETS, RANK, alpha=4.0, seed=seed)


def create(reg: Registry, adapter_id: str) -> None:
  reg.create_adapter(adapter_id, spec=dict(targets=TARGETS, rank=RANK,
                                           alpha=4.0),
                     base_fingerprint=BASE, exist_ok=True)


def publish_loop(path: str, adapter_id: str, seed: int) -> None:
  """Publishes forever; prints 'ready' once the first revision committed."""
  reg = Registry.open(path)
  i = 0
  while True:
    reg.publish(adapter_id, weights_for(seed + i), {"seed": seed + i,
                                                    "steps": i})
    if i == 0:
      print("ready", flush=True)
    i += 1


def concurrent(path: str, worker: int, count: int, seed: int) -> None:
  reg = Registry.open(path)
  for i in range(count):
    target = "shared" if i % 2 == 0 else f"own-{worker}"
    s = seed + worker * 1000 + i
    reg.publish(target, weights_for(s), {"seed": s, "steps": worker})


def worker_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "tools.crash_test", *args]


def check_registry(path: str) -> dict:
  """gc + verify + gap-free numbering + bit-exact reads of every revision.

  Raises:
    AssertionError: naming the first violated invariant.
  """
  reg = Registry.open(path)
  try:
    reclaimed = reg.gc(stale_after_s=0.0)
    report = reg.verify()
    assert report["ok"], f"verify failed: {report['bad']}"
    total = 0
    for rec in reg.list_adapters():
      revs = reg.history(rec["id"])
      numbers = [r.revision for r in revs]
      assert numbers == list(range(1, len(revs) + 1)), (
          f"{rec['id']}: revision numbers {numbers} are not 1..n")
      loaded = reg.load_many([r.ref for r in revs]) if revs else []
      for rev, w in loaded:
        want = weights_for(rev.provenance["seed"])
        for t in TARGETS:
          assert np.array_equal(w.lora_a[t], want.lora_a[t]) and (
              np.array_equal(w.lora_b[t], want.lora_b[t])), (
                  f"{rev.ref} does not read back bit-exact")
      total += len(revs)
    assert not reg.catalog.pending(), "pending reservations survived gc"
    return dict(revisions=total, reclaimed_rows=reclaimed["reclaimed_rows"])
  finally:
    reg.close()


def crash_trial(path: str, trial: int, rng: random.Random,
                max_delay_s: float = 0.3) -> dict:
  """Starts a publish loop, SIGKILLs it at a random moment, checks the store."""
  before = len(Registry.open(path).history("victim"))
  proc = subprocess.Popen(
      worker_command("--mode=publish_loop", f"--path={path}",
                     "--adapter=victim", f"--seed={trial * 100000}"),
      cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if line.strip() != "ready":
    proc.kill()
    raise RuntimeError(f"worker failed to start: {line}{proc.stderr.read()}")
  time.sleep(rng.uniform(0.0, max_delay_s))
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  result = check_registry(path)
  result["published"] = result["revisions"] - before
  return result


def new_crash_registry() -> str:
  path = tempfile.mkdtemp(prefix="mint_crash_")
  reg = Registry.open(path)
  create(reg, "victim")
  reg.close()
  return path


def run_concurrent(path: str, workers: int = 4, count: int = 8) -> None:
  """Runs `workers` concurrent publishers to completion."""
  reg = Registry.open(path)
  create(reg, "shared")
  for w in range(workers):
    create(reg, f"own-{w}")
  reg.close()
  procs = [subprocess.Popen(
      worker_command("--mode=concurrent", f"--path={path}", f"--worker={w}",
                     f"--count={count}"), cwd=_REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for w in range(workers)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    if p.returncode:
      raise RuntimeError(f"concurrent worker failed: {err[-2000:]}")


def main(argv):
  del argv
  if _MODE.value == "publish_loop":
    publish_loop(_PATH.value, _ADAPTER.value, _SEED.value)
    return
  if _MODE.value == "concurrent":
    concurrent(_PATH.value, _WORKER.value, _COUNT.value, _SEED.value)
    return
  path = new_crash_registry()
  rng = random.Random(0)
  tally = dict(trials=0, passed=0, revisions=0, reclaimed_rows=0)
  start = time.perf_counter()
  try:
    for trial in range(_TRIALS.value):
      result = crash_trial(path, trial, rng, _MAX_DELAY.value)
      tally["trials"] += 1
      tally["passed"] += 1
      tally["revisions"] = result["revisions"]
      tally["reclaimed_rows"] += result["reclaimed_rows"]
  finally:
    print(f"| trials | passed | committed revisions | half-written rows "
          f"reclaimed | seconds |\n|---|---|---|---|---|\n"
          f"| {tally['trials']} | {tally['passed']} | {tally['revisions']} | "
          f"{tally['reclaimed_rows']} | {time.perf_counter() - start:.0f} |")
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
