"""Keeping the store clean and proving it intact: `gc` and `verify`.

Owns `collect_garbage` and `verify_all`.

gc is safe against live publishers in any process on any host because it
acts only on what can no longer become visible:
  1. it deletes, in one catalog transaction, the reservations whose lease
     expired; a publisher still running under one of them then fails its
     fenced commit and publishes nothing;
  2. it deletes the shard files of those reservations;
  3. it sweeps each array for shard files that no committed revision
     references and no reservation holds, below the shard counter, all
     read from one catalog snapshot (files of publishes that died after
     their reservation was reclaimed, or of a gc killed between 1 and 2).
A shard referenced by a committed revision is never touched: commits need
a live reservation, shard numbers are never reused, and a commit moves a
shard from reserved to referenced in one transaction.

verify re-reads every revision, checks its xxh3-64 and sha256, and lists
every bad reference with the file and the problem (it never stops at the
first).
"""

from __future__ import annotations

import time

from mintjax.store import records
from mintjax.store.catalog import Catalog
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.loader import Loader
from mintjax.store.weights import WeightsStore, row_sha256


def collect_garbage(catalog: Catalog, store: WeightsStore,
                    grace_s: float = 0.0) -> dict:
  """Reclaims expired reservations and unreferenced shard files.

  Args:
    catalog, store: the registry's parts.
    grace_s: also wait this long past a lease's expiry (clock skew
      between hosts).

  Returns:
    {'reclaimed_reservations', 'reclaimed_rows' (rows those reservations
    held), 'deleted_files' (shard directories removed), 'live_reservations'
    (left alone: their leases have not expired)}.
  """
  if isinstance(grace_s, bool) or not isinstance(
      grace_s, (int, float)) or not 0 <= grace_s < float("inf"):
    raise InvalidAdapterError(
        f"gc grace_s must be a finite number of seconds >= 0, got "
        f"{grace_s!r}")
  expired = catalog.reclaim_expired(time.time() - grace_s)
  deleted = 0
  for res in expired:
    deleted += store.delete_shards(res.array_key, res.shards)
  for key, _, _ in catalog.arrays():
    usage = catalog.shard_usage(key)
    orphans = sorted(s for s in store.shard_files(key)
                     if s < usage.next_shard and s not in usage.referenced
                     and s not in usage.reserved)
    deleted += store.delete_shards(key, orphans)
  return dict(reclaimed_reservations=len(expired),
              reclaimed_rows=sum(r.num_shards * r.rows_per_shard
                                 for r in expired),
              deleted_files=deleted,
              live_reservations=len(catalog.reservations()))


def verify_all(catalog: Catalog, loader: Loader, batch: int = 256) -> dict:
  """Re-reads every revision's row and checks xxh3-64 and sha256.

  Returns:
    {'ok': bool, 'checked': n, 'bad': [every bad ref], 'problems':
    {ref: what is wrong, naming the file}}.
  """
  layouts = {key: records.layout_json(layout)
             for key, layout, _ in catalog.arrays()}
  revs = catalog.revisions()
  problems: dict[str, str] = {}
  for i in range(0, len(revs), batch):
    chunk = revs[i:i + batch]
    errors: dict = {}
    rows = loader.read_rows(chunk, [layouts[r.array_key] for r in chunk],
                            verify=True, errors=errors)
    for k, (rev, row) in enumerate(zip(chunk, rows)):
      if k in errors:
        problems[rev.ref] = errors[k]
      elif row_sha256(row) != rev.sha256:
        problems[rev.ref] = (f"{rev.ref}: bytes pass xxh3-64 but hash to "
                             f"{row_sha256(row)[:19]}, the catalog recorded "
                             f"{rev.sha256[:19]}")
  bad = list(problems)
  return dict(ok=not bad, checked=len(revs), bad=bad, problems=problems)
