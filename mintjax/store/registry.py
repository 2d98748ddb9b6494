"""The adapter registry (MinT): one facade over the store's parts.

Owns `Registry`, the one entry point to persistent adapter state, and
adapter creation. Everything else lives in one module per responsibility:

  catalog.py / sqlite_catalog.py   catalog interface / SQLite implementation
  postgres_catalog.py              PostgreSQL implementation (shared catalog)
  locations.py                     registry URLs (which catalog, which store)
  publisher.py                     publish protocol (reserve, write, commit)
  loader.py                        resolve refs, read and checksum rows
  lifecycle.py                     tags, rollback, evals, residency, history
  maintenance.py                   gc and verify
  weights.py / shard_reader.py     write-once shard files
  identity.py / revision.py        ids, refs, specs; Revision, base check

References: 'alice' (latest revision), 'alice@3' (revision 3), 'alice:prod'
(tag; 'alice:latest' is the latest revision unless a tag of that name
exists). Ids and tags use ASCII letters, digits, '-', '_' and '.', start
with a letter or digit and are never paths.

Durability: once `publish` returns, the revision's bytes are in a shard
file that nothing rewrites or deletes, and every load checks them against
the xxh3-64 checksum recorded at publish (see `publisher.py`,
`checksum.py` and `maintenance.py`).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from mintjax.adapters.spec import AdapterError, AdapterWeights, target_shape
from mintjax.config import ModelConfig
from mintjax.store import records
from mintjax.store.catalog import Catalog
from mintjax.store.diff import diff_revisions
from mintjax.store.errors import InvalidAdapterError, RegistryError
from mintjax.store.identity import (AdapterInfo, check_name, parse_info,
                                    parse_ref)
from mintjax.store.lifecycle import Lifecycle
from mintjax.store.loader import Loader
from mintjax.store.locations import parse_location
from mintjax.store.maintenance import collect_garbage, verify_all
from mintjax.store.postgres_catalog import PostgresCatalog
from mintjax.store.publisher import DEFAULT_LEASE_S, Publisher
from mintjax.store.revision import LoadedAdapter, Revision, check_base
from mintjax.store.sqlite_catalog import SqliteCatalog
from mintjax.store.weights import RowLayout, WeightsStore

__all__ = ["Registry", "Revision", "LoadedAdapter", "AdapterInfo",
           "parse_ref", "check_base"]


class Registry:
  """Adapter identity, immutable revisions, tags, evals and the weights."""

  def __init__(self, catalog: Catalog, store: WeightsStore, *,
               verify_checksums: bool = True,
               lease_s: float = DEFAULT_LEASE_S):
    self.catalog = catalog
    self.store = store
    self.publisher = Publisher(catalog, store, lease_s)
    self.loader = Loader(catalog, store, verify_checksums)
    self.lifecycle = Lifecycle(catalog, self.loader)

  @classmethod
  def open(cls, path_or_spec, compression: str | None = None, *,
           create: bool = True, verify_checksums: bool = True,
           lease_s: float = DEFAULT_LEASE_S,
           verify_on_load: bool | None = None) -> "Registry":
    """Opens a registry, creating it if missing unless `create=False`.

    Args:
      path_or_spec: a local directory (catalog.sqlite + arrays/ inside it),
        a registry URL ('postgresql://host/db?schema=s&store=s3://b/p',
        'sqlite:///abs/catalog.sqlite?store=gs://b/p'), or a dict
        {'catalog': local sqlite path or postgresql:// URL, 'store':
        directory, URL ('gs://b/p', 's3://b/p?endpoint=...') or
        tensorstore kvstore spec}; see `mintjax.store.locations`.
      compression: None or 'zstd' for arrays created from now on.
      create: create an empty registry when there is none (the default,
        for library callers). Read-only tools pass False, so a mistyped
        path is an error instead of a new, empty registry.
      verify_checksums: check every loaded row's xxh3-64 (default). Pass
        False only to measure the raw read path (benchmarks).
      lease_s: how long a publish may hold its reserved shards before
        `gc` (from any process or host) may reclaim them.
      verify_on_load: old name of `verify_checksums`.
    """
    if verify_on_load is not None:
      verify_checksums = bool(verify_on_load)
    loc = parse_location(path_or_spec, compression)
    if loc.backend == "postgresql":
      catalog = PostgresCatalog(loc.catalog, loc.schema, create=create)
    else:
      if not create and not os.path.isfile(loc.catalog):
        raise RegistryError(
            f"{path_or_spec!r} is not a mintjax registry (no catalog at "
            f"{loc.catalog}); check the path, or create one with "
            "Registry.open(path) or `python -m tools.mint --registry=DIR "
            "import-peft ...`")
      catalog = SqliteCatalog(loc.catalog)
    try:
      weights = WeightsStore(loc.store, loc.compression)
    except BaseException:
      catalog.close()
      raise
    return cls(catalog, weights, verify_checksums=verify_checksums,
               lease_s=lease_s)

  def close(self) -> None:
    self.catalog.close()

  # --- identity ------------------------------------------------------------

  def create_adapter(self, adapter_id: str, *, spec, base_fingerprint: str,
                     owner: str = "", exist_ok: bool = False,
                     config: ModelConfig | None = None,
                     shapes: Mapping[str, Sequence[int]] | None = None
                     ) -> dict:
    """Registers a new adapter identity.

    Args:
      adapter_id: stable id (see `check_name`).
      spec: the adapter spec, an `AdapterInfo` or its dict form (targets,
        rank, alpha, ...); a bank spec gives one with
        `AdapterInfo.for_bank(bank_spec, alpha=...)`.
      base_fingerprint: the base model's 'sha256:...' fingerprint.
      owner: owner / tenant name.
      exist_ok: return the existing adapter if it has the same spec and base.
      config: optional base config fixing per-target shapes now; otherwise
        `shapes` ({t: (L, d_in, d_out)}) or the first publish fixes them.

    Returns:
      The adapter's catalog record.
    """
    check_name(adapter_id)
    row, info = _adapter_row(adapter_id, spec=spec,
                             base_fingerprint=base_fingerprint, owner=owner,
                             config=config, shapes=shapes)
    existing = self.catalog.adapter(adapter_id)
    if existing is not None:
      if (exist_ok and records.info_of(existing) == info and
          existing["base_fingerprint"] == base_fingerprint):
        return existing
      raise InvalidAdapterError(
          f"adapter {adapter_id!r} already exists (spec {existing['spec']}, "
          f"base {existing['base_fingerprint'][:19]}); pick another id, or "
          "pass exist_ok=True with the same spec and base")
    try:
      self.catalog.insert_adapters([row])
    except InvalidAdapterError:
      # Created by another process since the check above.
      existing = self.catalog.adapter(adapter_id)
      if (exist_ok and existing is not None and
          existing["spec"] == info.to_dict() and
          existing["base_fingerprint"] == base_fingerprint):
        return existing
      raise
    return self.catalog.adapter(adapter_id)

  def create_adapters(self, adapter_ids: Sequence[str], *, spec,
                      base_fingerprint: str, owner: str = "",
                      config: ModelConfig | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None
                      ) -> None:
    """Registers many adapters of one spec in one transaction (bulk path).

    Same checks as `create_adapter`; refuses (creating none) if any id is
    invalid, repeated or already registered.
    """
    ids = [check_name(i) for i in adapter_ids]
    if len(set(ids)) != len(ids):
      raise InvalidAdapterError("create_adapters got repeated adapter ids")
    row, _ = _adapter_row(ids[0] if ids else "x", spec=spec,
                          base_fingerprint=base_fingerprint, owner=owner,
                          config=config, shapes=shapes)
    taken = self.catalog.existing_ids(ids)
    if taken:
      raise InvalidAdapterError(
          f"{len(taken)} adapters already exist (e.g. {taken[0]!r}); "
          "create_adapters only registers new ids")
    self.catalog.insert_adapters([(i, *row[1:]) for i in ids])

  def adapter(self, adapter_id: str) -> dict:
    return records.adapter_record(self.catalog, adapter_id)

  def list_adapters(self) -> list[dict]:
    return self.catalog.adapters()

  # --- publish (publisher.py) ----------------------------------------------

  def publish(self, adapter_id: str, weights: AdapterWeights,
              provenance: Mapping | None = None, parent: int | None = None,
              meta: Mapping | None = None) -> Revision:
    """Publishes one new immutable revision (see `publisher.py`).

    Args:
      adapter_id: an existing adapter.
      weights: factors of exactly the adapter's targets, rank and alpha.
      provenance: data_fingerprint, training_config, steps, seed and any
        extra JSON keys; base fingerprint, code version and host are filled.
      parent: revision this one derives from; None means the latest.
      meta: storage metadata (e.g. PEFT per-module ranks; see peft_io).
    """
    return self.publisher.publish_many([(adapter_id, weights, provenance,
                                         parent, meta)])[0]

  def publish_many(self, items: Sequence[tuple]) -> list[Revision]:
    """Publishes many revisions: one reservation, one batched write and one
    commit per shape class. Items: (adapter_id, weights[, provenance[,
    parent[, meta]]])."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
      raise InvalidAdapterError(
          "publish_many takes a list of (adapter_id, weights[, provenance"
          f"[, parent[, meta]]]) tuples, got {type(items).__name__}")
    for it in items:
      if not isinstance(it, tuple) or not 2 <= len(it) <= 5:
        raise InvalidAdapterError(
            "each publish_many item must be a tuple (adapter_id, weights[, "
            f"provenance[, parent[, meta]]]), got {it!r:.80}")
    return self.publisher.publish_many(items)

  # --- resolve and load (loader.py) ----------------------------------------

  def resolve(self, ref: str) -> Revision:
    """'alice' | 'alice@3' | 'alice:prod' -> Revision."""
    return self.loader.resolve(ref)

  def load(self, ref: str, expect_base: str | None = None) -> LoadedAdapter:
    """Resolves and reads one revision: `LoadedAdapter(revision, weights)`."""
    return self.loader.load_many([ref], expect_base)[0]

  def load_many(self, refs: Sequence[str], expect_base: str | None = None
                ) -> list[LoadedAdapter]:
    """Resolves many refs and reads all their rows in one batched read."""
    return self.loader.load_many(refs, expect_base)

  def read_raw(self, ref: str) -> tuple[Revision, dict, dict]:
    """Stored factors exactly as written (no b_scale folding): (rev, A, B)."""
    return self.loader.read_raw(ref)

  # --- tags, evals, residency, history (lifecycle.py) ----------------------

  def history(self, adapter_id: str) -> list[Revision]:
    return self.lifecycle.history(adapter_id)

  def record_eval(self, ref: str, metric: str, value: float,
                  data_fingerprint: str = "") -> None:
    self.lifecycle.record_eval(ref, metric, value, data_fingerprint)

  def evals(self, ref: str) -> list[dict]:
    return self.lifecycle.evals(ref)

  def tag(self, ref: str, tag: str, reason: str = "tag") -> Revision:
    return self.lifecycle.tag(ref, tag, reason)

  def tags(self, adapter_id: str) -> dict[str, int]:
    return self.lifecycle.tags(adapter_id)

  def tag_history(self, adapter_id: str, tag: str | None = None
                  ) -> list[dict]:
    return self.lifecycle.tag_history(adapter_id, tag)

  def rollback(self, adapter_id: str, tag: str = "prod", to: int | None = None
               ) -> Revision:
    return self.lifecycle.rollback(adapter_id, tag, to)

  def record_residency(self, ref_or_revision, served: int = 0, loads: int = 0
                       ) -> None:
    self.lifecycle.record_residency(ref_or_revision, served, loads)

  def residency(self, adapter_id: str) -> list[dict]:
    return self.lifecycle.residency(adapter_id)

  # --- gc, verify (maintenance.py), diff (diff.py) ------------------------

  def gc(self, grace_s: float = 0.0) -> dict:
    """Reclaims reservations whose lease expired and unreferenced shard
    files (safe while other processes publish; see `maintenance.py`)."""
    return collect_garbage(self.catalog, self.store, grace_s)

  def verify(self, batch: int = 256) -> dict:
    """Checks every revision's bytes; lists every bad ref (`problems` says
    what is wrong with each, naming the file)."""
    return verify_all(self.catalog, self.loader, batch)

  def diff(self, ref_a: str, ref_b: str) -> dict[str, dict]:
    """Per-target weight-delta norms of two revisions (`mint diff`; see
    `mintjax.store.diff.diff_revisions`)."""
    return diff_revisions(self, ref_a, ref_b)


def _adapter_row(adapter_id: str, *, spec, base_fingerprint, owner, config,
                 shapes) -> tuple[tuple, AdapterInfo]:
  """Validates a new adapter; returns its catalog row and parsed spec."""
  info = parse_info(spec)
  if not isinstance(base_fingerprint, str) or not base_fingerprint:
    raise InvalidAdapterError(
        f"base_fingerprint must be a non-empty string like 'sha256:...', "
        f"got {base_fingerprint!r}; use BaseModel.fingerprint")
  if not isinstance(owner, str):
    raise InvalidAdapterError(f"owner must be a string, got {owner!r}")
  if config is not None:
    try:
      shapes = {t: target_shape(config, t) for t in info.targets}
    except AdapterError as e:
      raise InvalidAdapterError(str(e)) from None
  layout_json = key = None
  if shapes is not None:
    if not isinstance(shapes, Mapping) or set(shapes) != set(info.targets):
      raise InvalidAdapterError(
          f"shapes must map exactly the spec's targets {list(info.targets)} "
          f"to (layers, d_in, d_out), got {shapes!r:.120}")
    layout = RowLayout.for_info(info, shapes)
    layout_json = json.dumps(layout.to_dict(), sort_keys=True)
    key = layout.class_key(base_fingerprint)
  return ((adapter_id, owner, json.dumps(info.to_dict(), sort_keys=True),
           base_fingerprint, layout_json, key), info)
