"""Crash safety and multi-process publishing of the adapter registry.

Workers are real subprocesses (`tools/crash_test.py`); crashes are real
SIGKILLs at random moments. `tools/crash_test.py --trials=200` runs the long
version of the first test.
"""

import random
import shutil

import numpy as np

from mintjax.store.registry import Registry
from tools import crash_test


def test_sigkill_during_publish_loses_nothing_committed():
  path = crash_test.new_crash_registry()
  try:
    rng = random.Random(1234)
    total_published = 0
    for trial in range(6):
      result = crash_test.crash_trial(path, trial, rng, max_delay_s=0.25)
      assert result["published"] >= 1
      total_published += result["published"]
    reg = Registry.open(path)
    assert len(reg.history("victim")) == total_published
    assert reg.verify()["ok"]
  finally:
    shutil.rmtree(path, ignore_errors=True)


def test_four_processes_publish_concurrently(tmp_path):
  path = str(tmp_path / "reg")
  # A registry opened before the workers run holds cached shard indexes;
  # it must still read their rows correctly afterwards.
  early = Registry.open(path)
  crash_test.create(early, "shared")
  early.publish("shared", crash_test.weights_for(999_999), {"seed": 999_999})
  early.load("shared")
  crash_test.run_concurrent(path, workers=4, count=8)
  summary = crash_test.check_registry(path)
  for rev, w in early.load_many([r.ref for r in early.history("shared")]):
    want = crash_test.weights_for(rev.provenance["seed"])
    assert all(np.array_equal(w.lora_a[t], want.lora_a[t]) and
               np.array_equal(w.lora_b[t], want.lora_b[t])
               for t in crash_test.TARGETS), rev.ref
  reg = Registry.open(path)
  shared = reg.history("shared")
  assert [r.revision for r in shared] == list(range(1, 18))
  assert sorted(r.provenance["seed"] for r in shared[1:]) == sorted(
      w * 1000 + i for w in range(4) for i in range(0, 8, 2))
  for w in range(4):
    own = reg.history(f"own-{w}")
    assert [r.revision for r in own] == [1, 2, 3, 4]
    assert {r.provenance["steps"] for r in own} == {w}
  assert summary["revisions"] == 33
  rows = [(r.array_key, r.row) for r in reg.catalog.revisions()]
  assert len(set(rows)) == len(rows)
