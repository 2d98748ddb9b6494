"""The weights store: adapter factors as rows of sharded tensorstore arrays.

Owns `RowLayout` (how one adapter's A/B factors flatten into one row and
back), `kvstore_spec` (local path, `file://`, `gs://`, `s3://` or a
tensorstore spec dict), `ShardFileReader` (reads rows of local uncompressed
arrays with `pread`, bypassing tensorstore's per-read overhead and extra
copy; everything else reads through tensorstore) and `WeightsStore` (open,
grow, write, batched read). Writes always go through tensorstore.

Layout. One zarr3 array per *shape class* (same base, targets, per-target
shapes, rank and dtype), shaped `[rows, row_len]`:

  row = concat over targets t (canonical order) of
        A[t].ravel()  (A[t]: [L, d_in, r])  then  B[t].ravel()  (B[t]: [L, r, d_out])

A VeRA row (variant 'vera') holds only the per-user scaling vectors,
  row = concat over t of lambda_d[t].ravel() ([L, r]) then lambda_b[t].ravel()
  ([L, d_out]),
since the frozen basis is regenerated from the shape class's `basis_seed`
(`mintjax.adapters.vera`); its rows are L * (r + d_out) per target.

Each row is one inner chunk `[1, row_len]`; inner chunks are grouped into
shard files of `rows_per_shard` rows by the zarr3 `sharding_indexed` codec,
so a million adapters are thousands of files, not millions. A missing chunk
reads as zeros, which is why a row is only trusted once the catalog
references it with a matching sha256 (see `mintjax.store.registry`).

Growing is `resize(expand_only=True)`; the registry calls it while it holds
the catalog's write lock, so concurrent publishers never race on metadata.
Shard files are rewritten whole by tensorstore (write to a temporary file,
then atomic rename), so a crash mid-write leaves the previous shard contents,
and with them every committed row, intact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from typing import Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
import tensorstore as ts

from mintjax.adapters.spec import ALL_TARGETS
from mintjax.store.errors import (InvalidAdapterError, RegistryError,
                                  StoreCorruptionError)

try:  # The direct shard reader checks index checksums with it.
  import google_crc32c
except ImportError:  # Without it every read goes through tensorstore.
  google_crc32c = None

DTYPES = ("float32", "bfloat16", "float16")
# Shard files aim at this many bytes: big enough that a million small
# adapters are ~1,000 files, small enough that rewriting one shard on a
# single publish stays a few milliseconds.
_TARGET_SHARD_BYTES = 4 << 20
_MAX_ROWS_PER_SHARD = 4096
# A small cache keeps shard indexes (16 bytes per row) in memory, so reading a
# row costs one ranged read instead of two; rows themselves mostly miss it.
# Arrays of big rows (one row per shard) skip it: caching a multi-megabyte
# row costs an extra copy and is never hit by random loads.
CONTEXT_SPEC = {"cache_pool": {"total_bytes_limit": 32 << 20}}
_CACHED_ROW_BYTES = 1 << 20
# zarr3 sharding marks an inner chunk that was never written with this
# (offset, nbytes) pair; it reads as the fill value (zeros).
_MISSING = 2**64 - 1
_FADVISE = hasattr(os, "posix_fadvise")


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """How one adapter of a shape class maps to a flat row.

  Attributes:
    targets: projections in canonical order.
    shapes: target -> (L, d_in, d_out).
    rank: LoRA rank r of every row in the class.
    dtype: element dtype name.
    variant: 'lora' (A/B factors) or 'vera' (scaling vectors only).
    basis_seed: the VeRA basis seed (None for LoRA).
  """

  targets: tuple[str, ...]
  shapes: Mapping[str, tuple[int, int, int]]
  rank: int
  dtype: str = "float32"
  variant: str = "lora"
  basis_seed: int | None = None

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise InvalidAdapterError(
          f"unsupported adapter dtype {self.dtype!r}; expected one of {DTYPES}")
    order = tuple(t for t in ALL_TARGETS if t in self.targets)
    if order != tuple(self.targets) or set(self.shapes) != set(self.targets):
      raise InvalidAdapterError(
          f"row layout targets {self.targets} must be in canonical order "
          f"{ALL_TARGETS} and match the shape keys {sorted(self.shapes)}")
    object.__setattr__(self, "shapes", {
        t: tuple(int(x) for x in self.shapes[t]) for t in self.targets})
    if self.variant not in ("lora", "vera"):
      raise InvalidAdapterError(f"unknown row layout variant {self.variant!r}")

  @classmethod
  def for_info(cls, info, shapes: Mapping) -> "RowLayout":
    """The layout of an adapter's `AdapterInfo` with {t: (L, d_in, d_out)}."""
    return cls(info.targets, {t: tuple(shapes[t]) for t in info.targets},
               info.rank, info.dtype, info.variant, info.basis_seed)

  @property
  def names(self) -> tuple[str, str]:
    """Names of a row's two tensors per target (for errors)."""
    return (("lambda_d", "lambda_b") if self.variant == "vera" else
            ("lora_a", "lora_b"))

  def _shapes_of(self, t: str) -> tuple[tuple, tuple]:
    l, d_in, d_out = self.shapes[t]
    if self.variant == "vera":
      return (l, self.rank), (l, d_out)
    return (l, d_in, self.rank), (l, self.rank, d_out)

  @property
  def np_dtype(self) -> np.dtype:
    return np.dtype(self.dtype)

  @property
  def row_len(self) -> int:
    return sum(math.prod(a) + math.prod(b)
               for a, b in (self._shapes_of(t) for t in self.targets))

  @property
  def row_bytes(self) -> int:
    return self.row_len * self.np_dtype.itemsize

  def to_dict(self) -> dict:
    d = dict(targets=list(self.targets),
             shapes={t: list(s) for t, s in self.shapes.items()},
             rank=self.rank, dtype=self.dtype)
    if self.variant != "lora":  # LoRA layouts (and class keys) unchanged.
      d.update(variant=self.variant, basis_seed=self.basis_seed)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "RowLayout":
    return cls(tuple(d["targets"]), {t: tuple(s) for t, s in
                                     d["shapes"].items()},
               int(d["rank"]), d["dtype"], d.get("variant", "lora"),
               d.get("basis_seed"))

  def class_key(self, base_fingerprint: str) -> str:
    """Name of the array family: a hash of base + layout (path-safe)."""
    blob = json.dumps([base_fingerprint, self.to_dict()], sort_keys=True)
    return "c" + hashlib.sha256(blob.encode()).hexdigest()[:20]

  def pack(self, lora_a: Mapping[str, np.ndarray],
           lora_b: Mapping[str, np.ndarray]) -> np.ndarray:
    """Flattens A/B factors (VeRA: lambda_d/lambda_b) into one [row_len] row.

    Raises:
      InvalidAdapterError: a target missing or extra, a shape not matching the
        layout, or a NaN/Inf value.
    """
    if set(lora_a) != set(self.targets) or set(lora_b) != set(self.targets):
      raise InvalidAdapterError(
          f"adapter has targets lora_a={sorted(lora_a)} lora_b="
          f"{sorted(lora_b)}; this adapter's spec expects exactly "
          f"{list(self.targets)}")
    parts = []
    for t in self.targets:
      for name, arr, want in zip(self.names, (lora_a[t], lora_b[t]),
                                 self._shapes_of(t)):
        arr = np.asarray(arr)
        if tuple(arr.shape) != want:
          raise InvalidAdapterError(
              f"{name}[{t!r}] has shape {tuple(arr.shape)}, expected {want} "
              f"(layers, in, rank) / (layers, rank, out) as recorded for this "
              f"adapter; publish weights of the adapter's own shape and rank")
        if arr.dtype.kind not in "fV" and arr.dtype != self.np_dtype:
          raise InvalidAdapterError(
              f"{name}[{t!r}] has dtype {arr.dtype}, expected a float dtype "
              f"({self.dtype})")
        if not np.all(np.isfinite(arr.astype(np.float32))):
          raise InvalidAdapterError(
              f"{name}[{t!r}] contains NaN or Inf values; refusing to store "
              "it (fix the training run or publish an earlier checkpoint)")
        parts.append(arr.astype(self.np_dtype).ravel())
    return np.concatenate(parts)

  @functools.cached_property
  def _segments(self) -> tuple:
    """(target, is_b, start, stop, shape) of every factor in a row."""
    segs, pos = [], 0
    for t in self.targets:
      for is_b, shape in zip((False, True), self._shapes_of(t)):
        n = math.prod(shape)
        segs.append((t, is_b, pos, pos + n, shape))
        pos += n
    return tuple(segs)

  def unpack(self, row: np.ndarray) -> tuple[dict, dict]:
    """Inverse of `pack` (views of `row`): ({t: [L, d_in, r]}, {t: [L, r,
    d_out]}); VeRA: ({t: [L, r]}, {t: [L, d_out]})."""
    a, b = {}, {}
    for t, is_b, start, stop, shape in self._segments:
      (b if is_b else a)[t] = row[start:stop].reshape(shape)
    return a, b


def row_sha256(row: np.ndarray) -> str:
  """sha256 of a row's little-endian bytes, as 'sha256:<hex>'."""
  row = np.ascontiguousarray(row)
  if row.dtype.byteorder == ">":
    row = row.byteswap().view(row.dtype.newbyteorder("<"))
  return "sha256:" + hashlib.sha256(row.tobytes()).hexdigest()


def kvstore_spec(location) -> dict:
  """A tensorstore kvstore spec from a path, URL or spec dict.

  Accepts a local directory, 'file:///dir', 'gs://bucket/prefix',
  's3://bucket/prefix' or a tensorstore kvstore dict (returned as is).
  """
  if isinstance(location, Mapping):
    return dict(location)
  location = str(location)
  for scheme, driver in (("gs://", "gcs"), ("s3://", "s3")):
    if location.startswith(scheme):
      bucket, _, path = location[len(scheme):].partition("/")
      if not bucket:
        raise RegistryError(
            f"store location {location!r} has no bucket; expected "
            f"{scheme}BUCKET/PREFIX")
      return {"driver": driver, "bucket": bucket,
              "path": path.rstrip("/") + "/" if path else ""}
  if location.startswith("file://"):
    location = location[len("file://"):]
  if "://" in location:
    raise RegistryError(
        f"unsupported store URL {location!r}; use a local path, file://, "
        "gs://, s3:// or a tensorstore kvstore spec dict")
  return {"driver": "file", "path": os.path.abspath(location) + "/"}


def rows_per_shard_for(row_bytes: int) -> int:
  """Rows grouped per shard file: a power of two near the target shard size."""
  n = max(1, _TARGET_SHARD_BYTES // max(1, row_bytes))
  return min(_MAX_ROWS_PER_SHARD, 1 << (n.bit_length() - 1))


def direct_rows_per_shard(metadata: Mapping, layout: RowLayout) -> int | None:
  """Rows per shard if `ShardFileReader` can read this array, else None.

  Only the exact format `WeightsStore` creates without compression
  qualifies: little-endian rows of the layout's dtype, one row per inner
  chunk, index of little-endian (offset, nbytes) pairs plus crc32c at the
  end of each shard, default '/'-separated chunk keys. Anything else (zstd,
  arrays written by other tools) keeps the tensorstore read path.
  """
  little = {"name": "bytes", "configuration": {"endian": "little"}}
  try:
    grid = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    (codec,) = metadata["codecs"]
    conf = codec["configuration"]
    key_enc = metadata.get("chunk_key_encoding", {"name": "default"})
    ok = (metadata.get("zarr_format") == 3 and
          metadata["data_type"] == layout.dtype and
          list(metadata["shape"][1:]) == [layout.row_len] and
          len(grid) == 2 and grid[1] == layout.row_len and
          codec["name"] == "sharding_indexed" and
          conf["chunk_shape"] == [1, layout.row_len] and
          conf["codecs"] == [little] and
          conf["index_codecs"] == [little, {"name": "crc32c"}] and
          conf.get("index_location", "end") == "end" and
          key_enc.get("name") == "default" and
          key_enc.get("configuration", {}).get("separator", "/") == "/" and
          metadata.get("fill_value") in (0, 0.0))
  except (KeyError, TypeError, ValueError):
    return None
  return int(grid[0]) if ok else None


class ShardFileReader:
  """Reads rows of uncompressed local shard files with `pread`.

  Why not tensorstore: for a local file it costs ~200 us fixed per read and
  copies every row twice (into its chunk buffer, then into the output
  array). A shard file is the inner chunks followed by an index of
  `rows_per_shard` (offset, nbytes) uint64 pairs and the index's crc32c, so
  one `pread` of the index and one `preadv` per row straight into the output
  buffer read exactly the row's bytes, once.

  Consistency: each shard is opened once and its index and rows are read
  through that one descriptor. Tensorstore replaces shard files by rename,
  so the descriptor always sees one complete version of the shard, never a
  mix. The index is re-read (and its crc32c checked) on every call rather
  than cached, so a shard rewritten by another process is never read through
  a stale index.
  """

  def __init__(self, directory: str, rows_per_shard: int, layout: RowLayout):
    self.directory = directory
    self.rows_per_shard = rows_per_shard
    self.row_len = layout.row_len
    self.row_bytes = layout.row_bytes
    self.dtype = layout.np_dtype
    self._index_bytes = 16 * rows_per_shard + 4

  def _corrupt(self, path: str, what: str) -> StoreCorruptionError:
    return StoreCorruptionError(
        f"shard file {path} is damaged: {what}; run `python -m tools.mint "
        "verify` and restore the store from a backup (the catalog still "
        "records every row's sha256)")

  def _index(self, fd: int, path: str) -> tuple[np.ndarray, int]:
    """The shard's [rows_per_shard, 2] (offset, nbytes) index, data size."""
    size = os.fstat(fd).st_size
    n = self._index_bytes
    if size < n:
      raise self._corrupt(path, f"{size} bytes, shorter than its {n}-byte "
                          "index")
    raw = os.pread(fd, n, size - n)
    if len(raw) != n:
      raise self._corrupt(path, "the index could not be read whole")
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
      raise self._corrupt(path, "its index fails its crc32c checksum")
    return (np.frombuffer(raw, "<u8", 2 * self.rows_per_shard).reshape(
        self.rows_per_shard, 2), size - n)

  def read(self, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted, unique int64) as one [len(rows), row_len] block."""
    out = np.empty((len(rows), self.row_len), self.dtype)
    rps = self.rows_per_shard
    shards = rows // rps
    # Start of each run of rows sharing a shard (rows are sorted).
    starts = np.flatnonzero(np.diff(shards, prepend=-1)).tolist()
    starts.append(len(rows))
    row_list = rows.tolist()
    plan, fds = [], []  # plan: (output row, fd, offset); fds to close.
    try:
      for k in range(len(starts) - 1):
        lo, hi = starts[k], starts[k + 1]
        shard = row_list[lo] // rps
        path = f"{self.directory}/c/{shard}/0"
        try:
          fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # A shard never written reads as zeros.
          out[lo:hi] = 0
          continue
        fds.append(fd)
        index, data_end = self._index(fd, path)
        for j in range(lo, hi):
          offset, nbytes = index[row_list[j] - shard * rps].tolist()
          if offset == _MISSING and nbytes == _MISSING:
            out[j] = 0
            continue
          if nbytes != self.row_bytes or offset + nbytes > data_end:
            raise self._corrupt(
                path, f"row {row_list[j]} is recorded as {nbytes} bytes at "
                f"offset {offset}, expected {self.row_bytes} bytes inside "
                f"the first {data_end}")
          plan.append((j, fd, offset, path))
      if len(plan) > 1 and _FADVISE:
        # Rows not in the page cache: let the kernel fetch them all at once
        # (the disk serves them in parallel) before the reads below wait on
        # each in turn.
        for _, fd, offset, _ in plan:
          os.posix_fadvise(fd, offset, self.row_bytes,
                           os.POSIX_FADV_WILLNEED)
      for j, fd, offset, path in plan:
        buf = memoryview(out[j]).cast("B")
        done = 0
        while done < self.row_bytes:  # preadv may return fewer bytes.
          got = os.preadv(fd, [buf[done:]], offset + done)
          if got <= 0:
            raise self._corrupt(path, f"row {row_list[j]} is truncated")
          done += got
    finally:
      for fd in fds:
        os.close(fd)
    return out


class WeightsStore:
  """Sharded zarr3 arrays under one kvstore root, one per shape class."""

  def __init__(self, root, compression: str | None = None):
    """Args:
      root: kvstore location (see `kvstore_spec`).
      compression: None or 'zstd' for newly created arrays.
    """
    if compression not in (None, "zstd"):
      raise RegistryError(
          f"unsupported compression {compression!r}; use None or 'zstd'")
    self.root = kvstore_spec(root)
    self.compression = compression
    self._arrays: dict[str, ts.TensorStore] = {}
    # Per array: a ShardFileReader when its rows can be read with pread
    # (local, uncompressed), else None (tensorstore reads).
    self._readers: dict[str, ShardFileReader | None] = {}
    self._direct = (self.root.get("driver") == "file" and
                    google_crc32c is not None and sys.byteorder == "little")
    self._context = ts.Context(CONTEXT_SPEC)
    self._big_context = ts.Context()

  def _kvstore(self, key: str) -> dict:
    kv = dict(self.root)
    kv["path"] = kv.get("path", "") + f"arrays/{key}/"
    return kv

  def _spec(self, key: str, layout: RowLayout, capacity: int) -> dict:
    rows_per_shard = rows_per_shard_for(layout.row_bytes)
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if self.compression == "zstd":
      inner.append({"name": "zstd", "configuration": {"level": 3}})
    dtype = layout.dtype
    return {
        "driver": "zarr3",
        "kvstore": self._kvstore(key),
        "metadata": {
            "shape": [capacity, layout.row_len],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [rows_per_shard, layout.row_len]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, layout.row_len],
                "codecs": inner,
                "index_codecs": [
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "crc32c"}],
                "index_location": "end"}}],
            "fill_value": 0,
        },
    }

  def open_array(self, key: str, layout: RowLayout, create: bool = False,
                 min_rows: int = 0) -> ts.TensorStore:
    """The array of a shape class, reopened if it must see >= `min_rows`."""
    arr = self._arrays.get(key)
    if arr is not None and arr.shape[0] >= min_rows:
      return arr
    context = (self._context if layout.row_bytes < _CACHED_ROW_BYTES else
               self._big_context)
    try:
      # Open whatever exists without asserting a shape: other processes may
      # have grown the array since it was created.
      arr = ts.open({"driver": "zarr3", "kvstore": self._kvstore(key)},
                    open=True, context=context).result()
    except ValueError as e:
      if not create or "NOT_FOUND" not in str(e):
        raise
      # Only reached under the catalog's write lock (ensure_capacity), so no
      # other process creates the same array concurrently.
      cap = max(min_rows, rows_per_shard_for(layout.row_bytes))
      arr = ts.open(self._spec(key, layout, cap), open=True, create=True,
                    context=context).result()
    if arr.shape[1] != layout.row_len:
      raise RegistryError(
          f"stored array {key} has rows of {arr.shape[1]} elements, the "
          f"catalog expects {layout.row_len}; the store and catalog disagree")
    self._arrays[key] = arr
    if key not in self._readers:
      self._readers[key] = self._reader(key, layout)
    return arr

  def _reader(self, key: str, layout: RowLayout) -> ShardFileReader | None:
    if not self._direct:
      return None
    directory = self._kvstore(key)["path"].rstrip("/")
    try:
      with open(os.path.join(directory, "zarr.json")) as f:
        metadata = json.load(f)
    except (OSError, ValueError):
      return None
    rps = direct_rows_per_shard(metadata, layout)
    return None if rps is None else ShardFileReader(directory, rps, layout)

  def ensure_capacity(self, key: str, layout: RowLayout, rows: int) -> None:
    """Grows the array so rows [0, rows) exist (call under the write lock)."""
    arr = self.open_array(key, layout, create=True)
    if arr.shape[0] >= rows:
      return
    arr = self.open_array(key, layout)  # Another process may have grown it.
    self._arrays[key] = arr
    if arr.shape[0] >= rows:
      return
    step = rows_per_shard_for(layout.row_bytes)
    # Grow geometrically in whole shards, so resizes (metadata rewrites) are
    # rare even when publishing one adapter at a time.
    new_cap = max(rows, 2 * arr.shape[0])
    new_cap = -(-new_cap // step) * step
    self._arrays[key] = arr.resize(
        exclusive_max=[new_cap, layout.row_len], expand_only=True).result()

  def write_rows(self, key: str, layout: RowLayout, rows: Sequence[int],
                 data: np.ndarray) -> None:
    """Writes data[i] ([n, row_len]) to rows[i], issued as one batch."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
      return
    arr = self.open_array(key, layout, min_rows=int(rows.max()) + 1)
    data = np.ascontiguousarray(data, layout.np_dtype)
    if np.all(np.diff(rows) == 1):
      arr[int(rows[0]):int(rows[-1]) + 1].write(data).result()
    else:
      arr.oindex[rows].write(data).result()

  def read_rows_many(self, requests: Sequence[tuple[str, RowLayout, int]]
                     ) -> list[np.ndarray]:
    """Reads many rows (possibly of different arrays), all issued at once.

    Args:
      requests: (array key, layout, row) per row wanted.

    Returns:
      One [row_len] array per request, in order.
    """
    by_key: dict[str, tuple] = {}
    for i, (key, layout, row) in enumerate(requests):
      group = by_key.get(key)
      if group is None:
        group = by_key[key] = (layout, [], [])
      group[1].append(i)
      group[2].append(row)
    direct, issued = [], []
    for key, (layout, idx, rows) in by_key.items():
      rows = np.asarray(rows, np.int64)
      if len(rows) == 1:  # np.unique costs more than a small row read.
        uniq, inverse = rows, [0]
      else:
        uniq, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.tolist()
      arr = self.open_array(key, layout, min_rows=int(uniq[-1]) + 1)
      reader = self._readers.get(key)
      if reader is not None:
        direct.append((idx, inverse, reader, uniq))
      elif len(uniq) == 1:
        issued.append((idx, inverse, arr[int(uniq[0]):int(uniq[0]) + 1].read()))
      else:
        issued.append((idx, inverse, arr.oindex[uniq].read()))
    # Direct reads run while tensorstore's reads are in flight.
    blocks = [(idx, inverse, reader.read(uniq))
              for idx, inverse, reader, uniq in direct]
    blocks += [(idx, inverse, fut.result()) for idx, inverse, fut in issued]
    out: list[np.ndarray] = [None] * len(requests)  # type: ignore
    for idx, inverse, block in blocks:
      for i, j in zip(idx, inverse):
        out[i] = block[j]
    return out

  def read_row(self, key: str, layout: RowLayout, row: int) -> np.ndarray:
    return self.read_rows_many([(key, layout, row)])[0]
