"""Registry behaviour: publish/load round trips, refs, tags, evals, gc, verify,
and a corpus of bad inputs that must raise clear errors and change nothing."""

import hashlib
import math
import os
import time

import ml_dtypes
import numpy as np
import pytest
import xxhash

from mintjax.adapters.spec import AdapterInfo, AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.errors import (BaseMismatchError, CatalogError,
                                  InvalidAdapterError, LeaseExpiredError,
                                  RegistryError, StoreCorruptionError,
                                  UnknownRefError)
from mintjax.store.registry import Registry, Revision
from mintjax.store.weights import RowLayout

CFG = ModelConfig("llama", vocab_size=300, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BASE = "sha256:" + "ab" * 32


def _w(seed, targets=("q", "v"), rank=2, alpha=4.0):
  return AdapterWeights.random(CFG, targets, rank, alpha=alpha, seed=seed)


def _same(w1, w2):
  return set(w1.lora_a) == set(w2.lora_a) and all(
      np.array_equal(w1.lora_a[t], w2.lora_a[t]) and
      np.array_equal(w1.lora_b[t], w2.lora_b[t]) for t in w1.lora_a)


@pytest.fixture
def reg(tmp_path):
  r = Registry.open(str(tmp_path / "reg"))
  r.create_adapter("alice", spec=dict(targets=("q", "v"), rank=2, alpha=4.0),
                   base_fingerprint=BASE, owner="team-a")
  yield r
  r.close()


def test_publish_load_bit_exact_and_numbering(reg):
  revs = [reg.publish("alice", _w(s), {"seed": s, "steps": 10 * s})
          for s in range(3)]
  assert [r.revision for r in revs] == [1, 2, 3]
  assert [r.parent for r in revs] == [None, 1, 2]
  assert revs[2].ref == "alice@3" and isinstance(revs[2], Revision)
  for s, r in enumerate(revs):
    rev, w = reg.load(r.ref, expect_base=BASE)
    assert rev == r and _same(w, _w(s))
    assert w.rank == 2 and w.alpha == 4.0
  assert reg.resolve("alice").revision == 3
  assert reg.resolve("alice:latest").revision == 3
  prov = revs[1].provenance
  assert prov["base_fingerprint"] == BASE and prov["seed"] == 1
  assert prov["steps"] == 10 and prov["host"]
  assert prov["code_version"]["mintjax"]
  assert revs[0].sha256.startswith("sha256:") and len(revs[0].sha256) == 71
  assert [r.revision for r in reg.history("alice")] == [1, 2, 3]


def test_explicit_parent_and_load_many_order(reg):
  reg.publish("alice", _w(0))
  reg.publish("alice", _w(1))
  r3 = reg.publish("alice", _w(2), parent=1)
  assert r3.parent == 1
  reg.create_adapter("bob", spec=dict(targets=("q", "k", "v", "o", "gate",
                                               "up", "down"), rank=3,
                                      alpha=3.0), base_fingerprint=BASE)
  reg.publish("bob", _w(7, targets=("q", "k", "v", "o", "gate", "up", "down"),
                        rank=3, alpha=3.0))
  pairs = reg.load_many(["alice@2", "bob", "alice@1", "alice@2"])
  assert [r.ref for r, _ in pairs] == ["alice@2", "bob@1", "alice@1",
                                        "alice@2"]
  assert _same(pairs[0][1], _w(1)) and _same(pairs[2][1], _w(0))
  assert _same(pairs[1][1], _w(7, targets=("q", "k", "v", "o", "gate", "up",
                                           "down"), rank=3, alpha=3.0))


def test_tags_rollback_and_history(reg):
  for s in range(3):
    reg.publish("alice", _w(s))
  reg.tag("alice@1", "prod")
  reg.tag("alice@3", "prod", reason="promote")
  assert reg.resolve("alice:prod").revision == 3
  assert reg.rollback("alice").revision == 1
  assert reg.resolve("alice:prod").revision == 1
  assert reg.rollback("alice", to=2).revision == 2
  events = reg.tag_history("alice", "prod")
  assert [(e["old"], e["new"]) for e in events] == [(None, 1), (1, 3),
                                                    (3, 1), (1, 2)]
  assert events[1]["reason"] == "promote"
  assert events[2]["reason"].startswith("rollback")
  assert reg.tags("alice") == {"prod": 2}


def test_evals_and_residency(reg):
  reg.publish("alice", _w(0))
  reg.publish("alice", _w(1))
  reg.record_eval("alice@1", "loss", 2.5, data_fingerprint="sha256:dd")
  reg.record_eval("alice", "loss", 1.25)
  assert [e["value"] for e in reg.evals("alice@1")] == [2.5]
  assert reg.evals("alice@1")[0]["data_fingerprint"] == "sha256:dd"
  assert [e["value"] for e in reg.evals("alice@2")] == [1.25]
  rev = reg.resolve("alice@2")
  reg.record_residency(rev, served=5, loads=1)
  reg.record_residency("alice@2", served=2)
  (stats,) = reg.residency("alice")
  assert stats["served_count"] == 7 and stats["load_count"] == 1
  assert stats["last_served"] is not None


def test_diff_norms(reg):
  reg.publish("alice", _w(0))
  reg.publish("alice", _w(1))
  same = reg.diff("alice@1", "alice@1")
  assert set(same) == {"q", "v"} and same["q"]["delta"] == 0.0
  d = reg.diff("alice@1", "alice@2")
  w0 = _w(0)
  want = np.linalg.norm(w0.scale * np.einsum(
      "lir,lro->lio", w0.lora_a["q"].astype(np.float64),
      w0.lora_b["q"].astype(np.float64)))
  assert math.isclose(d["q"]["norm_a"], want, rel_tol=1e-12)
  assert d["q"]["delta"] > 0 and d["v"]["rel"] > 0


def test_gc_reclaims_only_expired_reservations_and_never_reuses_shards(reg):
  r1 = reg.publish("alice", _w(0))
  rec = reg.adapter("alice")
  layout = RowLayout.from_dict(rec["layout"])
  # A publisher that reserved a shard, wrote part of it and died.
  rps = reg.catalog.arrays()[0][2]
  res = reg.catalog.reserve_shards(
      array_key=rec["array_key"], layout_json=rec["layout_json"],
      rows_per_shard=rps, num_shards=1, lease_s=0.5)
  reg.store.write_rows(rec["array_key"], layout, res.first_row,
                       np.ones((2, layout.row_len), np.float32))
  assert res.first_shard in reg.store.shard_files(rec["array_key"])
  live = reg.gc()  # Lease not expired: a live publisher keeps everything.
  assert live["reclaimed_reservations"] == 0 and live["live_reservations"] == 1
  assert res.first_shard in reg.store.shard_files(rec["array_key"])
  time.sleep(0.6)
  done = reg.gc()
  assert done["reclaimed_reservations"] == 1 and done["deleted_files"] >= 1
  assert not reg.catalog.reservations()
  assert reg.store.shard_files(rec["array_key"]) == {r1.row // rps}
  # The dead publisher can no longer commit anything (fencing).
  with pytest.raises(LeaseExpiredError, match="reclaimed by `gc`"):
    reg.catalog.commit_revisions(res.token, [])
  r2 = reg.publish("alice", _w(1))
  assert r2.row // rps > res.first_shard  # Shard numbers are never reused.
  assert reg.verify()["ok"] and _same(reg.load("alice@1")[1], _w(0))


def test_loads_check_the_xxh3_64_recorded_at_publish(reg, tmp_path):
  rev = reg.publish("alice", _w(0))
  layout = RowLayout.from_dict(reg.adapter("alice")["layout"])
  (row,) = reg.loader.read_rows([rev], [layout], verify=False)
  # Computed here, independently of mintjax: xxh3-64 of the row's bytes as
  # a signed 64-bit integer, in a column named for the algorithm.
  want = xxhash.xxh3_64_intdigest(np.ascontiguousarray(row, "<f4").tobytes())
  want -= (1 << 64) if want >= (1 << 63) else 0
  (stored,), = reg.catalog.query("SELECT xxh3_64 FROM revisions")
  assert stored == want == reg.resolve("alice@1").xxh3_64
  # Same bytes, another recorded checksum: the load compares against the
  # catalog and refuses (a load that skipped the check would pass).
  reg.catalog._db.execute("UPDATE revisions SET xxh3_64 = xxh3_64 + 1")
  with pytest.raises(StoreCorruptionError, match="alice@1.*xxh3-64"):
    reg.load("alice")
  assert _same(Registry.open(str(tmp_path / "reg"), verify_checksums=False
                             ).load("alice")[1], _w(0))


def test_verify_lists_every_bad_ref_and_loads_check_crc(reg):
  revs = [reg.publish("alice", _w(s)) for s in range(4)]
  layout = RowLayout.from_dict(reg.adapter("alice")["layout"])
  paths = [reg.store.shard_location(r.array_key, layout, r.row) for r in revs]
  assert len(set(paths)) == 4  # One single publish, one write-once file.
  with open(paths[0], "r+b") as f:  # Flip one data byte of alice@1.
    b = f.read(1)
    f.seek(0)
    f.write(bytes([b[0] ^ 0x01]))
  os.remove(paths[2])  # Lose alice@3's shard entirely.
  report = reg.verify()
  assert not report["ok"] and report["bad"] == ["alice@1", "alice@3"]
  assert paths[2] in report["problems"]["alice@3"]
  with pytest.raises(StoreCorruptionError) as e:
    reg.load("alice@1")
  assert "alice@1" in str(e.value) and paths[0] in str(e.value)
  assert "xxh3-64" in str(e.value)
  with pytest.raises(StoreCorruptionError, match="missing") as e:
    reg.load_many(["alice@2", "alice@3"])
  assert "alice@3" in str(e.value) and paths[2] in str(e.value)
  assert _same(reg.load("alice@2")[1], _w(1))
  # The explicit opt-out (benchmarks) skips the checksum, not the
  # missing-file check: a lost shard never reads as zeros.
  raw = Registry.open(os.path.dirname(reg.catalog.path),
                      verify_checksums=False)
  assert not _same(raw.load("alice@1")[1], _w(0))
  with pytest.raises(StoreCorruptionError, match="missing"):
    raw.load("alice@3")


def test_zstd_missing_and_damaged_rows_raise(tmp_path):
  reg = Registry.open(str(tmp_path / "z"), compression="zstd")
  reg.create_adapter("z", spec=dict(targets=("q", "v"), rank=2, alpha=4.0),
                     base_fingerprint=BASE)
  r1, r2 = reg.publish("z", _w(0)), reg.publish("z", _w(1))
  layout = RowLayout.from_dict(reg.adapter("z")["layout"])
  os.remove(reg.store.shard_location(r1.array_key, layout, r1.row))
  report = reg.verify()
  assert report["bad"] == ["z@1"]
  with pytest.raises(StoreCorruptionError, match="z@1"):
    reg.load("z@1")
  assert _same(reg.load("z@2")[1], _w(1))
  del r2


def test_bfloat16_rows_and_zstd(tmp_path):
  reg = Registry.open({"catalog": str(tmp_path / "c.sqlite"),
                       "store": str(tmp_path / "store"),
                       "compression": "zstd"})
  reg.create_adapter("b16", spec=AdapterInfo.for_bank(
      AdapterSpec(targets=("q",), max_rank=2, dtype="bfloat16"), alpha=2.0),
                     base_fingerprint=BASE, config=CFG)
  w = _w(3, targets=("q",), rank=2, alpha=2.0)
  w = AdapterWeights({t: a.astype(ml_dtypes.bfloat16) for t, a in
                      w.lora_a.items()},
                     {t: b.astype(ml_dtypes.bfloat16) for t, b in
                      w.lora_b.items()}, rank=2, alpha=2.0)
  reg.publish("b16", w)
  _, back = reg.load("b16")
  assert back.lora_a["q"].dtype == ml_dtypes.bfloat16 and _same(back, w)
  zarr = open(next(os.path.join(d, f) for d, _, fs in os.walk(
      tmp_path / "store") for f in fs if f == "zarr.json")).read()
  assert "zstd" in zarr and "sharding_indexed" in zarr


def test_publish_many_is_one_batch(reg):
  revs = reg.publish_many([("alice", _w(s), {"seed": s}) for s in range(5)])
  assert [r.revision for r in revs] == [1, 2, 3, 4, 5]
  assert sorted(r.row for r in revs) == list(range(5))
  assert all(_same(w, _w(s)) for s, (_, w) in enumerate(
      reg.load_many([r.ref for r in revs])))


# --- bad inputs: a clear error and no change to catalog or store ----------


def _snapshot(reg, root):
  tables = {t: reg.catalog.query(f"SELECT * FROM {t}") for t in (
      "adapters", "revisions", "evals", "tags", "tag_events", "residency",
      "arrays", "reservations")}
  files = {}
  for d, _, fs in os.walk(os.path.join(root, "arrays")):
    for f in fs:
      p = os.path.join(d, f)
      files[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return tables, files


def _bad_nan():
  w = _w(0)
  a = dict(w.lora_a)
  a["q"] = a["q"].copy()
  a["q"][0, 0, 0] = np.nan
  return AdapterWeights(a, w.lora_b, 2, 4.0)


def _bad_inf():
  w = _w(0)
  b = dict(w.lora_b)
  b["v"] = b["v"].copy()
  b["v"][1, 1, 1] = -np.inf
  return AdapterWeights(w.lora_a, b, 2, 4.0)


def _bad_shape():
  w = _w(0)
  a = dict(w.lora_a)
  a["q"] = np.zeros((2, 31, 2), np.float32)
  return AdapterWeights(a, w.lora_b, 2, 4.0)


_SPEC = dict(targets=("q",), rank=1, alpha=1.0)
BAD_CASES = {
    "id_path": (lambda r: r.create_adapter("../etc", spec=_SPEC,
                                           base_fingerprint=BASE),
                InvalidAdapterError, "never paths"),
    "id_slash": (lambda r: r.create_adapter("a/b", spec=_SPEC,
                                            base_fingerprint=BASE),
                 InvalidAdapterError, "invalid adapter id"),
    "id_empty": (lambda r: r.create_adapter("", spec=_SPEC,
                                            base_fingerprint=BASE),
                 InvalidAdapterError, "invalid adapter id"),
    "id_dot": (lambda r: r.create_adapter(".hidden", spec=_SPEC,
                                          base_fingerprint=BASE),
               InvalidAdapterError, "starting with a letter"),
    "id_space": (lambda r: r.create_adapter("a b", spec=_SPEC,
                                            base_fingerprint=BASE),
                 InvalidAdapterError, "invalid adapter id"),
    "duplicate_id": (lambda r: r.create_adapter("alice", spec=_SPEC,
                                                base_fingerprint=BASE),
                     InvalidAdapterError, "already exists"),
    "unknown_target": (lambda r: r.create_adapter(
        "x", spec=dict(targets=("zz",), rank=1), base_fingerprint=BASE),
                       InvalidAdapterError, "unknown target"),
    "rank_zero": (lambda r: r.create_adapter(
        "x", spec=dict(targets=("q",), rank=0), base_fingerprint=BASE),
                  InvalidAdapterError, "rank must be a positive int"),
    "alpha_nan": (lambda r: r.create_adapter(
        "x", spec=dict(targets=("q",), rank=1, alpha=float("nan")),
        base_fingerprint=BASE), InvalidAdapterError, "alpha"),
    "empty_base": (lambda r: r.create_adapter("x", spec=_SPEC,
                                              base_fingerprint=""),
                   InvalidAdapterError, "base_fingerprint"),
    "spec_unknown_key": (lambda r: r.create_adapter(
        "x", spec=dict(targets=("q",), rank=1, dropout=0.1),
        base_fingerprint=BASE), InvalidAdapterError, "unknown keys"),
    "publish_unknown": (lambda r: r.publish("nobody", _w(0)),
                        UnknownRefError, "unknown adapter"),
    "publish_nan": (lambda r: r.publish("alice", _bad_nan()),
                    InvalidAdapterError, "NaN or Inf"),
    "publish_inf": (lambda r: r.publish("alice", _bad_inf()),
                    InvalidAdapterError, "NaN or Inf"),
    "publish_rank": (lambda r: r.publish("alice", _w(0, rank=3, alpha=4.0)),
                     InvalidAdapterError, "rank 3"),
    "publish_shape": (lambda r: r.publish("alice", _bad_shape()),
                      InvalidAdapterError, "expected (2, 32, 2)"),
    "publish_missing_target": (lambda r: r.publish(
        "alice", _w(0, targets=("q",))), InvalidAdapterError, "targets"),
    "publish_extra_target": (lambda r: r.publish(
        "alice", _w(0, targets=("q", "k", "v"))), InvalidAdapterError,
                             "targets"),
    "publish_alpha": (lambda r: r.publish("alice", _w(0, alpha=8.0)),
                      InvalidAdapterError, "alpha"),
    "publish_base": (lambda r: r.publish(
        "alice", _w(0), {"base_fingerprint": "sha256:other"}),
                     BaseMismatchError, "base"),
    "publish_prov_json": (lambda r: r.publish("alice", _w(0),
                                              {"cfg": object()}),
                          InvalidAdapterError, "JSON"),
    "publish_prov_steps": (lambda r: r.publish("alice", _w(0),
                                               {"steps": "ten"}),
                           InvalidAdapterError, "steps"),
    "publish_parent": (lambda r: r.publish("alice", _w(0), parent=9),
                       UnknownRefError, "parent alice@9"),
    "publish_many_last_bad": (lambda r: r.publish_many(
        [("alice", _w(0)), ("alice", _bad_nan())]), InvalidAdapterError,
                              "NaN"),
    "resolve_unknown_adapter": (lambda r: r.resolve("nobody"),
                                UnknownRefError, "unknown adapter"),
    "resolve_unknown_rev": (lambda r: r.resolve("alice@9"),
                            UnknownRefError, "revisions 1..1"),
    "resolve_unknown_tag": (lambda r: r.resolve("alice:gold"),
                            UnknownRefError, "no tag 'gold'"),
    "ref_bad_rev": (lambda r: r.resolve("alice@x"), InvalidAdapterError,
                    "revisions are numbered"),
    "ref_rev_zero": (lambda r: r.resolve("alice@0"), InvalidAdapterError,
                     "revisions are numbered"),
    "ref_both": (lambda r: r.resolve("alice@1:prod"), InvalidAdapterError,
                 "invalid reference"),
    "load_base": (lambda r: r.load("alice", expect_base="sha256:cd"),
                  BaseMismatchError, "convert or retrain"),
    "load_many_unknown": (lambda r: r.load_many(["alice", "alice@5"]),
                          UnknownRefError, "names no revision"),
    "tag_name": (lambda r: r.tag("alice@1", "bad tag"), InvalidAdapterError,
                 "invalid tag"),
    "tag_unknown_ref": (lambda r: r.tag("alice@4", "prod"), UnknownRefError,
                        "names no revision"),
    "rollback_no_tag": (lambda r: r.rollback("alice", "prod"),
                        UnknownRefError, "no tag 'prod'"),
    "eval_nan": (lambda r: r.record_eval("alice", "loss", float("nan")),
                 InvalidAdapterError, "finite"),
    "residency_negative": (lambda r: r.record_residency("alice", served=-1),
                           InvalidAdapterError, ">= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_without_state_change(tmp_path, case):
  root = str(tmp_path / "reg")
  reg = Registry.open(root)
  reg.create_adapter("alice", spec=dict(targets=("q", "v"), rank=2,
                                        alpha=4.0), base_fingerprint=BASE)
  reg.publish("alice", _w(0))
  before = _snapshot(reg, root)
  fn, exc, words = BAD_CASES[case]
  with pytest.raises(exc, match=None) as info:
    fn(reg)
  assert isinstance(info.value, RegistryError)
  assert words in str(info.value), str(info.value)
  assert _snapshot(reg, root) == before
  reg.close()


def test_bad_input_corpus_is_large_enough():
  assert len(BAD_CASES) >= 20


def test_bulk_create_and_publish(reg):
  ids = [f"u{i}" for i in range(6)]
  reg.create_adapters(ids, spec=dict(targets=("q", "v"), rank=2, alpha=4.0),
                      base_fingerprint=BASE, config=CFG)
  with pytest.raises(InvalidAdapterError, match="already exist"):
    reg.create_adapters(["u9", "u1"], spec=dict(targets=("q",), rank=1),
                        base_fingerprint=BASE)
  assert reg.catalog.adapter("u9") is None
  revs = reg.publish_many([(i, _w(n), {"seed": n}) for n, i in enumerate(ids)])
  assert [r.ref for r in revs] == [f"{i}@1" for i in ids]
  assert all(reg.resolve(r.ref) == r for r in revs)


def test_store_location_specs(tmp_path):
  from mintjax.store.weights import kvstore_spec
  assert kvstore_spec("gs://bucket/a/b") == {"driver": "gcs",
                                             "bucket": "bucket",
                                             "path": "a/b/"}
  assert kvstore_spec("s3://bkt") == {"driver": "s3", "bucket": "bkt",
                                      "path": ""}
  assert kvstore_spec("file:///x/y")["path"] == "/x/y/"
  with pytest.raises(RegistryError, match="unsupported store URL"):
    kvstore_spec("ftp://host/x")
  with pytest.raises(RegistryError, match="catalog must be local"):
    Registry.open("gs://bucket/x")
  # A non-file kvstore by configuration: tensorstore's in-memory driver.
  reg = Registry.open({"catalog": str(tmp_path / "c.sqlite"),
                       "store": {"driver": "memory", "path": "mint/"}})
  reg.create_adapter("m", spec=dict(targets=("q", "v"), rank=2, alpha=4.0),
                     base_fingerprint=BASE)
  reg.publish("m", _w(5))
  assert _same(reg.load("m")[1], _w(5)) and reg.verify()["ok"]
  assert not os.path.exists(tmp_path / "arrays")


def test_fresh_process_publishes_into_a_new_shard(tmp_path):
  root = str(tmp_path / "reg")
  first = Registry.open(root)
  first.create_adapter("g", spec=dict(targets=("q",), rank=1, alpha=1.0),
                       base_fingerprint=BASE)
  w = _w(0, targets=("q",), rank=1, alpha=1.0)
  revs = first.publish_many([("g", w)] * 4200)  # Two shards of 4096 rows.
  key = revs[0].array_key
  assert first.store.shard_files(key) == {0, 1}
  zarr = os.path.join(root, "arrays", key, "zarr.json")
  before = open(zarr, "rb").read()
  second = Registry.open(root)  # A new store handle, as in a new process.
  rev = second.publish("g", _w(1, targets=("q",), rank=1, alpha=1.0))
  # Shard 1 is partly empty but written once: a new publish takes shard 2.
  assert rev.revision == 4201 and rev.row == 2 * 4096
  assert first.store.shard_files(key) == {0, 1, 2}
  assert open(zarr, "rb").read() == before  # Metadata is written once.
  assert _same(first.load("g")[1], _w(1, targets=("q",), rank=1, alpha=1.0))
  assert first.verify()["ok"]


def test_ids_tags_and_revisions_are_strict_ascii(reg):
  reg.publish("alice", _w(0))
  for bad in ("alice\n", "alice\n@1", "al\u00efce"):
    with pytest.raises(InvalidAdapterError):
      reg.resolve(bad)
  with pytest.raises(InvalidAdapterError, match="revisions are numbered"):
    reg.resolve("alice@\u0661")  # Arabic-Indic digit one.
  with pytest.raises(InvalidAdapterError, match="invalid tag"):
    reg.tag("alice@1", "prod\n")
  with pytest.raises(InvalidAdapterError, match="invalid adapter id"):
    reg.create_adapter("bob\n", spec=_SPEC, base_fingerprint=BASE)
  assert reg.tags("alice") == {} and reg.catalog.adapter("bob\n") is None


def test_load_returns_a_named_tuple(reg):
  r1 = reg.publish("alice", _w(0))
  loaded = reg.load("alice")
  assert loaded.revision == r1 and _same(loaded.weights, _w(0))
  rev, w = loaded
  assert rev == r1 and w is loaded.weights


@pytest.mark.parametrize("version", ["1", "2"])
def test_old_schema_catalog_is_refused_unchanged(tmp_path, version):
  import sqlite3
  path = tmp_path / "old"
  path.mkdir()
  db = sqlite3.connect(path / "catalog.sqlite")
  db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
  db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
  db.commit()
  db.close()
  before = open(path / "catalog.sqlite", "rb").read()
  with pytest.raises(CatalogError,
                     match=f"schema version {version}.*export-peft"):
    Registry.open(str(path))
  assert open(path / "catalog.sqlite", "rb").read() == before
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "catalog.sqlite").write_bytes(b"not a database" * 99)
  with pytest.raises(CatalogError, match="not a readable mintjax catalog"):
    Registry.open(str(tmp_path / "junk"))
