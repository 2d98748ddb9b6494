"""Tests of the direct shard-file read path (`weights.ShardFileReader`).

Checks that pread-based loads return exactly what tensorstore reads, that
unwritten rows and missing shard files are reported (never read as zeros),
that damaged shard files raise `StoreCorruptionError` instead of returning
wrong bytes, and that arrays outside the direct format (zstd) keep the
tensorstore path.
"""

import os

import numpy as np
import pytest

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.checksum import row_xxh3_64
from mintjax.store.errors import StoreCorruptionError
from mintjax.store.registry import Registry
from mintjax.store.weights import (RowLayout, ShardFileReader,
                                   direct_rows_per_shard)

CFG = ModelConfig("llama", vocab_size=64, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BASE = "sha256:" + "1" * 64


def _registry(path, n, compression=None):
  reg = Registry.open(path, compression=compression)
  ids = [f"u{i}" for i in range(n)]
  reg.create_adapters(ids, spec=dict(targets=("q", "v"), rank=2, alpha=4.0),
                      base_fingerprint=BASE, config=CFG)
  reg.publish_many([(i, AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0,
                                              seed=k))
                    for k, i in enumerate(ids)])
  return reg, ids


def _array(reg, ref):
  rev = reg.resolve(ref)
  layout = RowLayout.from_dict(reg.adapter(rev.adapter_id)["layout"])
  return rev, layout, reg.store.open_array(rev.array_key, layout)


def test_direct_reads_match_tensorstore_and_weights(tmp_path):
  reg, ids = _registry(tmp_path / "r", 40)
  rev, layout, arr = _array(reg, ids[0])
  reader = reg.store._readers[rev.array_key]
  assert isinstance(reader, ShardFileReader)
  rows = np.arange(0, 40, 3, dtype=np.int64)
  errors = {}
  np.testing.assert_array_equal(reader.read(rows, errors),
                                arr.oindex[rows].read().result())
  assert not errors
  # A row of a written shard that was never written, and a row of a shard
  # that does not exist: both reported, neither read as zeros.
  rps = reader.rows_per_shard
  reader.read(np.array([40, 5 * rps], np.int64), errors)
  assert "never written" in errors[0][1] and "missing" in errors[1][1]
  assert errors[1][0].endswith("/c/5/0")
  loaded = reg.load_many(ids[::-1] + ids[:2])
  for (r, w), aid in zip(loaded, ids[::-1] + ids[:2]):
    k = ids.index(aid)
    want = AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0, seed=k)
    assert r.adapter_id == aid
    for t in ("q", "v"):
      np.testing.assert_array_equal(w.lora_a[t], want.lora_a[t])
      np.testing.assert_array_equal(w.lora_b[t], want.lora_b[t])
  assert reg.verify()["ok"]


def test_damaged_index_raises_and_keeps_catalog(tmp_path):
  reg, ids = _registry(tmp_path / "r", 4)
  rev, _, _ = _array(reg, ids[1])
  before = reg.catalog.counts()
  path = reg.store.shard_location(rev.array_key, _array(reg, ids[1])[1],
                                 rev.row)
  with open(path, "r+b") as f:  # Flip one byte of the shard index.
    f.seek(-10, os.SEEK_END)
    b = f.read(1)
    f.seek(-10, os.SEEK_END)
    f.write(bytes([b[0] ^ 0xFF]))
  with pytest.raises(StoreCorruptionError, match="crc32c"):
    reg.load(ids[1])
  with open(path, "r+b") as f:  # Truncate: the index no longer fits.
    f.truncate(8)
  with pytest.raises(StoreCorruptionError, match="shorter than"):
    reg.load(ids[1])
  assert reg.catalog.counts() == before


def test_zstd_arrays_keep_tensorstore_path(tmp_path):
  reg, ids = _registry(tmp_path / "z", 3, compression="zstd")
  rev, layout, arr = _array(reg, ids[2])
  assert reg.store._readers[rev.array_key] is None
  _, w = reg.load(ids[2])
  want = AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0, seed=2)
  np.testing.assert_array_equal(w.lora_b["v"], want.lora_b["v"])
  meta = arr.spec().to_json()["metadata"]
  assert direct_rows_per_shard(meta, layout) is None


def test_format_check_accepts_only_the_exact_layout():
  layout = RowLayout(("q",), {"q": (2, 8, 8)}, 2)
  meta = {
      "zarr_format": 3, "data_type": "float32", "shape": [64, layout.row_len],
      "fill_value": 0.0, "chunk_key_encoding": {"name": "default"},
      "chunk_grid": {"name": "regular", "configuration": {
          "chunk_shape": [16, layout.row_len]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [1, layout.row_len],
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
          "index_codecs": [
              {"name": "bytes", "configuration": {"endian": "little"}},
              {"name": "crc32c"}]}}]}
  assert direct_rows_per_shard(meta, layout) == 16
  for change in ({"data_type": "bfloat16"}, {"fill_value": 1.0},
                 {"shape": [64, layout.row_len + 1]},
                 {"chunk_key_encoding": {"name": "v2"}}):
    assert direct_rows_per_shard({**meta, **change}, layout) is None
  start = dict(meta, codecs=[{**meta["codecs"][0], "configuration": {
      **meta["codecs"][0]["configuration"], "index_location": "start"}}])
  assert direct_rows_per_shard(start, layout) is None


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_digests_while_reading_equal_the_one_shot_row_checksum(
    tmp_path, compression):
  # Rows (~1.1 MiB) bigger than one hash piece (256 KiB), so the direct
  # reader hashes each row in several pieces.
  big = ModelConfig("llama", vocab_size=64, hidden_size=512,
                    intermediate_size=1024, num_layers=8, num_heads=8,
                    num_kv_heads=8, head_dim=64)
  reg = Registry.open(str(tmp_path / "r"), compression=compression)
  reg.create_adapters(["a", "b"], spec=dict(targets=("q", "v"), rank=16,
                                            alpha=4.0),
                      base_fingerprint=BASE, config=big)
  reg.publish_many([(i, AdapterWeights.random(big, ("q", "v"), 16, alpha=4.0,
                                              seed=k))
                    for k, i in enumerate(["a", "b"])])
  revs = [reg.resolve(i) for i in ("a", "b", "a")]
  layout = RowLayout.from_dict(reg.adapter("a")["layout"])
  assert layout.row_bytes > 2 * (256 << 10)
  reader = reg.store._readers[revs[0].array_key]
  assert (reader is None) == (compression == "zstd")
  digests, errors = {}, {}
  rows = reg.store.read_rows_many(
      [(r.array_key, layout, r.row) for r in revs], errors, digests)
  assert not errors and sorted(digests) == [0, 1, 2]
  for i, (rev, row) in enumerate(zip(revs, rows)):
    assert digests[i] == row_xxh3_64(row) == rev.xxh3_64
