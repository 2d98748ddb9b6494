"""The resolver and loader: references -> revisions -> checked weights.

Owns `Loader` (the read half of the registry): resolving 'alice',
'alice@3', 'alice:prod' in one catalog query per batch, explaining why a
reference names nothing, reading rows in one batched store read, checking
each row's xxh3-64 against the catalog (on by default; `verify_checksums=
False` is the explicit opt-out for benchmarks) and turning rows into
`AdapterWeights` / `VeraWeights` ready to use (PEFT per-module scales
folded in by `peft_io.fold_b_scale`). A row that is missing or fails its
checksum raises `StoreCorruptionError` naming the reference and the file;
it is never returned, and never read as zeros.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mintjax.store import records
from mintjax.store.catalog import Catalog
from mintjax.store.errors import StoreCorruptionError, UnknownRefError
from mintjax.store.identity import parse_ref
from mintjax.store.peft_io import fold_b_scale
from mintjax.store.revision import LoadedAdapter, Revision, check_base
from mintjax.store.weights import WeightsStore


class Loader:
  """Resolves references and loads their weights (see module docstring)."""

  def __init__(self, catalog: Catalog, store: WeightsStore,
               verify_checksums: bool = True):
    self.catalog = catalog
    self.store = store
    self.verify_checksums = bool(verify_checksums)

  # --- resolve -------------------------------------------------------------

  def resolve(self, ref: str) -> Revision:
    """'alice' | 'alice@3' | 'alice:prod' -> Revision."""
    return self.resolve_many([ref])[0][0]

  def resolve_many(self, refs: Sequence[str]
                   ) -> list[tuple[Revision, str, str]]:
    """Resolves refs in one catalog query: (Revision, spec, layout JSON)."""
    found = self.catalog.resolve_many([parse_ref(r) for r in refs])
    for ref, f in zip(refs, found):
      if f is None:
        self._unresolved(ref)
    return found

  def _unresolved(self, ref: str) -> None:
    """Raises the error that explains why `ref` names nothing."""
    aid, rev, tag = parse_ref(ref)
    if tag is not None:
      rev = self.catalog.tag_revision(aid, tag)
      if rev is None and tag != "latest":
        records.adapter_record(self.catalog, aid)
        tags = self.catalog.tags(aid)
        raise UnknownRefError(
            f"adapter {aid!r} has no tag {tag!r} (tags: "
            f"{sorted(tags) or 'none'}); set one with tag('{aid}@N', "
            f"'{tag}')")
    found = self.catalog.revision(aid, rev)
    if found is None:
      records.adapter_record(self.catalog, aid)
      latest = self.catalog.revision(aid, None)
      raise UnknownRefError(
          f"{ref!r} names no revision: adapter {aid!r} has "
          f"{'revisions 1..%d' % latest.revision if latest else 'no revisions'}"
          "; publish one or pick an existing revision")
    raise UnknownRefError(f"{ref!r} names no revision")

  # --- load ----------------------------------------------------------------

  def read_rows(self, revs: Sequence[Revision], layouts: Sequence,
                verify: bool | None = None, errors: dict | None = None
                ) -> list[np.ndarray | None]:
    """Stored rows of `revs`, checksum-checked unless `verify` is False.

    Args:
      revs: revisions to read.
      layouts: the `RowLayout` of each.
      verify: check xxh3-64 (default: this loader's `verify_checksums`).
      errors: if given, filled with {index: message} and bad rows come back
        as None; otherwise the first bad row raises StoreCorruptionError.
    """
    verify = self.verify_checksums if verify is None else verify
    bad: dict = {}
    digests = {} if verify else None  # Hashed as the rows are read.
    rows = self.store.read_rows_many(
        [(rev.array_key, layout, rev.row) for rev, layout in
         zip(revs, layouts)], bad, digests)
    found = {i: f"{revs[i].ref}: shard file {path}: {problem}"
             for i, (path, problem) in bad.items()}
    if verify:
      for i, (rev, row) in enumerate(zip(revs, rows)):
        if row is not None and digests[i] != rev.xxh3_64:
          where = self.store.shard_location(rev.array_key, layouts[i],
                                            rev.row)
          found[i] = (f"{rev.ref}: row {rev.row} of shard file {where} "
                      "fails its xxh3-64 checksum (the stored bytes changed "
                      "after publish)")
    if errors is not None:
      errors.update(found)
      return [None if i in found else r for i, r in enumerate(rows)]
    if found:
      i = min(found)
      raise StoreCorruptionError(
          f"{found[i]}; run `python -m tools.mint verify` to list every "
          "damaged revision and restore the store from a backup")
    return rows

  def load_many(self, refs: Sequence[str], expect_base: str | None = None
                ) -> list[LoadedAdapter]:
    """Resolves many refs and reads all their rows in one batched read.

    Each comes back as its family's host weights (LoRA `AdapterWeights`,
    VeRA the stored `VeraWeights`); `.to_lora(config)` gives LoRA factors.
    """
    found = self.resolve_many(list(refs))
    for rev, _, _ in found:
      check_base(rev.ref, rev.base_fingerprint, expect_base)
    layouts = [records.layout_json(layout) for _, _, layout in found]
    rows = self.read_rows([rev for rev, _, _ in found], layouts)
    return [LoadedAdapter(rev, _weights(rev, spec, layout, row))
            for (rev, spec, _), layout, row in zip(found, layouts, rows)]

  def read_raw(self, ref: str) -> tuple[Revision, dict, dict]:
    """Stored factors exactly as written (no b_scale folding): (rev, A, B)."""
    rev, _, layout_json = self.resolve_many([ref])[0]
    layout = records.layout_json(layout_json)
    (row,) = self.read_rows([rev], [layout])
    a, b = layout.unpack(row)
    return rev, a, b


def _weights(rev: Revision, spec_json: str, layout, row: np.ndarray):
  """A row as its family's host weights, ready to use: PEFT imports' per-
  module scale ratios (`meta['b_scale']`) are folded into B here, so every
  consumer sees one scale per adapter (VeRA rows have none and keep only
  their vectors)."""
  info = records.info_json(spec_json)
  first, second = layout.unpack(row)
  if rev.meta.get("b_scale"):
    second = fold_b_scale(second, rev.meta)
  return info.family.from_tensors(info, first, second, rev.meta)
