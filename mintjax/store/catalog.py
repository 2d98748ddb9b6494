"""The catalog interface: every query the registry makes of its metadata.

Owns `Catalog`, the abstract contract between the registry's parts
(publisher, loader, lifecycle, maintenance) and a metadata database, and
the small records it returns (`Reservation`, `ShardUsage`). SQLite
(`mintjax.store.sqlite_catalog.SqliteCatalog`) implements it today; a
PostgreSQL catalog implements the same methods and no caller changes. Every
method runs its own transaction: callers never hold a database handle.

The contract each implementation must keep (the store's durability rests
on it):

* Revision numbers are assigned max + 1 per adapter inside the transaction
  that inserts them: unique and gap-free however many processes publish.
* Shard numbers come from a per-array counter that only grows: a shard
  number is handed out once, ever. Reservation tokens are never reused.
* `commit_revisions` inserts revisions only if the reservation still exists
  and its lease has not expired, in the same transaction that deletes the
  reservation (fencing): a publish whose reservation `gc` reclaimed can
  never make anything visible.
* `shard_usage` reads referenced shards, live reservations and the shard
  counter from one consistent snapshot.
* Database errors reach callers only as `CatalogError` (a `RegistryError`)
  with a message, never as a driver exception.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Sequence

from mintjax.store.revision import Revision

# Re-exported: older code imports Revision from here.
__all__ = ["Catalog", "Reservation", "ShardUsage", "Revision"]


@dataclasses.dataclass(frozen=True)
class Reservation:
  """Shards [first_shard, first_shard + num_shards) of one array, held by
  one publish until `lease_expires` (unix time) under a unique token."""

  token: str
  array_key: str
  first_shard: int
  num_shards: int
  rows_per_shard: int
  host: str
  pid: int
  created: float
  lease_expires: float

  @property
  def shards(self) -> range:
    return range(self.first_shard, self.first_shard + self.num_shards)

  @property
  def first_row(self) -> int:
    return self.first_shard * self.rows_per_shard


@dataclasses.dataclass(frozen=True)
class ShardUsage:
  """One array's shards as seen in one snapshot (for gc).

  Attributes:
    referenced: shards holding at least one committed revision's row.
    reserved: shards held by reservations (live or not yet reclaimed).
    next_shard: every shard >= this is unallocated.
  """

  referenced: frozenset
  reserved: frozenset
  next_shard: int


class Catalog(abc.ABC):
  """Adapter metadata: identities, revisions, tags, evals, reservations."""

  path: str

  @abc.abstractmethod
  def close(self) -> None: ...

  @abc.abstractmethod
  def counts(self) -> dict[str, int]:
    """Row counts of the main tables (tests check 'nothing changed')."""

  # --- adapters ------------------------------------------------------------

  @abc.abstractmethod
  def adapter(self, adapter_id: str) -> dict | None:
    """The record (id, owner, spec, base_fingerprint, layout, array_key,
    created, spec_json, layout_json) or None."""

  @abc.abstractmethod
  def adapters(self) -> list[dict]:
    """Every adapter with its revision count, latest revision and tags."""

  @abc.abstractmethod
  def existing_ids(self, ids: Sequence[str]) -> list[str]: ...

  @abc.abstractmethod
  def insert_adapters(self, rows: Sequence[tuple]) -> None:
    """Inserts (id, owner, spec_json, base, layout_json, array_key) rows in
    one transaction; all or none."""

  # --- reservations and revisions -----------------------------------------

  @abc.abstractmethod
  def reserve_shards(self, *, array_key: str, layout_json: str,
                     rows_per_shard: int, num_shards: int, lease_s: float,
                     set_layout_for: Sequence[str] = (),
                     prepare_array: Callable[[], None] | None = None
                     ) -> Reservation:
    """Reserves `num_shards` never-used shards of `array_key` under a lease.

    In the same transaction: records the array on first use, fixes the
    layout of adapters in `set_layout_for` that have none (refusing one
    whose layout is fixed to another array), and calls `prepare_array`
    (the weights store creating the array's metadata while no other
    publisher can).
    """

  @abc.abstractmethod
  def renew_lease(self, token: str, lease_s: float) -> None:
    """Extends a live reservation's lease; raises LeaseExpiredError if it
    has expired or was reclaimed."""

  @abc.abstractmethod
  def commit_revisions(self, token: str, items: Sequence[dict]
                       ) -> tuple[list[int], list, float]:
    """Inserts revisions under reservation `token` and drops it (fenced).

    Each item has adapter_id, parent ('latest' or a number or None),
    array_key, row, sha256, xxh3_64, provenance_json, meta_json.

    Returns:
      (revision numbers, parents, commit time).

    Raises:
      LeaseExpiredError: the reservation is gone or its lease expired;
        nothing was inserted.
    """

  @abc.abstractmethod
  def release(self, token: str) -> bool:
    """Drops a reservation whose publish failed (its shards stay unused);
    False if it was already gone (committed, or reclaimed by gc)."""

  @abc.abstractmethod
  def reservations(self) -> list[Reservation]: ...

  @abc.abstractmethod
  def reclaim_expired(self, now: float) -> list[Reservation]:
    """Deletes, in one transaction, every reservation whose lease ended
    before `now`, and returns them."""

  @abc.abstractmethod
  def arrays(self) -> list[tuple[str, str, int]]:
    """(array_key, layout_json, rows_per_shard) of every array."""

  @abc.abstractmethod
  def shard_usage(self, array_key: str) -> ShardUsage: ...

  @abc.abstractmethod
  def revision(self, adapter_id: str, revision: int | None
               ) -> Revision | None:
    """A revision by number, or the latest when `revision` is None."""

  @abc.abstractmethod
  def resolve_many(self, parsed: Sequence[tuple[str, int | None, str | None]]
                   ) -> list[tuple[Revision, str, str] | None]:
    """Resolves (id, revision, tag) triples at once.

    A revision number wins; else a tag; else (no tag, or the tag 'latest'
    when no such tag is set) the latest revision.

    Returns:
      Per triple (Revision, spec_json, layout_json), or None if unresolved.
    """

  @abc.abstractmethod
  def revisions(self, adapter_id: str | None = None) -> list[Revision]: ...

  # --- tags, evals, residency ----------------------------------------------

  @abc.abstractmethod
  def tag_revision(self, adapter_id: str, tag: str) -> int | None: ...

  @abc.abstractmethod
  def tags(self, adapter_id: str) -> dict[str, int]: ...

  @abc.abstractmethod
  def set_tag(self, adapter_id: str, tag: str, revision: int, reason: str,
              expect_current: int | None = None) -> int | None:
    """Points a tag at a revision and records the move; returns the old
    revision. With `expect_current`, refuses if the tag moved meanwhile."""

  @abc.abstractmethod
  def tag_events(self, adapter_id: str, tag: str | None = None
                 ) -> list[dict]: ...

  @abc.abstractmethod
  def insert_eval(self, adapter_id: str, revision: int, metric: str,
                  value: float, data_fingerprint: str) -> None: ...

  @abc.abstractmethod
  def evals(self, adapter_id: str, revision: int | None = None
            ) -> list[dict]: ...

  @abc.abstractmethod
  def add_residency(self, adapter_id: str, revision: int, served: int,
                    loads: int) -> None: ...

  @abc.abstractmethod
  def residency(self, adapter_id: str) -> list[dict]: ...
