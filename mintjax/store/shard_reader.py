"""Direct reads of local, uncompressed shard files with `pread`.

Owns `ShardFileReader` and `direct_rows_per_shard` (which arrays it may
read). Used by `mintjax.store.weights.WeightsStore`; everything it cannot
read (zstd, remote kvstores, other formats) goes through tensorstore.

Why not tensorstore: for a local file it costs ~200 us fixed per read and
copies every row twice (into its chunk buffer, then into the output array).
A shard file is the inner chunks followed by an index of `rows_per_shard`
(offset, nbytes) uint64 pairs and the index's crc32c, so one `pread` of the
index and one `preadv` per row straight into the output buffer read exactly
the row's bytes, once.

A missing shard file, a damaged index, a row the index marks as never
written, or a truncated row is reported per row (`errors`), never read as
zeros: the caller names the adapter revision it belongs to.
"""

from __future__ import annotations

import os
from typing import Mapping

import google_crc32c
import numpy as np

from mintjax.store.checksum import RowHasher

# zarr3 sharding marks an inner chunk that was never written with this
# (offset, nbytes) pair.
_MISSING = 2**64 - 1
_FADVISE = hasattr(os, "posix_fadvise")
# With digests asked for, a row is read in pieces of this size and each
# piece hashed at once, while it is still in the CPU cache: the check then
# costs no second pass over memory (measured on a 9.3 MiB row: read + hash
# after 1.7-1.9 ms, hashed per 256 KiB piece 1.5-1.65 ms, read alone
# 1.35 ms; 1 MiB pieces spill the cache on this machine).
_HASH_PIECE = 256 << 10


def direct_rows_per_shard(metadata: Mapping, layout) -> int | None:
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


class _BadShard(Exception):
  """A whole shard file is unreadable (missing, short, damaged index)."""


class ShardFileReader:
  """Reads rows of uncompressed local shard files with `pread`.

  Consistency: shard files are written once and never rewritten (see
  `mintjax.store.weights`), and each shard is opened once per call with its
  index and rows read through that one descriptor. The index's crc32c is
  checked on every call.
  """

  def __init__(self, directory: str, rows_per_shard: int, layout):
    self.directory = directory
    self.rows_per_shard = rows_per_shard
    self.row_len = layout.row_len
    self.row_bytes = layout.row_bytes
    self.dtype = layout.np_dtype
    self._index_bytes = 16 * rows_per_shard + 4

  def shard_path(self, shard: int) -> str:
    return f"{self.directory}/c/{shard}/0"

  def _index(self, fd: int) -> tuple[np.ndarray, int]:
    """The shard's [rows_per_shard, 2] (offset, nbytes) index, data size."""
    size = os.fstat(fd).st_size
    n = self._index_bytes
    if size < n:
      raise _BadShard(f"{size} bytes, shorter than its {n}-byte index")
    raw = os.pread(fd, n, size - n)
    if len(raw) != n:
      raise _BadShard("the index could not be read whole")
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
      raise _BadShard("its index fails its crc32c checksum")
    return (np.frombuffer(raw, "<u8", 2 * self.rows_per_shard).reshape(
        self.rows_per_shard, 2), size - n)

  def read(self, rows: np.ndarray, errors: dict | None = None,
           digests: dict | None = None) -> np.ndarray:
    """Rows `rows` (sorted, unique int64) as one [len(rows), row_len] block.

    Args:
      rows: global row numbers (shard = row // rows_per_shard).
      errors: filled with {position in rows: (shard file, problem)} for
        rows that cannot be read; their output rows are undefined.
      digests: if given, filled with {position in rows: xxh3-64 of the row
        (`checksum.row_xxh3_64`)} for every row read, hashed piece by piece
        as it is read.
    """
    out = np.empty((len(rows), self.row_len), self.dtype)
    errors = {} if errors is None else errors
    rps = self.rows_per_shard
    shards = rows // rps
    # Start of each run of rows sharing a shard (rows are sorted).
    starts = np.flatnonzero(np.diff(shards, prepend=-1)).tolist()
    starts.append(len(rows))
    row_list = rows.tolist()
    plan, fds = [], []  # plan: (output row, fd, offset, path); fds to close.
    try:
      for k in range(len(starts) - 1):
        lo, hi = starts[k], starts[k + 1]
        shard = row_list[lo] // rps
        path = self.shard_path(shard)
        try:
          fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
          for j in range(lo, hi):
            errors[j] = (path, "the shard file is missing")
          continue
        fds.append(fd)
        try:
          index, data_end = self._index(fd)
        except _BadShard as e:
          for j in range(lo, hi):
            errors[j] = (path, str(e))
          continue
        for j in range(lo, hi):
          offset, nbytes = index[row_list[j] - shard * rps].tolist()
          if offset == _MISSING and nbytes == _MISSING:
            errors[j] = (path, f"row {row_list[j]} was never written")
          elif nbytes != self.row_bytes or offset + nbytes > data_end:
            errors[j] = (path, f"row {row_list[j]} is recorded as {nbytes} "
                         f"bytes at offset {offset}, expected "
                         f"{self.row_bytes} bytes inside the first "
                         f"{data_end}")
          else:
            plan.append((j, fd, offset, path))
      if len(plan) > 1 and _FADVISE:
        # Rows not in the page cache: let the kernel fetch them all at once
        # (the disk serves them in parallel) before the reads below wait on
        # each in turn.
        for _, fd, offset, _ in plan:
          os.posix_fadvise(fd, offset, self.row_bytes,
                           os.POSIX_FADV_WILLNEED)
      piece = self.row_bytes if digests is None else _HASH_PIECE
      for j, fd, offset, path in plan:
        buf = memoryview(out[j]).cast("B")
        hasher = None if digests is None else RowHasher()
        done = 0
        while done < self.row_bytes:  # preadv may return fewer bytes.
          got = os.preadv(fd, [buf[done:done + piece]], offset + done)
          if got <= 0:
            errors[j] = (path, f"row {row_list[j]} is truncated")
            break
          if hasher is not None:
            hasher.update(buf[done:done + got])
          done += got
        else:
          if hasher is not None:
            digests[j] = hasher.digest()
    finally:
      for fd in fds:
        os.close(fd)
    return out
