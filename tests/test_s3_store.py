"""Adapter weights on S3-compatible object storage (moto's server, local).

The registry writes its write-once shard files through tensorstore's `s3`
kvstore: each shard is one PUT of a whole object, so an object is either
absent or complete, never partly visible. Checked here against a real S3
protocol server (moto in server mode on 127.0.0.1), with the catalog in
PostgreSQL as in a fleet: round trips, gc of a dead publisher's shard
objects, and SIGKILL trials (fewer than on local files: every worker is a
fresh interpreter). The URL parsing tests need no server and run in the
default suite; the rest are marked `fleet` (`make test-fleet`).
"""

import numpy as np
import pytest

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.errors import RegistryError, StoreCorruptionError
from mintjax.store.locations import parse_location
from mintjax.store.registry import Registry
from mintjax.store.weights import RowLayout, kvstore_spec
from tools import crash_test

CFG = ModelConfig("llama", vocab_size=64, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BASE = "sha256:" + "5" * 64
SPEC = dict(targets=("q", "v"), rank=2, alpha=4.0)


def _w(seed):
  return AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0, seed=seed)


def _same(a, b):
  return all(np.array_equal(a.lora_a[t], b.lora_a[t]) and
             np.array_equal(a.lora_b[t], b.lora_b[t]) for t in a.lora_a)


def test_s3_and_registry_urls_parse(monkeypatch):
  monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
  monkeypatch.delenv("AWS_REGION", raising=False)
  monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
  assert kvstore_spec("s3://b/p?endpoint=http://127.0.0.1:9&region=eu-1") == {
      "driver": "s3", "bucket": "b", "path": "p/",
      "endpoint": "http://127.0.0.1:9", "aws_region": "eu-1"}
  monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.local")
  monkeypatch.setenv("AWS_REGION", "us-west-2")
  assert kvstore_spec("s3://b") == {"driver": "s3", "bucket": "b", "path": "",
                                    "endpoint": "https://minio.local",
                                    "aws_region": "us-west-2"}
  with pytest.raises(RegistryError, match="unknown options.*secret"):
    kvstore_spec("s3://b/p?secret=x")
  with pytest.raises(RegistryError, match="gs:// takes none"):
    kvstore_spec("gs://b/p?endpoint=x")
  loc = parse_location("postgresql://u:pw@db.internal:5433/mint?sslmode="
                       "require&schema=prod&store=s3://bkt/reg?endpoint="
                       "http://h:9000&region=r")
  assert loc.backend == "postgresql" and loc.schema == "prod"
  assert loc.catalog == "postgresql://u:pw@db.internal:5433/mint?sslmode=" \
      "require"
  assert loc.store == "s3://bkt/reg?endpoint=http://h:9000&region=r"
  assert "pw" not in loc.display
  loc = parse_location("sqlite:///var/mint/c.sqlite?store=gs://bkt/reg")
  assert (loc.backend, loc.catalog, loc.store) == (
      "sqlite", "/var/mint/c.sqlite", "gs://bkt/reg")
  with pytest.raises(RegistryError, match="catalog must be local"):
    parse_location("s3://bkt/reg")


@pytest.fixture
def s3_registry(s3_server, postgres_server):
  bucket = s3_server.bucket()
  url = postgres_server.registry_url(s3_server.store_url(bucket))
  reg = Registry.open(url)
  reg.create_adapter("a", spec=SPEC, base_fingerprint=BASE, config=CFG)
  yield reg, bucket
  reg.close()


@pytest.mark.fleet
def test_publish_load_verify_on_s3(s3_registry, s3_server):
  reg, bucket = s3_registry
  r1 = reg.publish("a", _w(0))
  revs = reg.publish_many([("a", _w(s)) for s in range(1, 6)])
  keys = s3_server.keys(bucket)
  # One object per publish (plus the array's metadata), no temp objects.
  shards = [k for k in keys if "/c/" in k]
  assert len(shards) == 2 and sum(k.endswith("zarr.json") for k in keys) == 1
  assert not [k for k in keys if "lock" in k or "tmp" in k], keys
  fresh = Registry.open(reg.catalog._url + f"?schema={reg.catalog.schema}"
                        f"&store={s3_server.store_url(bucket)}",
                        create=False)  # Another host: same catalog, store.
  for s, rev in enumerate([r1] + revs):
    assert _same(fresh.load(rev.ref)[1], _w(s))
  assert fresh.verify() == dict(ok=True, checked=6, bad=[], problems={})
  # A lost object is reported, never read as zeros.
  layout = RowLayout.from_dict(reg.adapter("a")["layout"])
  where = reg.store.shard_location(r1.array_key, layout, r1.row)
  assert where.startswith(f"s3://{bucket}/")
  s3_server.client().delete_object(Bucket=bucket,
                                   Key=where[len(f"s3://{bucket}/"):])
  with pytest.raises(StoreCorruptionError, match="a@1"):
    Registry.open(reg.catalog._url + f"?schema={reg.catalog.schema}"
                  f"&store={s3_server.store_url(bucket)}").load("a@1")
  assert fresh.verify()["bad"] == ["a@1"]


@pytest.mark.fleet
def test_gc_deletes_a_dead_publishers_objects_on_s3(s3_registry, s3_server):
  reg, bucket = s3_registry
  r1 = reg.publish("a", _w(0))
  rec = reg.adapter("a")
  layout = RowLayout.from_dict(rec["layout"])
  res = reg.catalog.reserve_shards(
      array_key=rec["array_key"], layout_json=rec["layout_json"],
      rows_per_shard=reg.catalog.arrays()[0][2], num_shards=1, lease_s=0.3)
  reg.store.write_rows(rec["array_key"], layout, res.first_row,
                       np.ones((1, layout.row_len), np.float32))
  before = set(s3_server.keys(bucket))
  assert reg.gc()["deleted_files"] == 0  # Its lease is still running.
  __import__("time").sleep(0.4)
  out = reg.gc()
  assert out["reclaimed_reservations"] == 1 and out["deleted_files"] == 1
  after = set(s3_server.keys(bucket))
  assert len(before - after) == 1 and not after - before
  assert _same(reg.load(r1.ref)[1], _w(0)) and reg.verify()["ok"]


@pytest.mark.fleet
def test_sigkilled_writers_lose_nothing_on_s3(s3_server, postgres_server):
  bucket = s3_server.bucket()
  template = (postgres_server.url + "?schema={name}&store=" +
              s3_server.store_url(bucket, "{name}"))
  tally = crash_test.run_trials(trials=4, per_registry=2, max_delay_s=1.5,
                                seed=5, registry=template)
  assert tally["trials"] == 4 and tally["kills"] >= 4, tally
  assert tally["acked"] > 0, tally
  bad = ("lost", "unreadable", "wrong", "bad", "gaps", "verify_bad",
         "reservations_left", "orphan_shards")
  assert {k: tally[k] for k in bad} == dict.fromkeys(bad, 0), tally
