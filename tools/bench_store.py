"""Benchmark of the adapter store at scale; prints a markdown table.

Owns the store benchmark only. Two parts, each measured side by side in one
run:

1. `--num_adapters` (default 10^6) adapters of a tiny shape class (rank 1 on
   q, v of a 2-layer, 64-wide model): bulk publish rate (`publish_many`),
   `resolve` p50/p99, random `load` p50/p99 single and batched (64), the
   batched-vs-sequential speed-up, files on disk and bytes on disk vs raw.
2. `--smol_adapters` (default 1,000) SmolLM2-135M-shaped rank-8 adapters on
   all seven projections (~2.4 M params, 9.8 MB each): `load` latency vs a
   plain file read of the same shard bytes.

Every load checks the row's xxh3-64; each part also measures loads opened
with `verify_checksums=False` (the benchmark-only opt-out), interleaved
with the checked loads, so the checksum's cost is a side-by-side ratio.
Shards are write-once: the tiny part also reports what one single
`publish` (one small shard file) costs on disk.

    .venv/bin/python -m tools.bench_store                      # full run
    .venv/bin/python -m tools.bench_store --quick              # 10^4 + 50, ~20 s

Rows of local uncompressed arrays are read with `pread` straight into the
output buffer (`mintjax.store.weights.ShardFileReader`); `--zstd` arrays go
through tensorstore.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import google_crc32c
import numpy as np
from absl import app, flags

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.registry import Registry
from mintjax.store.weights import RowLayout, row_xxh3_64, rows_per_shard_for

_N = flags.DEFINE_integer("num_adapters", 1_000_000, "tiny adapters")
_SMOL = flags.DEFINE_integer("smol_adapters", 1000, "SmolLM2-shaped adapters")
_CHUNK = flags.DEFINE_integer("chunk", 8192, "rows per publish_many call")
_WORKDIR = flags.DEFINE_string("workdir", None, "where to build the stores "
                               "(default: a temporary directory)")
_KEEP = flags.DEFINE_bool("keep", False, "keep the stores afterwards")
_ZSTD = flags.DEFINE_bool("zstd", False, "zstd-compress rows")
_QUICK = flags.DEFINE_bool("quick", False, "10^4 tiny and 50 SmolLM2-shaped "
                           "adapters (fast iteration; overrides the counts)")

TINY = ModelConfig("llama", vocab_size=256, hidden_size=64,
                   intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=16)
SMOL = ModelConfig("llama", vocab_size=49152, hidden_size=576,
                   intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64)
BASE = "sha256:" + "0" * 64


def _pct(xs, q) -> float:
  return float(np.percentile(np.asarray(xs) * 1e3, q))


def _disk(path: str) -> tuple[int, int]:
  files = size = 0
  for d, _, fs in os.walk(path):
    for f in fs:
      files += 1
      size += os.stat(os.path.join(d, f)).st_blocks * 512
  return files, size


def _pool(config, targets, rank, n, seed=0) -> list[AdapterWeights]:
  return [AdapterWeights.random(config, targets, rank, alpha=float(rank),
                                seed=seed + i) for i in range(n)]


def bench_tiny(root: str, n: int, chunk: int, zstd: bool) -> list[tuple]:
  reg = Registry.open(root, compression="zstd" if zstd else None)
  targets = ("q", "v")
  spec = dict(targets=targets, rank=1, alpha=1.0)
  ids = [f"user-{i:07d}" for i in range(n)]
  t0 = time.perf_counter()
  for i in range(0, n, 100_000):
    reg.create_adapters(ids[i:i + 100_000], spec=spec, base_fingerprint=BASE,
                        config=TINY)
  t_create = time.perf_counter() - t0
  # Distinct content per row without paying for 10^6 RNG calls: a pool of
  # random adapters, each row perturbed by its index.
  pool = _pool(TINY, targets, 1, 64)
  t0 = time.perf_counter()
  for i in range(0, n, chunk):
    items = []
    for j in range(i, min(n, i + chunk)):
      w = pool[j % len(pool)]
      a = {t: w.lora_a[t] + np.float32(j * 1e-7) for t in targets}
      items.append((ids[j], AdapterWeights(a, w.lora_b, 1, 1.0),
                    {"seed": j, "steps": 1}))
    reg.publish_many(items)
  t_publish = time.perf_counter() - t0
  rng = random.Random(0)
  refs = []
  for _ in range(20_000):
    i = rng.randrange(n)
    refs.append(rng.choice([ids[i], f"{ids[i]}@1", f"{ids[i]}:latest"]))
  lat = []
  for ref in refs:
    t = time.perf_counter()
    reg.resolve(ref)
    lat.append(time.perf_counter() - t)
  unchecked = Registry.open(root, verify_checksums=False)
  single, single_raw = [], []
  for _ in range(1000):  # Checked and unchecked loads interleaved.
    for r, out in ((reg, single), (unchecked, single_raw)):
      ref = ids[rng.randrange(n)]
      t = time.perf_counter()
      r.load(ref)
      out.append(time.perf_counter() - t)
  batched, batched_raw, sequential = [], [], []
  for k in range(60):  # Interleaved so all see the same machine state.
    for r, out in ((reg, batched), (unchecked, batched_raw)):
      batch = [ids[rng.randrange(n)] for _ in range(64)]
      t = time.perf_counter()
      r.load_many(batch)
      out.append(time.perf_counter() - t)
    if k % 3 == 0:
      batch = [ids[rng.randrange(n)] for _ in range(64)]
      t = time.perf_counter()
      for ref in batch:
        reg.load(ref)
      sequential.append(time.perf_counter() - t)
  files, size = _disk(os.path.join(root, "arrays"))
  _, cat_size = _disk(root)
  # What single publishes cost: one write-once shard file each.
  singles = [f"single-{i}" for i in range(100)]
  reg.create_adapters(singles, spec=spec, base_fingerprint=BASE, config=TINY)
  t0 = time.perf_counter()
  for i, aid in enumerate(singles):
    reg.publish(aid, pool[i % len(pool)])
  t_single = (time.perf_counter() - t0) / len(singles)
  files2, size2 = _disk(os.path.join(root, "arrays"))
  row_bytes = sum(l * (a + b) for l, a, b in (
      (TINY.num_layers, *TINY.projection_shape(t)) for t in targets)) * 4
  raw = n * row_bytes
  reg.close()
  unchecked.close()
  return [
      ("tiny", "adapters", f"{n:,}", f"rank 1 q,v, L2 D64; {row_bytes} B/row,"
       f" {rows_per_shard_for(row_bytes)} rows/shard"),
      ("tiny", "bulk create (ids)", f"{n / t_create:,.0f} /s",
       f"{t_create:.1f} s"),
      ("tiny", "publish_many", f"{n / t_publish:,.0f} /s",
       f"{t_publish:.1f} s total, chunks of {chunk}"),
      ("tiny", "resolve p50 / p99", f"{_pct(lat, 50):.3f} / "
       f"{_pct(lat, 99):.3f} ms", "goal p99 <= 1 ms"),
      ("tiny", "load single p50 / p99", f"{_pct(single, 50):.3f} / "
       f"{_pct(single, 99):.3f} ms", "random adapter, xxh3-64 checked"),
      ("tiny", "load single unchecked p50", f"{_pct(single_raw, 50):.3f} ms",
       f"checksum cost {np.median(single) / np.median(single_raw):.2f}x"),
      ("tiny", "load_many(64) p50 / p99", f"{_pct(batched, 50):.3f} / "
       f"{_pct(batched, 99):.3f} ms", "one batched read, xxh3-64 checked"),
      ("tiny", "load_many(64) unchecked p50", f"{_pct(batched_raw, 50):.3f} "
       "ms", f"checksum cost "
       f"{np.median(batched) / np.median(batched_raw):.2f}x"),
      ("tiny", "64 sequential loads p50", f"{_pct(sequential, 50):.3f} ms",
       ""),
      ("tiny", "batched speed-up", f"{np.median(sequential) / np.median(batched):.1f}x",
       "goal >= 10x"),
      ("tiny", "files on disk", f"{files:,}", "goal <= 20,000 (bulk publish)"),
      ("tiny", "single publish", f"{t_single * 1e3:.1f} ms, "
       f"{(files2 - files) / len(singles):.0f} file, "
       f"{(size2 - size) / len(singles) / 1024:.0f} KiB",
       "per revision: one write-once shard (row + shard index)"),
      ("tiny", "bytes on disk / raw", f"{size / raw:.3f}",
       f"{size / 2**20:,.0f} MiB arrays vs {raw / 2**20:,.0f} MiB raw; "
       f"catalog+arrays {cat_size / 2**20:,.0f} MiB"),
  ]


def bench_smol(root: str, n: int) -> list[tuple]:
  reg = Registry.open(root)
  spec = dict(targets=ALL_TARGETS, rank=8, alpha=8.0)
  ids = [f"smol-{i:05d}" for i in range(n)]
  reg.create_adapters(ids, spec=spec, base_fingerprint=BASE, config=SMOL)
  pool = _pool(SMOL, ALL_TARGETS, 8, 4)
  t0 = time.perf_counter()
  for i in range(0, n, 16):
    reg.publish_many([(ids[j], pool[j % len(pool)], {"seed": j})
                      for j in range(i, min(n, i + 16))])
  t_publish = time.perf_counter() - t0
  rng = random.Random(1)
  unchecked = Registry.open(root, verify_checksums=False)
  layout = RowLayout.from_dict(reg.adapter(ids[0])["layout"])
  loads, loads_raw, raws = [], [], []
  nbytes = 0
  for _ in range(min(200, 4 * n)):
    # Checked load, unchecked load and a plain read, each of another random
    # row, so none is served from another's freshly touched pages.
    for r, out in ((reg, loads), (unchecked, loads_raw)):
      ref = ids[rng.randrange(n)]
      t = time.perf_counter()
      r.load(ref)
      out.append(time.perf_counter() - t)
    other = reg.resolve(ids[rng.randrange(n)])
    path = reg.store.shard_location(other.array_key, layout, other.row)
    t = time.perf_counter()
    with open(path, "rb") as f:
      data = np.frombuffer(f.read(), np.uint8)
    raws.append(time.perf_counter() - t)
    nbytes = data.size
  # The two row checksums on one in-memory SmolLM2-shaped row, interleaved:
  # xxh3-64 (what loads check) vs crc32c (what the store checked before).
  (row,) = reg.loader.read_rows([reg.resolve(ids[0])], [layout], verify=False)
  row = np.ascontiguousarray(row)
  row.flags.writeable = False  # google_crc32c takes read-only buffers.
  piece = row.view(np.uint8)[:256 << 10]  # One hash piece, cache-hot.
  speeds = {k: [] for k in ("xxh3_64", "crc32c", "xxh3_64 hot",
                            "crc32c hot")}
  for _ in range(30):
    for name, fn in (("xxh3_64", row_xxh3_64),
                     ("crc32c", google_crc32c.value)):
      for buf, key in ((row, name), (piece, name + " hot")):
        fn(buf)  # Warm: the hot figure is for a piece already in cache.
        t = time.perf_counter()
        fn(buf)
        speeds[key].append(buf.nbytes / (time.perf_counter() - t) / 1e9)
  reg.close()
  unchecked.close()
  ratio = np.median(loads) / np.median(raws)
  return [
      ("smol", "adapters", f"{n:,}", f"SmolLM2-135M shapes, rank 8, all 7 "
       f"targets, {nbytes / 2**20:.1f} MiB each"),
      ("smol", "publish_many", f"{n / t_publish:,.1f} /s", f"{t_publish:.1f} s"),
      ("smol", "load p50 / p99", f"{_pct(loads, 50):.2f} / "
       f"{_pct(loads, 99):.2f} ms", "resolve + read + xxh3-64 + unpack"),
      ("smol", "load unchecked p50 / p99", f"{_pct(loads_raw, 50):.2f} / "
       f"{_pct(loads_raw, 99):.2f} ms", "verify_checksums=False"),
      ("smol", "checksum cost", f"{np.median(loads) / np.median(loads_raw):.2f}x",
       "checked / unchecked load p50"),
      ("smol", "raw file read p50 / p99", f"{_pct(raws, 50):.2f} / "
       f"{_pct(raws, 99):.2f} ms", "open + read the shard file"),
      ("smol", "load / raw read", f"{ratio:.2f}x", "goal <= 2x (checked)"),
      ("smol", "unchecked load / raw read",
       f"{np.median(loads_raw) / np.median(raws):.2f}x", ""),
      ("smol", "row checksum xxh3-64 / crc32c",
       f"{np.median(speeds['xxh3_64']):.1f} / "
       f"{np.median(speeds['crc32c']):.1f} GB/s",
       "one row in memory, interleaved (loads check xxh3-64)"),
      ("smol", "256 KiB piece xxh3-64 / crc32c",
       f"{np.median(speeds['xxh3_64 hot']):.1f} / "
       f"{np.median(speeds['crc32c hot']):.1f} GB/s",
       "in cache: what hashing while reading pays"),
  ]


def main(argv):
  del argv
  work = _WORKDIR.value or tempfile.mkdtemp(prefix="mint_bench_")
  rows = []
  try:
    n, smol = (10_000, 50) if _QUICK.value else (_N.value, _SMOL.value)
    if n:
      rows += bench_tiny(os.path.join(work, "tiny"), n, _CHUNK.value,
                         _ZSTD.value)
    if smol:
      rows += bench_smol(os.path.join(work, "smol"), smol)
  finally:
    if not _KEEP.value:
      shutil.rmtree(work, ignore_errors=True)
  print("| part | metric | value | notes |\n|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
  app.run(main)
