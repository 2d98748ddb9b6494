"""The weights store: adapter factors as rows of write-once shard files.

Owns `RowLayout` (how one adapter's A/B factors flatten into one row and
back), `kvstore_spec` (local path, `file://`, `gs://`, `s3://` or a
tensorstore spec dict), `ShardFileReader` (reads rows of local uncompressed
arrays with `pread`, bypassing tensorstore's per-read overhead and extra
copy; everything else reads through tensorstore), `row_sha256` (the
content identity; the load checksum is `checksum.row_xxh3_64`) and
`WeightsStore` (create, write, batched read with optional per-row digests,
list and delete shards). Writes always go through tensorstore.

Layout. One zarr3 array per *shape class* (same base, targets, per-target
shapes, rank and dtype), shaped `[rows, row_len]`:

  row = concat over targets t (canonical order) of
        A[t].ravel()  (A[t]: [L, d_in, r])  then  B[t].ravel()  (B[t]: [L, r, d_out])

Other adapter families store what their family's `stored_shapes` says
(`mintjax.adapters.family`): a VeRA row (variant 'vera') holds only the
per-user scaling vectors,
  row = concat over t of lambda_d[t].ravel() ([L, r]) then lambda_b[t].ravel()
  ([L, d_out]),
since the frozen basis is regenerated from the shape class's `basis_seed`
(`mintjax.adapters.vera`); its rows are L * (r + d_out) per target. A layout
is always derived from the adapter's spec (`RowLayout.for_info`).

Each row is one inner chunk `[1, row_len]`; inner chunks are grouped into
shard files of `rows_per_shard` rows by the zarr3 `sharding_indexed` codec
(`c/<shard>/0`), so a million adapters published in bulk are hundreds of
files, not millions.

Write-once. Each shard file is written exactly once, by the one publish
that reserved it in the catalog, and never rewritten: shard numbers come
from a counter that only grows. A key written once cannot be damaged by a
later write, so the file kvstore's stale `<key>.__lock` of a killed writer
(whose trailing bytes would corrupt a *rewritten* shard) is harmless, and on
object stores (s3/gcs) an atomic PUT per shard is all the store relies on.
The array is created once with a fixed extent of `_MAX_SHARDS` shards, so
its metadata (`zarr.json`) is written once too, never resized. Reads of a
chunk that was never written raise (`fill_missing_data_reads` off), so a
missing shard never reads as zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import urllib.parse
from typing import Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
import tensorstore as ts

from mintjax.adapters.family import FamilyError, get_family
from mintjax.adapters.spec import KNOWN_TARGETS
from mintjax.store.checksum import le_bytes, row_xxh3_64
from mintjax.store.errors import (InvalidAdapterError, RegistryError,
                                  StoreCorruptionError)
from mintjax.store.shard_reader import (ShardFileReader,
                                        direct_rows_per_shard)

__all__ = ["RowLayout", "WeightsStore", "ShardFileReader",
           "direct_rows_per_shard", "kvstore_spec", "rows_per_shard_for",
           "row_xxh3_64", "row_sha256"]

DTYPES = ("float32", "bfloat16", "float16")
# Shard files aim at this many bytes: big enough that a million small
# adapters published in bulk are ~500 files, small enough that one shard is
# one quick write (and one atomic PUT on an object store).
_TARGET_SHARD_BYTES = 4 << 20
_MAX_ROWS_PER_SHARD = 4096
# Every array is created with room for this many shards and never resized:
# its zarr.json is written once. Shard numbers are never reused, so this is
# the number of publishes an array can take (2^32; rows stay < 2^44).
_MAX_SHARDS = 1 << 32
# A small cache keeps shard indexes (16 bytes per row) in memory, so reading a
# row costs one ranged read instead of two; rows themselves mostly miss it.
# Arrays of big rows (one row per shard) skip it: caching a multi-megabyte
# row costs an extra copy and is never hit by random loads.
CONTEXT_SPEC = {"cache_pool": {"total_bytes_limit": 32 << 20}}
_CACHED_ROW_BYTES = 1 << 20
# Layouts were stored before they named their family, and those (LoRA) keep
# that JSON, so their class keys (array names) never change; every other
# family's layout records its name and basis seed.
_UNNAMED_FAMILY = "lora"


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """How one adapter of a shape class maps to a flat row.

  Derived from the adapter spec (`for_info`) or read back from the catalog
  (`from_dict`); the tensors a row holds are its family's `stored_shapes`.

  Attributes:
    targets: projections in canonical order.
    shapes: target -> (L, d_in, d_out).
    rank: LoRA rank r of every row in the class.
    dtype: element dtype name.
    variant: the adapter family ('lora': A/B factors; 'vera': scaling
      vectors only).
    basis_seed: the family's basis seed (VeRA), None for LoRA.
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
    order = tuple(t for t in KNOWN_TARGETS if t in self.targets)
    if order != tuple(self.targets) or set(self.shapes) != set(self.targets):
      raise InvalidAdapterError(
          f"row layout targets {self.targets} must be in canonical order "
          f"{KNOWN_TARGETS} and match the shape keys {sorted(self.shapes)}")
    object.__setattr__(self, "shapes", {
        t: tuple(int(x) for x in self.shapes[t]) for t in self.targets})
    try:
      get_family(self.variant)
    except FamilyError as e:
      raise InvalidAdapterError(f"unknown row layout variant: {e}") from None

  @classmethod
  def for_info(cls, info, shapes: Mapping) -> "RowLayout":
    """The layout of an adapter spec (`AdapterInfo`) whose targets have
    shapes {t: (L, d_in, d_out)}: the one way a new layout is made."""
    return cls(info.targets, {t: tuple(shapes[t]) for t in info.targets},
               info.rank, info.dtype, info.variant, info.basis_seed)

  @property
  def names(self) -> tuple[str, str]:
    """Names of a row's two tensors per target (for errors)."""
    return get_family(self.variant).tensor_names

  def _shapes_of(self, t: str) -> tuple[tuple, tuple]:
    return get_family(self.variant).stored_shapes(self.rank, self.shapes[t])

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
    if self.variant != _UNNAMED_FAMILY:
      d.update(variant=self.variant, basis_seed=self.basis_seed)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "RowLayout":
    return cls(tuple(d["targets"]), {t: tuple(s) for t, s in
                                     d["shapes"].items()},
               int(d["rank"]), d["dtype"], d.get("variant", _UNNAMED_FAMILY),
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
  return "sha256:" + hashlib.sha256(le_bytes(row)).hexdigest()


def kvstore_spec(location) -> dict:
  """A tensorstore kvstore spec from a path, URL or spec dict.

  Accepts a local directory, 'file:///dir', 'gs://bucket/prefix',
  's3://bucket/prefix[?endpoint=URL&region=NAME]' (see `_s3_options`) or
  a tensorstore kvstore dict (returned as is).
  """
  if isinstance(location, Mapping):
    return dict(location)
  location = str(location)
  for scheme, driver in (("gs://", "gcs"), ("s3://", "s3")):
    if location.startswith(scheme):
      rest, _, query = location[len(scheme):].partition("?")
      bucket, _, path = rest.partition("/")
      if not bucket:
        raise RegistryError(
            f"store location {location!r} has no bucket; expected "
            f"{scheme}BUCKET/PREFIX")
      spec = {"driver": driver, "bucket": bucket,
              "path": path.rstrip("/") + "/" if path else ""}
      if driver == "s3":
        spec.update(_s3_options(location, query))
      elif query:
        raise RegistryError(
            f"store location {location!r} has options; gs:// takes none "
            "(credentials come from GOOGLE_APPLICATION_CREDENTIALS or the "
            "machine's service account)")
      return spec
  if location.startswith("file://"):
    location = location[len("file://"):]
  if "://" in location:
    raise RegistryError(
        f"unsupported store URL {location!r}; use a local path, file://, "
        "gs://, s3:// or a tensorstore kvstore spec dict")
  return {"driver": "file", "path": os.path.abspath(location) + "/"}


def _s3_options(location: str, query: str) -> dict:
  """tensorstore s3 options from an s3:// URL's query or the environment.

  'endpoint' (an S3-compatible server: MinIO, moto, Ceph...) falls back to
  $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, 'region' to $AWS_REGION /
  $AWS_DEFAULT_REGION. Credentials are tensorstore's default chain
  ($AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY, ~/.aws, instance
  metadata); they never go into a URL, which ends up in logs.
  """
  params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
  unknown = set(params) - {"endpoint", "region"}
  if unknown:
    raise RegistryError(
        f"store location {location!r} has unknown options {sorted(unknown)};"
        " s3:// takes endpoint= and region= (credentials come from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws)")
  env = os.environ
  endpoint = params.get("endpoint") or env.get(
      "AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
  region = params.get("region") or env.get("AWS_REGION") or env.get(
      "AWS_DEFAULT_REGION")
  out = {}
  if endpoint:
    if not endpoint.startswith(("http://", "https://")):
      raise RegistryError(
          f"s3 endpoint {endpoint!r} must start with http:// or https://")
    out["endpoint"] = endpoint
  if region:
    out["aws_region"] = region
  return out


def rows_per_shard_for(row_bytes: int) -> int:
  """Rows grouped per shard file: a power of two near the target shard size."""
  n = max(1, _TARGET_SHARD_BYTES // max(1, row_bytes))
  return min(_MAX_ROWS_PER_SHARD, 1 << (n.bit_length() - 1))


class WeightsStore:
  """Write-once sharded zarr3 arrays under one kvstore root, one per shape
  class (see the module docstring)."""

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
    self._local = self.root.get("driver") == "file"
    self._direct = self._local and sys.byteorder == "little"
    self._context = ts.Context(CONTEXT_SPEC)
    self._big_context = ts.Context()

  def _kvstore(self, key: str) -> dict:
    kv = dict(self.root)
    kv["path"] = kv.get("path", "") + f"arrays/{key}/"
    return kv

  def _dir(self, key: str) -> str:
    """Local directory of an array (file kvstore only)."""
    return self._kvstore(key)["path"].rstrip("/")

  def _spec(self, key: str, layout: RowLayout) -> dict:
    rows_per_shard = rows_per_shard_for(layout.row_bytes)
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if self.compression == "zstd":
      inner.append({"name": "zstd", "configuration": {"level": 3}})
    return {
        "driver": "zarr3",
        "kvstore": self._kvstore(key),
        "fill_missing_data_reads": False,
        "metadata": {
            "shape": [_MAX_SHARDS * rows_per_shard, layout.row_len],
            "data_type": layout.dtype,
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

  def _context_for(self, layout: RowLayout) -> ts.Context:
    return (self._context if layout.row_bytes < _CACHED_ROW_BYTES else
            self._big_context)

  def prepare_array(self, key: str, layout: RowLayout) -> None:
    """Creates the array if it does not exist yet.

    Must run while no other process can create it: the registry calls it
    inside the catalog's write transaction that reserves shards. A creator
    killed mid-write leaves `zarr.json.__lock` without `zarr.json`; it is
    removed first, because tensorstore would otherwise keep its stale
    trailing bytes in the new `zarr.json`.
    """
    if key in self._arrays:
      return
    try:
      self.open_array(key, layout)
      return
    except ValueError as e:
      if "NOT_FOUND" not in str(e):
        raise
    if self._local:
      stale = os.path.join(self._dir(key), "zarr.json.__lock")
      if os.path.exists(stale):
        os.remove(stale)
    arr = ts.open(self._spec(key, layout), create=True,
                  context=self._context_for(layout)).result()
    self._register(key, layout, arr)

  def open_array(self, key: str, layout: RowLayout) -> ts.TensorStore:
    """The array of a shape class (created by `prepare_array`)."""
    arr = self._arrays.get(key)
    if arr is not None:
      return arr
    try:
      arr = ts.open({"driver": "zarr3", "kvstore": self._kvstore(key),
                     "fill_missing_data_reads": False}, open=True,
                    context=self._context_for(layout)).result()
    except ValueError as e:
      if "NOT_FOUND" in str(e):
        raise  # No array yet (prepare_array creates it) or it was deleted.
      raise StoreCorruptionError(
          f"array metadata {self._kvstore(key)['path']}zarr.json is "
          f"unreadable ({str(e).splitlines()[0][:200]}); restore the store "
          "from a backup") from None
    self._register(key, layout, arr)
    return arr

  def _register(self, key: str, layout: RowLayout, arr) -> None:
    if arr.shape[1] != layout.row_len:
      raise RegistryError(
          f"stored array {key} has rows of {arr.shape[1]} elements, the "
          f"catalog expects {layout.row_len}; the store and catalog disagree")
    self._arrays[key] = arr
    self._readers[key] = self._reader(key, layout)

  def _reader(self, key: str, layout: RowLayout) -> ShardFileReader | None:
    if not self._direct:
      return None
    directory = self._dir(key)
    try:
      with open(os.path.join(directory, "zarr.json")) as f:
        metadata = json.load(f)
    except (OSError, ValueError):
      return None
    rps = direct_rows_per_shard(metadata, layout)
    return None if rps is None else ShardFileReader(directory, rps, layout)

  def shard_location(self, key: str, layout: RowLayout, row: int) -> str:
    """The shard file holding row `row` of an array (for messages)."""
    shard = row // rows_per_shard_for(layout.row_bytes)
    kv = self._kvstore(key)
    where = (f"{kv['driver']}://{kv.get('bucket', '')}/" if not self._local
             else "")
    return f"{where}{kv['path']}c/{shard}/0"

  def write_rows(self, key: str, layout: RowLayout, first_row: int,
                 data: np.ndarray) -> None:
    """Writes data ([n, row_len]) to rows [first_row, first_row + n).

    The rows must lie in shards reserved by this caller and never written
    before: each shard file is then written once, whole.
    """
    if len(data) == 0:
      return
    arr = self.open_array(key, layout)
    data = np.ascontiguousarray(data, layout.np_dtype)
    try:
      arr[first_row:first_row + len(data)].write(data).result()
    except ValueError as e:  # Disk full, permissions, a vanished mount...
      raise RegistryError(
          f"writing rows to {self._kvstore(key)['path']} failed: "
          f"{str(e).splitlines()[0][:300]}; nothing was published") from None

  def read_rows_many(self, requests: Sequence[tuple[str, RowLayout, int]],
                     errors: dict | None = None, digests: dict | None = None
                     ) -> list[np.ndarray | None]:
    """Reads many rows (possibly of different arrays), all issued at once.

    Args:
      requests: (array key, layout, row) per row wanted.
      errors: filled with {request index: (file, problem)} for rows that
        are missing or unreadable (their output is None).
      digests: if given, filled with {request index: `row_xxh3_64` of the
        row read}; direct reads hash each row as it lands (one pass over
        memory), tensorstore reads after the fact.

    Returns:
      One [row_len] array per request, in order (None where unreadable).
    """
    errors = {} if errors is None else errors
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
      try:
        arr = self.open_array(key, layout)
      except ValueError as e:
        for i in idx:
          errors[i] = (self._kvstore(key)["path"], f"array unreadable: {e}")
        continue
      reader = self._readers.get(key)
      if reader is not None:
        direct.append((idx, inverse, reader, uniq))
      elif len(uniq) == 1:
        issued.append((idx, inverse, key, arr, uniq,
                       arr[int(uniq[0]):int(uniq[0]) + 1].read()))
      else:
        issued.append((idx, inverse, key, arr, uniq,
                       arr.oindex[uniq].read()))
    out: list = [None] * len(requests)
    # Direct reads run while tensorstore's reads are in flight.
    for idx, inverse, reader, uniq in direct:
      bad: dict = {}
      sums = None if digests is None else {}
      block = reader.read(uniq, bad, sums)
      for i, j in zip(idx, inverse):
        if j in bad:
          errors[i] = bad[j]
        else:
          out[i] = block[j]
          if sums is not None:
            digests[i] = sums[j]
    for idx, inverse, key, arr, uniq, fut in issued:
      try:
        block, bad = fut.result(), {}
      except ValueError:  # A chunk is missing or damaged: find which.
        block, bad = self._read_each(arr, uniq, self._kvstore(key)["path"])
      for i, j in zip(idx, inverse):
        if j in bad:
          errors[i] = bad[j]
        else:
          out[i] = block[j]
    if digests is not None:
      for i, row in enumerate(out):
        if row is not None and i not in digests:
          digests[i] = row_xxh3_64(row)
    return out

  @staticmethod
  def _read_each(arr, rows: np.ndarray, path: str
                 ) -> tuple[np.ndarray, dict]:
    """Row-by-row tensorstore reads, recording each row's failure."""
    block = np.zeros((len(rows), arr.shape[1]), arr.dtype.numpy_dtype)
    bad = {}
    for j, r in enumerate(rows.tolist()):
      try:
        block[j] = arr[r].read().result()
      except ValueError as e:
        bad[j] = (path, str(e).splitlines()[0][:300])
    return block, bad

  def delete_shards(self, key: str, shards: Sequence[int]) -> int:
    """Deletes shard files (and a killed writer's lock files); returns how
    many files were removed. Only for shards no revision references."""
    removed = 0
    if self._local:
      for s in shards:
        d = os.path.join(self._dir(key), "c", str(int(s)))
        if os.path.isdir(d):
          removed += len(os.listdir(d))
          shutil.rmtree(d, ignore_errors=True)
      return removed
    kv = ts.KvStore.open(self._kvstore(key), context=self._context).result()
    for s in shards:
      name = f"c/{int(s)}/0"
      if kv.read(name).result().state == "value":
        kv.write(name, None).result()
        removed += 1
    return removed

  def shard_files(self, key: str) -> set[int]:
    """Shards of an array with any file on disk (data or a lock file)."""
    if self._local:
      d = os.path.join(self._dir(key), "c")
      try:
        names = os.listdir(d)
      except FileNotFoundError:
        return set()
      return {int(n) for n in names if n.isascii() and n.isdigit()}
    kv = ts.KvStore.open(self._kvstore(key), context=self._context).result()
    out = set()
    for k in kv.list().result():
      parts = k.decode().split("/")
      if len(parts) == 3 and parts[0] == "c" and parts[1].isdigit():
        out.add(int(parts[1]))
    return out
