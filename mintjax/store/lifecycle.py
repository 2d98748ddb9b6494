"""What happens to revisions after publish: tags, rollback, evals, history.

Owns `Lifecycle`: tags that point at revisions (every move recorded with
its reason), rollback, evaluation results, serving counters, and the
revision history of an adapter. Revisions themselves never change.
"""

from __future__ import annotations

import math

import numpy as np

from mintjax.store import records
from mintjax.store.catalog import Catalog
from mintjax.store.errors import (InvalidAdapterError, RegistryError,
                                  UnknownRefError)
from mintjax.store.identity import check_name
from mintjax.store.loader import Loader
from mintjax.store.revision import Revision


class Lifecycle:
  """Tags, rollback, evals, residency counters and history."""

  def __init__(self, catalog: Catalog, loader: Loader):
    self.catalog = catalog
    self.loader = loader

  def history(self, adapter_id: str) -> list[Revision]:
    records.adapter_record(self.catalog, adapter_id)
    return self.catalog.revisions(adapter_id)

  def record_eval(self, ref: str, metric: str, value: float,
                  data_fingerprint: str = "") -> None:
    rev = self.loader.resolve(ref)
    if not isinstance(metric, str) or not metric.strip():
      raise InvalidAdapterError(f"metric must be a non-empty name, got "
                                f"{metric!r}")
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.floating, np.integer)) or not math.isfinite(
            float(value)):
      raise InvalidAdapterError(
          f"eval value for {metric!r} must be a finite number, got {value!r}")
    self.catalog.insert_eval(rev.adapter_id, rev.revision, metric,
                             float(value), str(data_fingerprint))

  def evals(self, ref: str) -> list[dict]:
    rev = self.loader.resolve(ref)
    return self.catalog.evals(rev.adapter_id, rev.revision)

  def tag(self, ref: str, tag: str, reason: str = "tag") -> Revision:
    """Points `tag` at the revision `ref` names (recorded in tag history)."""
    check_name(tag, "tag")
    if not isinstance(reason, str):
      raise InvalidAdapterError(f"reason must be a string, got {reason!r}")
    rev = self.loader.resolve(ref)
    self.catalog.set_tag(rev.adapter_id, tag, rev.revision, reason)
    return rev

  def tags(self, adapter_id: str) -> dict[str, int]:
    records.adapter_record(self.catalog, adapter_id)
    return self.catalog.tags(adapter_id)

  def tag_history(self, adapter_id: str, tag: str | None = None
                  ) -> list[dict]:
    records.adapter_record(self.catalog, adapter_id)
    return self.catalog.tag_events(adapter_id, tag)

  def rollback(self, adapter_id: str, tag: str = "prod",
               to: int | None = None) -> Revision:
    """Moves `tag` back: to revision `to`, or to where it pointed before."""
    check_name(tag, "tag")
    records.adapter_record(self.catalog, adapter_id)
    current = self.catalog.tag_revision(adapter_id, tag)
    if current is None:
      raise UnknownRefError(
          f"adapter {adapter_id!r} has no tag {tag!r} to roll back; tag a "
          "revision first")
    if to is None:
      moves = [e for e in self.catalog.tag_events(adapter_id, tag)
               if e["old"] is not None and e["old"] != e["new"]]
      if not moves:
        raise RegistryError(
            f"{adapter_id}:{tag} has never pointed anywhere else; pass "
            "to=REVISION to choose the target")
      to = moves[-1]["old"]
    if isinstance(to, bool) or not isinstance(to, int) or to < 1:
      raise InvalidAdapterError(
          f"rollback target must be a revision number >= 1, got {to!r}")
    rev = self.loader.resolve(f"{adapter_id}@{to}")
    self.catalog.set_tag(adapter_id, tag, rev.revision,
                         f"rollback from {current}", expect_current=current)
    return rev

  def record_residency(self, ref_or_revision, served: int = 0,
                       loads: int = 0) -> None:
    """Adds serving counters (called by the serving engine)."""
    rev = (ref_or_revision if isinstance(ref_or_revision, Revision) else
           self.loader.resolve(ref_or_revision))
    for name, v in (("served", served), ("loads", loads)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidAdapterError(f"{name} must be an int >= 0, got {v!r}")
    self.catalog.add_residency(rev.adapter_id, rev.revision, served, loads)

  def residency(self, adapter_id: str) -> list[dict]:
    records.adapter_record(self.catalog, adapter_id)
    return self.catalog.residency(adapter_id)
