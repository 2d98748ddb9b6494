"""Durability mechanisms of the store, one behaviour per test.

Leases and fencing (a publish that outlives its lease publishes nothing),
stale lock files of killed writers (harmless: no key is written twice), the
tensorstore behaviour that makes rewriting a key unsafe, and the catalog
never leaking a raw sqlite3 error.
"""

import json
import os
import sqlite3
import time

import numpy as np
import pytest
import tensorstore as ts

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.errors import (CatalogError, LeaseExpiredError,
                                  StoreCorruptionError)
from mintjax.store.registry import Registry
from mintjax.store.sqlite_catalog import SqliteCatalog
from mintjax.store.weights import RowLayout, WeightsStore

CFG = ModelConfig("llama", vocab_size=64, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BASE = "sha256:" + "2" * 64
SPEC = dict(targets=("q", "v"), rank=2, alpha=4.0)


def _w(seed):
  return AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0, seed=seed)


def _same(a, b):
  return all(np.array_equal(a.lora_a[t], b.lora_a[t]) and
             np.array_equal(a.lora_b[t], b.lora_b[t]) for t in a.lora_a)


def test_rewriting_a_key_over_a_stale_lock_keeps_old_bytes(tmp_path):
  # Why shards are written once: tensorstore's file kvstore writes
  # `<key>.__lock` then renames it; a killed writer's longer lock file is
  # not truncated by the next write, so stale bytes survive the rename.
  kv = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}
                       ).result()
  kv.write("k", b"x" * 1000).result()
  (tmp_path / "k.__lock").write_bytes(b"y" * 1000)  # A dead writer's.
  kv.write("k", b"short").result()
  assert len(kv.read("k").result().value) == 1000  # Not b"short".


def test_publish_outliving_its_lease_publishes_nothing(tmp_path):
  root = str(tmp_path / "r")
  reg = Registry.open(root)
  reg.create_adapter("a", spec=SPEC, base_fingerprint=BASE, config=CFG)
  r1 = reg.publish("a", _w(0))
  before = reg.catalog.counts()
  hasty = Registry.open(root, lease_s=1e-6)  # Expires before the commit.
  with pytest.raises(LeaseExpiredError, match="nothing was published"):
    hasty.publish_many([("a", _w(1)), ("a", _w(2))])
  assert reg.catalog.counts() == before and not reg.catalog.reservations()
  # Its shard was abandoned and deleted; only r1's shard remains.
  assert reg.store.shard_files(r1.array_key) == {0}
  assert reg.history("a") == [r1] and reg.verify()["ok"]
  assert reg.publish("a", _w(3)).revision == 2


def test_stale_lock_files_of_killed_writers_are_harmless(tmp_path):
  root = str(tmp_path / "r")
  reg = Registry.open(root, lease_s=0.3)
  reg.create_adapter("a", spec=SPEC, base_fingerprint=BASE, config=CFG)
  rec = reg.adapter("a")
  key = rec["array_key"]
  # A creator killed while writing the array's metadata.
  os.makedirs(os.path.join(root, "arrays", key))
  with open(os.path.join(root, "arrays", key, "zarr.json.__lock"), "wb") as f:
    f.write(b"\0garbage" * 4096)
  r1 = reg.publish("a", _w(0))
  with open(os.path.join(root, "arrays", key, "zarr.json")) as f:
    assert json.load(f)["zarr_format"] == 3
  # A publisher killed mid-write: a reservation and a long lock file.
  layout = RowLayout.from_dict(rec["layout"])
  rps = reg.catalog.arrays()[0][2]
  dead = reg.catalog.reserve_shards(array_key=key,
                                    layout_json=rec["layout_json"],
                                    rows_per_shard=rps, num_shards=1,
                                    lease_s=0.3)
  lock = reg.store.shard_location(key, layout, dead.first_row) + ".__lock"
  os.makedirs(os.path.dirname(lock))
  with open(lock, "wb") as f:
    f.write(b"\xff" * 100_000)
  revs = reg.publish_many([("a", _w(s)) for s in range(1, 4)])
  assert all(r.row // rps != dead.first_shard for r in revs)
  assert reg.gc()["reclaimed_reservations"] == 0  # Lease still running.
  assert os.path.exists(lock)
  time.sleep(0.35)
  assert reg.gc()["reclaimed_reservations"] == 1
  assert not os.path.exists(lock) and not os.path.isdir(
      os.path.dirname(lock))
  for s, ref in enumerate([r1.ref] + [r.ref for r in revs]):
    assert _same(reg.load(ref)[1], _w(s))
  assert reg.verify()["ok"]


def test_catalog_errors_are_registry_errors(tmp_path):
  root = str(tmp_path / "r")
  reg = Registry.open(root)
  reg.create_adapter("a", spec=SPEC, base_fingerprint=BASE, config=CFG)
  other = sqlite3.connect(os.path.join(root, "catalog.sqlite"),
                          isolation_level=None)
  other.execute("BEGIN EXCLUSIVE")  # Another process holds the lock.
  try:
    blocked = Registry(SqliteCatalog(os.path.join(root, "catalog.sqlite"),
                                     busy_timeout_s=0.05), WeightsStore(root))
    with pytest.raises(CatalogError, match="database is locked"):
      blocked.publish("a", _w(0))
    assert not blocked.history("a")
  finally:
    other.execute("ROLLBACK")
  assert reg.publish("a", _w(0)).revision == 1


def test_unreadable_array_metadata_and_failed_writes_are_clear(tmp_path):
  root = str(tmp_path / "r")
  reg = Registry.open(root)
  reg.create_adapter("a", spec=SPEC, base_fingerprint=BASE, config=CFG)
  r1 = reg.publish("a", _w(0))
  zarr = os.path.join(root, "arrays", r1.array_key, "zarr.json")
  with open(zarr, "w") as f:
    f.write("{not json")
  fresh = Registry.open(root)
  with pytest.raises(StoreCorruptionError, match="a@1.*zarr.json"):
    fresh.load("a@1")
  before = fresh.catalog.counts()
  with pytest.raises(StoreCorruptionError, match="zarr.json is unreadable"):
    fresh.publish("a", _w(1))
  assert fresh.catalog.counts() == before
