"""The publisher: validated weights become new immutable revisions.

Owns `Publisher` (the write half of the registry). Protocol of one
`publish_many` call, per array (shape class) it touches:

  1. validate every item (spec, shapes, rank, alpha, NaN/Inf, base,
     parent, provenance) and pack it into a row; compute its sha256
     (content identity) and xxh3-64 (checked on every load);
  2. one catalog transaction reserves ceil(n / rows_per_shard) shards that
     were never used before (a counter that only grows), under a lease and
     a unique token; the array itself is created here on first use;
  3. write the rows into those shards (each shard file written once),
     read them back and compare checksums;
  4. one catalog transaction checks the reservation still exists and its
     lease has not expired (fencing), inserts the revisions (numbered
     max + 1 per adapter) and drops the reservation.

Nothing is visible before 4, and 4 is atomic. A crash at any point leaves
at most a reservation and unreferenced shard files, which `gc` deletes
after the lease expires. Bad input raises in 1: nothing changes. A single
publish makes one shard file holding one row; publish in bulk
(`publish_many`) to pack up to rows_per_shard rows per file.
"""

from __future__ import annotations

import json
import time
from typing import Mapping, Sequence

import numpy as np

from mintjax.adapters.spec import AdapterError
from mintjax.store.catalog import Catalog
from mintjax.store.errors import (InvalidAdapterError, StoreCorruptionError,
                                  UnknownRefError)
from mintjax.store.identity import (AdapterInfo, build_provenance,
                                    check_meta, check_weights)
from mintjax.store.revision import Revision
from mintjax.store.weights import (RowLayout, WeightsStore, row_xxh3_64,
                                   row_sha256, rows_per_shard_for)
from mintjax.store import records

DEFAULT_LEASE_S = 600.0


class Publisher:
  """Publishes revisions into one catalog + weights store."""

  def __init__(self, catalog: Catalog, store: WeightsStore,
               lease_s: float = DEFAULT_LEASE_S):
    if isinstance(lease_s, bool) or not isinstance(
        lease_s, (int, float)) or not 0 < lease_s < float("inf"):
      raise InvalidAdapterError(
          f"lease_s must be a finite number of seconds > 0, got {lease_s!r}")
    self.catalog = catalog
    self.store = store
    self.lease_s = float(lease_s)

  def publish_many(self, items: Sequence[tuple]) -> list[Revision]:
    """Publishes many revisions (see the module docstring).

    Args:
      items: tuples (adapter_id, weights[, provenance[, parent[, meta]]]).

    Returns:
      The new revisions, in order. Items of one shape class are published
      all or none; items of several classes commit class by class.
    """
    prepared = [self._prepare(*it) for it in items]
    by_key: dict[str, list[int]] = {}
    for i, p in enumerate(prepared):
      by_key.setdefault(p["array_key"], []).append(i)
    out: list[Revision] = [None] * len(prepared)  # type: ignore
    for key, idx in by_key.items():
      for i, rev in zip(idx, self._publish_class(
          key, [prepared[i] for i in idx])):
        out[i] = rev
    return out

  def _publish_class(self, key: str, items: list[dict]) -> list[Revision]:
    """Steps 2-4 of the protocol for items of one array."""
    layout: RowLayout = items[0]["layout"]
    rps = rows_per_shard_for(layout.row_bytes)
    res = self.catalog.reserve_shards(
        array_key=key, layout_json=json.dumps(layout.to_dict(),
                                              sort_keys=True),
        rows_per_shard=rps, num_shards=-(-len(items) // rps),
        lease_s=self.lease_s,
        set_layout_for=sorted({p["adapter_id"] for p in items
                               if p["new_layout"]}),
        prepare_array=lambda: self.store.prepare_array(key, layout))
    started = time.time()
    rows = [res.first_row + k for k in range(len(items))]
    try:
      self.store.write_rows(key, layout, res.first_row,
                            np.stack([p["row"] for p in items]))
      if time.time() - started > self.lease_s / 2:
        self.catalog.renew_lease(res.token, self.lease_s)
      errors, digests = {}, {}
      self.store.read_rows_many([(key, layout, r) for r in rows], errors,
                                digests)
      for k, p in enumerate(items):
        if k in errors or digests[k] != p["xxh3_64"]:
          raise StoreCorruptionError(
              f"row read back for {p['adapter_id']} does not match what was "
              f"written ({errors.get(k, 'checksum differs')}); the storage "
              "is unreliable, nothing was published")
      numbers, parents, created = self.catalog.commit_revisions(
          res.token, [dict(adapter_id=p["adapter_id"], parent=p["parent"],
                           array_key=key, row=r, sha256=p["sha256"],
                           xxh3_64=p["xxh3_64"],
                           provenance_json=p["provenance_json"],
                           meta_json=p["meta_json"])
                      for p, r in zip(items, rows)])
    except BaseException:
      self._abandon(key, res)
      raise
    return [Revision(p["adapter_id"], n, parent, p["base_fingerprint"],
                     p["sha256"], p["provenance_json"], created, key, r,
                     p["meta_json"], p["xxh3_64"])
            for p, n, parent, r in zip(items, numbers, parents, rows)]

  def _abandon(self, key: str, res) -> None:
    """Best-effort cleanup of a failed publish.

    The reservation is dropped first, and the shard files deleted only if
    it still existed: then no revision references them and none ever will.
    If it was gone, the commit may have gone through just before the error
    (or gc took it over): the files are left to gc, which checks.
    """
    try:
      if self.catalog.release(res.token):
        self.store.delete_shards(key, res.shards)
    except Exception:  # pylint: disable=broad-except
      pass  # The lease expires and gc reclaims it.

  def _prepare(self, adapter_id, weights, provenance=None, parent=None,
               meta=None) -> dict:
    """Validates one publish item; raises before anything is written."""
    rec = records.adapter_record(self.catalog, adapter_id)
    info = records.info_of(rec)
    check_weights(adapter_id, info, weights)
    layout_new = rec["layout"] is None
    layout = (_layout_from_weights(adapter_id, info, weights) if layout_new
              else records.layout_of(rec))
    row = layout.pack(*info.family.tensors(weights))
    if parent is not None and (isinstance(parent, bool) or
                               not isinstance(parent, int) or parent < 1):
      raise InvalidAdapterError(
          f"parent must be a revision number >= 1 or None, got {parent!r}")
    if parent is not None:
      latest = self.catalog.revision(adapter_id, None)
      if latest is None or parent > latest.revision:
        raise UnknownRefError(
            f"parent {adapter_id}@{parent} does not exist (latest: "
            f"{latest.revision if latest else 'none'})")
    prov = build_provenance(rec, provenance)
    if meta is not None and not isinstance(meta, Mapping):
      raise InvalidAdapterError(
          f"meta must be a dict, got {type(meta).__name__}")
    meta = dict(meta or {})
    check_meta(meta, layout)
    try:
      meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise InvalidAdapterError(
          f"meta must be JSON-serialisable: {e}") from None
    return dict(adapter_id=adapter_id, layout=layout, new_layout=layout_new,
                base_fingerprint=rec["base_fingerprint"],
                array_key=rec["array_key"] or layout.class_key(
                    rec["base_fingerprint"]),
                row=row, sha256=row_sha256(row), xxh3_64=row_xxh3_64(row),
                parent="latest" if parent is None else parent,
                provenance_json=json.dumps(prov, sort_keys=True),
                meta_json=meta_json)


def _layout_from_weights(adapter_id: str, info: AdapterInfo, weights
                         ) -> RowLayout:
  """The row layout an adapter's first publish fixes from its weights'
  shapes (families whose weights determine them, e.g. LoRA)."""
  try:
    shapes = info.family.shapes_of(weights)
  except AdapterError as e:
    raise InvalidAdapterError(f"weights for {adapter_id!r}: {e}") from None
  if shapes is None:
    raise InvalidAdapterError(
        f"{info.variant} adapter {adapter_id!r} has no recorded shapes "
        "(its stored tensors do not determine d_in); create it with "
        "config= or shapes=")
  missing = [t for t in info.targets if t not in shapes]
  if missing:
    raise InvalidAdapterError(
        f"weights for {adapter_id!r} lack targets {missing}; the adapter's "
        f"targets are {list(info.targets)}")
  return RowLayout.for_info(info, shapes)
