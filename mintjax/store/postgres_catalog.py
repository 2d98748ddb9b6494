"""The PostgreSQL implementation of the catalog (`mintjax.store.catalog`).

Owns the PostgreSQL schema and SQL of a registry shared by many hosts:
the same tables as `sqlite_catalog` (adapters, immutable revisions, evals,
tags and their history, residency, arrays with their shard counter, leased
reservations), in one PostgreSQL schema per registry (`?schema=` of the
registry URL, see `mintjax.store.locations`), through psycopg 3.

How each guarantee of the catalog contract is kept without SQLite's single
writer (every write is one transaction; others run concurrently):

* Gap-free revision numbers: `commit_revisions` takes a transaction-level
  advisory lock per adapter (in sorted order, so two commits never
  deadlock) before reading max(revision); the next committer of that
  adapter waits, then reads the new max.
* Shard numbers handed out once: `UPDATE arrays SET next_shard =
  next_shard + n ... RETURNING` is atomic and row-locked; a new array's row
  is inserted first (`ON CONFLICT DO NOTHING`), so its creator holds the
  row lock while `prepare_array` writes the array's metadata.
* Fencing: the commit locks its reservation row (`FOR UPDATE`) before
  inserting; gc's `DELETE ... WHERE lease_expires < now` either deletes it
  first (the commit then finds nothing and publishes nothing) or waits for
  the commit, which has deleted it.
* One snapshot for `shard_usage`: a REPEATABLE READ read-only transaction.
* Tag moves with `expect_current`: an advisory lock per (adapter, tag).

Transient conflicts (deadlock, serialization failure) are retried; every
other database error reaches callers as `CatalogError` naming the server
(password redacted) and a fix. psycopg is imported when a catalog is
opened, so `import mintjax.store` never needs it (`pip install
'mintjax[postgres]'`).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from mintjax.store.catalog import Catalog, Reservation, ShardUsage
from mintjax.store.errors import (CatalogError, InvalidAdapterError,
                                  LeaseExpiredError, RegistryError)
from mintjax.store.identity import hostname
from mintjax.store.locations import redact
from mintjax.store.revision import Revision
from mintjax.store.sqlite_catalog import SCHEMA_VERSION, TABLES

__all__ = ["PostgresCatalog"]

# Same tables and columns as the SQLite catalog; times are unix seconds in
# DOUBLE PRECISION (PostgreSQL's REAL is 4 bytes), checksums BIGINT.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL,
  base_fingerprint TEXT NOT NULL, layout TEXT, array_key TEXT,
  created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
  adapter_id TEXT NOT NULL REFERENCES adapters(id), revision INTEGER NOT NULL,
  parent INTEGER, array_key TEXT NOT NULL, "row" BIGINT NOT NULL,
  sha256 TEXT NOT NULL, xxh3_64 BIGINT NOT NULL,
  created DOUBLE PRECISION NOT NULL, provenance TEXT NOT NULL,
  meta TEXT NOT NULL, PRIMARY KEY (adapter_id, revision));
CREATE UNIQUE INDEX IF NOT EXISTS revisions_row ON revisions(array_key, "row");
CREATE TABLE IF NOT EXISTS evals (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  adapter_id TEXT NOT NULL, revision INTEGER NOT NULL, metric TEXT NOT NULL,
  value DOUBLE PRECISION NOT NULL, data_fingerprint TEXT NOT NULL,
  created DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS evals_rev ON evals(adapter_id, revision);
CREATE TABLE IF NOT EXISTS tags (
  adapter_id TEXT NOT NULL, tag TEXT NOT NULL, revision INTEGER NOT NULL,
  updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (adapter_id, tag));
CREATE TABLE IF NOT EXISTS tag_events (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  adapter_id TEXT NOT NULL, tag TEXT NOT NULL, old_revision INTEGER,
  new_revision INTEGER NOT NULL, reason TEXT NOT NULL,
  created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS residency (
  adapter_id TEXT NOT NULL, revision INTEGER NOT NULL,
  served_count BIGINT NOT NULL DEFAULT 0, last_served DOUBLE PRECISION,
  load_count BIGINT NOT NULL DEFAULT 0, last_loaded DOUBLE PRECISION,
  PRIMARY KEY (adapter_id, revision));
CREATE TABLE IF NOT EXISTS arrays (
  key TEXT PRIMARY KEY, layout TEXT NOT NULL,
  rows_per_shard INTEGER NOT NULL, next_shard BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
  token TEXT PRIMARY KEY, array_key TEXT NOT NULL,
  first_shard BIGINT NOT NULL, num_shards INTEGER NOT NULL,
  host TEXT NOT NULL, pid INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL,
  lease_expires DOUBLE PRECISION NOT NULL);
"""
# Advisory lock key serialising schema creation across processes.
_CREATE_LOCK = 0x6D696E746A6178  # "mintjax"
_RETRIES = 8


def _now() -> float:
  return time.time()


def _wrap(method):
  """Runs `method` under the connection lock, retries transient conflicts
  and turns psycopg errors into CatalogError."""

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    errors = self._pg.errors
    for attempt in range(_RETRIES):
      try:
        with self._lock:
          self._reconnect_if_broken()
          return method(self, *args, **kwargs)
      except (errors.DeadlockDetected, errors.SerializationFailure):
        if attempt == _RETRIES - 1:
          raise CatalogError(
              f"catalog {self.path}: {method.__name__} kept conflicting with "
              "concurrent writers; retry") from None
        time.sleep(0.01 * (attempt + 1))
      except self._pg.Error as e:
        raise CatalogError(
            f"catalog {self.path}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300]}; check that the server "
            "is up and reachable, then retry (the weights are untouched)"
        ) from None
  return wrapped


class PostgresCatalog(Catalog):
  """PostgreSQL catalog of one registry (see the module docstring)."""

  def __init__(self, url: str, schema: str, *, create: bool = True,
               connect_timeout_s: float = 10.0):
    """Args:
      url: libpq connection URL (postgresql://user:pw@host:port/db).
      schema: the PostgreSQL schema holding this registry's tables.
      create: create the schema and tables if missing; otherwise a missing
        registry is an error.
      connect_timeout_s: give up connecting after this long.
    """
    try:
      import psycopg  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise CatalogError(
          "a postgresql:// registry needs psycopg 3: pip install "
          "'mintjax[postgres]' (or 'psycopg[binary]')") from None
    self._pg = psycopg
    self._url = url
    self.schema = schema
    self.path = f"{redact(url)} schema {schema}"
    self._timeout = connect_timeout_s
    self._lock = threading.RLock()
    self._db = None
    try:
      self._connect()
      self._open(create)
    except BaseException as e:
      if self._db is not None:
        self._db.close()
      if not isinstance(e, psycopg.Error):
        raise
      raise CatalogError(
          f"cannot open catalog {self.path}: "
          f"{str(e).strip().splitlines()[0][:300]}; check the URL, that the "
          "server is up and that the user may connect") from None

  def _connect(self) -> None:
    # autocommit: a read is one statement; writes use explicit
    # transactions (`self._db.transaction()`).
    self._db = self._pg.connect(
        self._url, autocommit=True, connect_timeout=max(1, int(self._timeout)),
        options=f"-c search_path={self.schema}")

  def _reconnect_if_broken(self) -> None:
    """A new connection after the server or network dropped the old one
    (the next call works again once the server is back)."""
    if self._db is None or self._db.closed or self._db.broken:
      self._connect()

  def _open(self, create: bool) -> None:
    db = self._db
    with db.transaction():
      db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
      has_meta = db.execute(
          "SELECT 1 FROM information_schema.tables WHERE table_schema=%s "
          "AND table_name='meta'", (self.schema,)).fetchone()
      if has_meta:
        found = db.execute("SELECT value FROM meta WHERE key="
                           "'schema_version'").fetchone()
        found = found[0] if found else None
        if found != str(SCHEMA_VERSION):
          raise CatalogError(
              f"catalog {self.path} has schema version {found}; this mintjax "
              f"reads version {SCHEMA_VERSION}. Export its adapters with the "
              "mintjax that wrote it (`python -m tools.mint export-peft REF "
              "DIR`) and import them into a new registry")
        return
      if not create:
        raise RegistryError(
            f"{self.path} is not a mintjax registry (no tables in schema "
            f"{self.schema}); check the URL's schema=, or create one with "
            "Registry.open(url)")
      db.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
      for stmt in _SCHEMA.split(";"):
        if stmt.strip():
          db.execute(stmt)
      db.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT "
                 "DO NOTHING", (str(SCHEMA_VERSION),))

  def close(self) -> None:
    with self._lock:
      if self._db is not None:
        self._db.close()

  @_wrap
  def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """Raw read-only SQL (tests and tools; not part of `Catalog`). '?'
    placeholders are accepted, as in the SQLite catalog."""
    return self._db.execute(sql.replace("?", "%s"), tuple(args)).fetchall()

  def _q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    return self._db.execute(sql, tuple(args)).fetchall()

  @_wrap
  def counts(self) -> dict[str, int]:
    return {t: self._q(f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES}

  # --- adapters ------------------------------------------------------------

  @_wrap
  def adapter(self, adapter_id: str) -> dict | None:
    rows = self._q(
        "SELECT id, owner, spec, base_fingerprint, layout, array_key, created "
        "FROM adapters WHERE id=%s", (adapter_id,))
    if not rows:
      return None
    i, owner, spec, base, layout, key, created = rows[0]
    return dict(id=i, owner=owner, spec=json.loads(spec),
                base_fingerprint=base,
                layout=json.loads(layout) if layout else None,
                array_key=key, created=created, spec_json=spec,
                layout_json=layout)

  @_wrap
  def adapters(self) -> list[dict]:
    rows = self._q(
        "SELECT a.id, a.owner, a.base_fingerprint, a.created, a.spec, "
        "(SELECT COUNT(*) FROM revisions r WHERE r.adapter_id=a.id), "
        "(SELECT MAX(revision) FROM revisions r WHERE r.adapter_id=a.id) "
        "FROM adapters a ORDER BY a.id COLLATE \"C\"")
    tags: dict[str, dict] = {}
    for aid, tag, rev in self._q(
        "SELECT adapter_id, tag, revision FROM tags ORDER BY tag COLLATE "
        "\"C\""):
      tags.setdefault(aid, {})[tag] = rev
    return [dict(id=i, owner=o, base_fingerprint=b, created=c,
                 spec=json.loads(s), revisions=n, latest=latest,
                 tags=tags.get(i, {}))
            for i, o, b, c, s, n, latest in rows]

  @_wrap
  def existing_ids(self, ids: Sequence[str]) -> list[str]:
    return [r[0] for r in self._q(
        "SELECT id FROM adapters WHERE id = ANY(%s)", (list(ids),))]

  @_wrap
  def insert_adapters(self, rows: Sequence[tuple]) -> None:
    now = _now()
    try:
      with self._db.transaction():
        with self._db.cursor() as cur:
          cur.executemany(
              "INSERT INTO adapters VALUES (%s, %s, %s, %s, %s, %s, %s)",
              [(*r, now) for r in rows])
    except self._pg.errors.UniqueViolation:
      raise InvalidAdapterError(
          "an adapter with one of these ids was created concurrently; pick "
          "another id, or pass exist_ok=True with the same spec") from None

  # --- reservations and revisions -----------------------------------------

  @_wrap
  def reserve_shards(self, *, array_key: str, layout_json: str,
                     rows_per_shard: int, num_shards: int, lease_s: float,
                     set_layout_for: Sequence[str] = (),
                     prepare_array: Callable[[], None] | None = None
                     ) -> Reservation:
    db = self._db
    with db.transaction():
      for aid in sorted(set_layout_for):
        db.execute("UPDATE adapters SET layout=%s, array_key=%s WHERE id=%s "
                   "AND layout IS NULL", (layout_json, array_key, aid))
        (key,) = db.execute("SELECT array_key FROM adapters WHERE id=%s",
                            (aid,)).fetchone()
        if key != array_key:
          raise InvalidAdapterError(
              f"adapter {aid!r} got its shapes from a concurrent first "
              "publish with different shapes; these weights do not fit")
      # A new array's row is inserted (and so locked) by one creator; a
      # concurrent creator waits here until that transaction ends.
      db.execute("INSERT INTO arrays VALUES (%s, %s, %s, 0) ON CONFLICT "
                 "DO NOTHING", (array_key, layout_json, rows_per_shard))
      rps, end = db.execute(
          "UPDATE arrays SET next_shard = next_shard + %s WHERE key=%s "
          "RETURNING rows_per_shard, next_shard",
          (num_shards, array_key)).fetchone()
      if rps != rows_per_shard:
        raise RegistryError(
            f"array {array_key} holds {rps} rows per shard, this publish "
            f"expected {rows_per_shard}; the store and catalog disagree")
      if prepare_array is not None:
        prepare_array()  # Under the array's row lock: one creator at a time.
      now = _now()
      res = Reservation(uuid.uuid4().hex, array_key, end - num_shards,
                        num_shards, rows_per_shard, hostname(), os.getpid(),
                        now, now + lease_s)
      db.execute("INSERT INTO reservations VALUES (%s, %s, %s, %s, %s, %s, "
                 "%s, %s)", (res.token, array_key, res.first_shard,
                             num_shards, res.host, res.pid, now,
                             res.lease_expires))
    return res

  def _live(self, token: str) -> None:
    """Locks a live reservation for this transaction, or raises."""
    got = self._db.execute("SELECT lease_expires FROM reservations WHERE "
                           "token=%s FOR UPDATE", (token,)).fetchone()
    if got is None:
      raise LeaseExpiredError(
          "this publish's reservation was reclaimed by `gc` after its lease "
          "expired; nothing was published. Publish again (or open the "
          "registry with a longer lease_s)")
    if got[0] < _now():
      raise LeaseExpiredError(
          "this publish outlived its reservation's lease, so `gc` may "
          "reclaim its shards; nothing was published. Publish again (or "
          "open the registry with a longer lease_s)")

  @_wrap
  def renew_lease(self, token: str, lease_s: float) -> None:
    with self._db.transaction():
      self._live(token)
      self._db.execute("UPDATE reservations SET lease_expires=%s WHERE "
                       "token=%s", (_now() + lease_s, token))

  @_wrap
  def commit_revisions(self, token: str, items: Sequence[dict]
                       ) -> tuple[list[int], list, float]:
    db = self._db
    with db.transaction():
      self._live(token)  # Fencing: inside the committing transaction.
      ids = sorted({it["adapter_id"] for it in items})
      for aid in ids:  # Sorted: two commits never wait on each other.
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
                   ("rev:" + aid,))
      latest = dict.fromkeys(ids, 0)
      if ids:
        latest.update(db.execute(
            "SELECT adapter_id, MAX(revision) FROM revisions WHERE "
            "adapter_id = ANY(%s) GROUP BY adapter_id", (ids,)).fetchall())
      numbers, parents, rows = [], [], []
      now = _now()
      for it in items:
        aid = it["adapter_id"]
        parent = it["parent"]
        if parent == "latest":
          parent = latest[aid] or None
        elif parent is not None and not 1 <= parent <= latest[aid]:
          raise InvalidAdapterError(
              f"parent revision {aid}@{parent} does not exist (latest is "
              f"{latest[aid] or 'none'}); pass an existing revision or None")
        latest[aid] += 1
        numbers.append(latest[aid])
        parents.append(parent)
        rows.append((aid, latest[aid], parent, it["array_key"], it["row"],
                     it["sha256"], it["xxh3_64"], now, it["provenance_json"],
                     it["meta_json"]))
      with db.cursor() as cur:
        cur.executemany("INSERT INTO revisions VALUES (%s, %s, %s, %s, %s, "
                        "%s, %s, %s, %s, %s)", rows)
      db.execute("DELETE FROM reservations WHERE token=%s", (token,))
    return numbers, parents, now

  @_wrap
  def release(self, token: str) -> bool:
    return self._db.execute("DELETE FROM reservations WHERE token=%s",
                            (token,)).rowcount > 0

  _RES_COLS = ("r.token, r.array_key, r.first_shard, r.num_shards, "
               "a.rows_per_shard, r.host, r.pid, r.created, r.lease_expires")

  @_wrap
  def reservations(self) -> list[Reservation]:
    return [Reservation(*t) for t in self._q(
        f"SELECT {self._RES_COLS} FROM reservations r JOIN arrays a ON "
        "a.key=r.array_key ORDER BY r.created")]

  @_wrap
  def reclaim_expired(self, now: float) -> list[Reservation]:
    # One statement: each row is deleted (and returned) only if its lease
    # still looks expired once its lock is held, so a reservation being
    # committed is either gone first or left alone.
    rows = self._q(
        "WITH gone AS (DELETE FROM reservations WHERE lease_expires < %s "
        "RETURNING *) SELECT g.token, g.array_key, g.first_shard, "
        "g.num_shards, a.rows_per_shard, g.host, g.pid, g.created, "
        "g.lease_expires FROM gone g JOIN arrays a ON a.key=g.array_key",
        (now,))
    return [Reservation(*t) for t in rows]

  @_wrap
  def arrays(self) -> list[tuple[str, str, int]]:
    return self._q("SELECT key, layout, rows_per_shard FROM arrays ORDER BY "
                   "key")

  @_wrap
  def shard_usage(self, array_key: str) -> ShardUsage:
    db = self._db
    # One snapshot: a commit moving a shard from reserved to referenced is
    # seen entirely or not at all.
    with db.transaction():
      db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
      got = db.execute("SELECT rows_per_shard, next_shard FROM arrays WHERE "
                       "key=%s", (array_key,)).fetchone()
      if got is None:
        return ShardUsage(frozenset(), frozenset(), 0)
      rps, next_shard = got
      referenced = frozenset(s for (s,) in db.execute(
          'SELECT DISTINCT "row" / %s FROM revisions WHERE array_key=%s',
          (rps, array_key)))
      reserved = set()
      for first, n in db.execute(
          "SELECT first_shard, num_shards FROM reservations WHERE "
          "array_key=%s", (array_key,)):
        reserved.update(range(first, first + n))
    return ShardUsage(referenced, frozenset(reserved), next_shard)

  _REV_COLS = ("r.adapter_id, r.revision, r.parent, a.base_fingerprint, "
               'r.sha256, r.provenance, r.created, r.array_key, r."row", '
               "r.meta, r.xxh3_64")

  @_wrap
  def revision(self, adapter_id: str, revision: int | None
               ) -> Revision | None:
    base = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
            "a.id=r.adapter_id WHERE r.adapter_id=%s ")
    if revision is None:
      rows = self._q(base + "ORDER BY r.revision DESC LIMIT 1",
                     (adapter_id,))
    else:
      rows = self._q(base + "AND r.revision=%s", (adapter_id, revision))
    return Revision(*rows[0]) if rows else None

  @_wrap
  def resolve_many(self, parsed: Sequence[tuple[str, int | None, str | None]]
                   ) -> list[tuple[Revision, str, str] | None]:
    out: list = [None] * len(parsed)
    if not parsed:
      return out
    # One statement for any number of refs: the requests travel as arrays.
    rows = self._q(
        "SELECT req.i, " + self._REV_COLS + ", a.spec, a.layout FROM "
        "unnest(%s::int[], %s::text[], %s::int[], %s::text[]) AS "
        "req(i, aid, rev, tag) JOIN revisions r ON r.adapter_id = req.aid "
        "AND r.revision = COALESCE(req.rev, (SELECT t.revision FROM tags t "
        "WHERE t.adapter_id = req.aid AND t.tag = req.tag), CASE WHEN "
        "req.tag IS NULL OR req.tag = 'latest' THEN (SELECT MAX(m.revision) "
        "FROM revisions m WHERE m.adapter_id = req.aid) END) "
        "JOIN adapters a ON a.id = r.adapter_id",
        (list(range(len(parsed))), [p[0] for p in parsed],
         [p[1] for p in parsed], [p[2] for p in parsed]))
    for row in rows:
      out[row[0]] = (Revision(*row[1:12]), row[12], row[13])
    return out

  @_wrap
  def revisions(self, adapter_id: str | None = None) -> list[Revision]:
    sql = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
           "a.id=r.adapter_id")
    if adapter_id is None:
      return [Revision(*t) for t in self._q(
          sql + ' ORDER BY r.adapter_id COLLATE "C", r.revision')]
    return [Revision(*t) for t in self._q(
        sql + " WHERE r.adapter_id=%s ORDER BY r.revision", (adapter_id,))]

  # --- tags, evals, residency ----------------------------------------------

  @_wrap
  def tag_revision(self, adapter_id: str, tag: str) -> int | None:
    rows = self._q("SELECT revision FROM tags WHERE adapter_id=%s AND tag=%s",
                   (adapter_id, tag))
    return rows[0][0] if rows else None

  @_wrap
  def tags(self, adapter_id: str) -> dict[str, int]:
    return dict(self._q(
        "SELECT tag, revision FROM tags WHERE adapter_id=%s ORDER BY tag "
        'COLLATE "C"', (adapter_id,)))

  @_wrap
  def set_tag(self, adapter_id: str, tag: str, revision: int, reason: str,
              expect_current: int | None = None) -> int | None:
    db = self._db
    with db.transaction():
      # Serialises moves of one tag, including its first (no row to lock).
      db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 2))",
                 (f"tag:{adapter_id}:{tag}",))
      old = db.execute("SELECT revision FROM tags WHERE adapter_id=%s AND "
                       "tag=%s", (adapter_id, tag)).fetchone()
      old = old[0] if old else None
      if expect_current is not None and old != expect_current:
        raise RegistryError(
            f"{adapter_id}:{tag} moved to {old} while this call expected "
            f"{expect_current}; look at `mint log {adapter_id}` and retry")
      now = _now()
      db.execute("INSERT INTO tags VALUES (%s, %s, %s, %s) ON CONFLICT "
                 "(adapter_id, tag) DO UPDATE SET revision=EXCLUDED.revision,"
                 " updated=EXCLUDED.updated",
                 (adapter_id, tag, revision, now))
      db.execute("INSERT INTO tag_events (adapter_id, tag, old_revision, "
                 "new_revision, reason, created) VALUES (%s, %s, %s, %s, %s, "
                 "%s)", (adapter_id, tag, old, revision, reason, now))
    return old

  @_wrap
  def tag_events(self, adapter_id: str, tag: str | None = None) -> list[dict]:
    sql = ("SELECT tag, old_revision, new_revision, reason, created FROM "
           "tag_events WHERE adapter_id=%s")
    args: tuple = (adapter_id,)
    if tag is not None:
      sql, args = sql + " AND tag=%s", (adapter_id, tag)
    return [dict(tag=t, old=o, new=n, reason=r, created=c)
            for t, o, n, r, c in self._q(sql + " ORDER BY id", args)]

  @_wrap
  def insert_eval(self, adapter_id: str, revision: int, metric: str,
                  value: float, data_fingerprint: str) -> None:
    self._db.execute(
        "INSERT INTO evals (adapter_id, revision, metric, value, "
        "data_fingerprint, created) VALUES (%s, %s, %s, %s, %s, %s)",
        (adapter_id, revision, metric, value, data_fingerprint, _now()))

  @_wrap
  def evals(self, adapter_id: str, revision: int | None = None) -> list[dict]:
    sql = ("SELECT revision, metric, value, data_fingerprint, created FROM "
           "evals WHERE adapter_id=%s")
    args: tuple = (adapter_id,)
    if revision is not None:
      sql, args = sql + " AND revision=%s", (adapter_id, revision)
    return [dict(revision=r, metric=m, value=v, data_fingerprint=d, created=c)
            for r, m, v, d, c in self._q(sql + " ORDER BY id", args)]

  @_wrap
  def add_residency(self, adapter_id: str, revision: int, served: int,
                    loads: int) -> None:
    now = _now()
    # One atomic upsert: concurrent replicas' counts all land.
    self._db.execute(
        "INSERT INTO residency VALUES (%(a)s, %(r)s, %(s)s, CASE WHEN "
        "%(s)s > 0 THEN %(now)s END, %(l)s, CASE WHEN %(l)s > 0 THEN "
        "%(now)s END) ON CONFLICT (adapter_id, revision) DO UPDATE SET "
        "served_count = residency.served_count + %(s)s, load_count = "
        "residency.load_count + %(l)s, last_served = CASE WHEN %(s)s > 0 "
        "THEN %(now)s ELSE residency.last_served END, last_loaded = CASE "
        "WHEN %(l)s > 0 THEN %(now)s ELSE residency.last_loaded END",
        dict(a=adapter_id, r=revision, s=served, l=loads, now=now))

  @_wrap
  def residency(self, adapter_id: str) -> list[dict]:
    return [dict(revision=r, served_count=s, last_served=ls, load_count=lc,
                 last_loaded=ll)
            for r, s, ls, lc, ll in self._q(
                "SELECT revision, served_count, last_served, load_count, "
                "last_loaded FROM residency WHERE adapter_id=%s ORDER BY "
                "revision", (adapter_id,))]
