"""The SQLite implementation of the catalog (`mintjax.store.catalog`).

Owns the schema and all SQL of an embedded registry: adapters, immutable
revisions (number, parent, storage row, sha256, xxh3-64, provenance),
evaluations, tags and their move history, residency counters, arrays with
their never-decreasing shard counter, and leased shard reservations.

Concurrency: every write runs in `BEGIN IMMEDIATE` (one writer at a time
across processes; others wait up to `busy_timeout`) in WAL mode, so readers
never block and never see half a transaction. `sqlite3` errors are turned
into `CatalogError` with the database path and a fix.

Schema version 3 (write-once shards, per-row xxh3-64). Older catalogs
(1: rewritable shards, reused rows; 2: per-row crc32c) are refused with an
error saying how to move their adapters over; they are never modified.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

from mintjax.store.catalog import Catalog, Reservation, ShardUsage
from mintjax.store.errors import (CatalogError, InvalidAdapterError,
                                  LeaseExpiredError, RegistryError)
from mintjax.store.identity import hostname
from mintjax.store.revision import Revision

SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL,
  base_fingerprint TEXT NOT NULL, layout TEXT, array_key TEXT,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
  adapter_id TEXT NOT NULL REFERENCES adapters(id), revision INTEGER NOT NULL,
  parent INTEGER, array_key TEXT NOT NULL, row INTEGER NOT NULL,
  sha256 TEXT NOT NULL, xxh3_64 INTEGER NOT NULL, created REAL NOT NULL,
  provenance TEXT NOT NULL, meta TEXT NOT NULL,
  PRIMARY KEY (adapter_id, revision));
CREATE UNIQUE INDEX IF NOT EXISTS revisions_row ON revisions(array_key, row);
CREATE TABLE IF NOT EXISTS evals (
  id INTEGER PRIMARY KEY, adapter_id TEXT NOT NULL, revision INTEGER NOT NULL,
  metric TEXT NOT NULL, value REAL NOT NULL, data_fingerprint TEXT NOT NULL,
  created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS evals_rev ON evals(adapter_id, revision);
CREATE TABLE IF NOT EXISTS tags (
  adapter_id TEXT NOT NULL, tag TEXT NOT NULL, revision INTEGER NOT NULL,
  updated REAL NOT NULL, PRIMARY KEY (adapter_id, tag));
CREATE TABLE IF NOT EXISTS tag_events (
  id INTEGER PRIMARY KEY, adapter_id TEXT NOT NULL, tag TEXT NOT NULL,
  old_revision INTEGER, new_revision INTEGER NOT NULL, reason TEXT NOT NULL,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS residency (
  adapter_id TEXT NOT NULL, revision INTEGER NOT NULL,
  served_count INTEGER NOT NULL DEFAULT 0, last_served REAL,
  load_count INTEGER NOT NULL DEFAULT 0, last_loaded REAL,
  PRIMARY KEY (adapter_id, revision));
CREATE TABLE IF NOT EXISTS arrays (
  key TEXT PRIMARY KEY, layout TEXT NOT NULL,
  rows_per_shard INTEGER NOT NULL, next_shard INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
  token TEXT PRIMARY KEY, array_key TEXT NOT NULL,
  first_shard INTEGER NOT NULL, num_shards INTEGER NOT NULL,
  host TEXT NOT NULL, pid INTEGER NOT NULL, created REAL NOT NULL,
  lease_expires REAL NOT NULL);
"""
TABLES = ("adapters", "revisions", "evals", "tags", "tag_events",
          "residency", "arrays", "reservations")


def _now() -> float:
  return time.time()


def _wrap(method):
  """Turns sqlite3 errors escaping `method` into CatalogError."""

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except sqlite3.Error as e:
      raise CatalogError(
          f"catalog {self.path}: {type(e).__name__}: {e}; if it is busy, "
          "retry; if it is damaged, restore it from a backup (the weights "
          "are untouched)") from None
  return wrapped


class SqliteCatalog(Catalog):
  """SQLite catalog of one registry (see the module docstring)."""

  def __init__(self, path: str, busy_timeout_s: float = 60.0):
    self.path = path
    self._db = None
    try:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
      self._db = sqlite3.connect(path, timeout=busy_timeout_s,
                                 isolation_level=None,
                                 check_same_thread=False)
      self._open(busy_timeout_s)
    except sqlite3.Error as e:
      if self._db is not None:
        self._db.close()
      if "locked" in str(e) or "busy" in str(e):
        raise CatalogError(
            f"catalog {path} stayed locked by another process for "
            f"{busy_timeout_s:g} s ({e}); retry when it is done") from None
      raise CatalogError(
          f"{path} is not a readable mintjax catalog ({type(e).__name__}: "
          f"{e}); point the registry at its own directory, or restore the "
          "file from a backup") from None
    except OSError as e:
      raise CatalogError(f"cannot open catalog {path}: {e}") from None

  def _open(self, busy_timeout_s: float) -> None:
    db = self._db
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    # Read the version before writing anything: an old catalog is refused
    # unchanged.
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' "
                          "AND name='meta'").fetchone()
    found = None
    if has_meta:
      found = db.execute("SELECT value FROM meta WHERE key='schema_version'"
                         ).fetchone()
      found = found[0] if found else None
      if found != str(SCHEMA_VERSION):
        db.close()
        raise CatalogError(
            f"catalog {self.path} has schema version {found}; this mintjax "
            f"reads version {SCHEMA_VERSION} (write-once shards, xxh3-64 row "
            "checksums). Export its "
            "adapters with the mintjax that wrote it (`python -m tools.mint "
            "export-peft REF DIR`) and import them into a new registry")
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a killed process (only power loss can
    # drop the newest transactions, never corrupt older ones).
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    # Random lookups over millions of rows: read pages through mmap and keep
    # a larger page cache, so a resolve costs microseconds, not syscalls.
    db.execute("PRAGMA mmap_size=4294967296")
    db.execute("PRAGMA cache_size=-131072")
    if found == str(SCHEMA_VERSION):
      return  # Schema in place: opening writes nothing (and never waits).
    with self._write() as db:
      for stmt in _SCHEMA.split(";"):
        if stmt.strip():
          db.execute(stmt)
      db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))

  def close(self) -> None:
    self._db.close()

  @contextlib.contextmanager
  def _write(self) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE): all or nothing."""
    self._db.execute("BEGIN IMMEDIATE")
    try:
      yield self._db
    except BaseException:
      self._db.execute("ROLLBACK")
      raise
    self._db.execute("COMMIT")

  @_wrap
  def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """Raw read-only SQL (tests and tools; not part of `Catalog`)."""
    return self._db.execute(sql, args).fetchall()

  @_wrap
  def counts(self) -> dict[str, int]:
    return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in TABLES}

  # --- adapters ------------------------------------------------------------

  @_wrap
  def adapter(self, adapter_id: str) -> dict | None:
    rows = self.query(
        "SELECT id, owner, spec, base_fingerprint, layout, array_key, created "
        "FROM adapters WHERE id=?", (adapter_id,))
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
    rows = self.query(
        "SELECT a.id, a.owner, a.base_fingerprint, a.created, a.spec, "
        "(SELECT COUNT(*) FROM revisions r WHERE r.adapter_id=a.id), "
        "(SELECT MAX(revision) FROM revisions r WHERE r.adapter_id=a.id) "
        "FROM adapters a ORDER BY a.id")
    tags: dict[str, dict] = {}
    for aid, tag, rev in self.query(
        "SELECT adapter_id, tag, revision FROM tags ORDER BY tag"):
      tags.setdefault(aid, {})[tag] = rev
    return [dict(id=i, owner=o, base_fingerprint=b, created=c,
                 spec=json.loads(s), revisions=n, latest=latest,
                 tags=tags.get(i, {}))
            for i, o, b, c, s, n, latest in rows]

  @_wrap
  def existing_ids(self, ids: Sequence[str]) -> list[str]:
    out = []
    for i in range(0, len(ids), 500):
      chunk = list(ids[i:i + 500])
      out += [r[0] for r in self.query(
          f"SELECT id FROM adapters WHERE id IN ({','.join('?' * len(chunk))})",
          chunk)]
    return out

  @_wrap
  def insert_adapters(self, rows: Sequence[tuple]) -> None:
    now = _now()
    try:
      with self._write() as db:
        db.executemany("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(*r, now) for r in rows])
    except sqlite3.IntegrityError:
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
    with self._write() as db:
      for aid in set_layout_for:
        db.execute("UPDATE adapters SET layout=?, array_key=? WHERE id=? "
                   "AND layout IS NULL", (layout_json, array_key, aid))
        (key,) = db.execute("SELECT array_key FROM adapters WHERE id=?",
                            (aid,)).fetchone()
        if key != array_key:
          raise InvalidAdapterError(
              f"adapter {aid!r} got its shapes from a concurrent first "
              "publish with different shapes; these weights do not fit")
      got = db.execute("SELECT rows_per_shard, next_shard FROM arrays WHERE "
                       "key=?", (array_key,)).fetchone()
      if got is None:
        got = (rows_per_shard, 0)
        db.execute("INSERT INTO arrays VALUES (?, ?, ?, 0)",
                   (array_key, layout_json, rows_per_shard))
      if got[0] != rows_per_shard:
        raise RegistryError(
            f"array {array_key} holds {got[0]} rows per shard, this publish "
            f"expected {rows_per_shard}; the store and catalog disagree")
      first = got[1]
      db.execute("UPDATE arrays SET next_shard=? WHERE key=?",
                 (first + num_shards, array_key))
      if prepare_array is not None:
        prepare_array()  # Under the write lock: one creator at a time.
      now = _now()
      res = Reservation(uuid.uuid4().hex, array_key, first, num_shards,
                        rows_per_shard, hostname(), os.getpid(), now,
                        now + lease_s)
      db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (res.token, array_key, first, num_shards, res.host, res.pid,
                  now, res.lease_expires))
    return res

  def _live(self, db, token: str) -> None:
    got = db.execute("SELECT lease_expires FROM reservations WHERE token=?",
                     (token,)).fetchone()
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
    with self._write() as db:
      self._live(db, token)
      db.execute("UPDATE reservations SET lease_expires=? WHERE token=?",
                 (_now() + lease_s, token))

  @_wrap
  def commit_revisions(self, token: str, items: Sequence[dict]
                       ) -> tuple[list[int], list, float]:
    with self._write() as db:
      self._live(db, token)  # Fencing: inside the committing transaction.
      latest: dict[str, int] = {}
      numbers, parents = [], []
      now = _now()
      for it in items:
        aid = it["adapter_id"]
        if aid not in latest:
          (cur,) = db.execute(
              "SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE "
              "adapter_id=?", (aid,)).fetchone()
          latest[aid] = cur
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
        db.execute(
            "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (aid, latest[aid], parent, it["array_key"], it["row"],
             it["sha256"], it["xxh3_64"], now, it["provenance_json"],
             it["meta_json"]))
      db.execute("DELETE FROM reservations WHERE token=?", (token,))
    return numbers, parents, now

  @_wrap
  def release(self, token: str) -> bool:
    with self._write() as db:
      return db.execute("DELETE FROM reservations WHERE token=?",
                        (token,)).rowcount > 0

  _RES_COLS = ("r.token, r.array_key, r.first_shard, r.num_shards, "
               "a.rows_per_shard, r.host, r.pid, r.created, r.lease_expires")

  @_wrap
  def reservations(self) -> list[Reservation]:
    return [Reservation(*t) for t in self.query(
        f"SELECT {self._RES_COLS} FROM reservations r JOIN arrays a ON "
        "a.key=r.array_key ORDER BY r.created")]

  @_wrap
  def reclaim_expired(self, now: float) -> list[Reservation]:
    with self._write() as db:
      out = [Reservation(*t) for t in db.execute(
          f"SELECT {self._RES_COLS} FROM reservations r JOIN arrays a ON "
          "a.key=r.array_key WHERE r.lease_expires < ?", (now,)).fetchall()]
      db.executemany("DELETE FROM reservations WHERE token=?",
                     [(r.token,) for r in out])
    return out

  @_wrap
  def arrays(self) -> list[tuple[str, str, int]]:
    return self.query("SELECT key, layout, rows_per_shard FROM arrays "
                      "ORDER BY key")

  @_wrap
  def shard_usage(self, array_key: str) -> ShardUsage:
    # One read transaction: a WAL snapshot, so a commit moving a shard from
    # reserved to referenced is seen entirely or not at all.
    self._db.execute("BEGIN")
    try:
      got = self._db.execute("SELECT rows_per_shard, next_shard FROM arrays "
                             "WHERE key=?", (array_key,)).fetchone()
      if got is None:
        return ShardUsage(frozenset(), frozenset(), 0)
      rps, next_shard = got
      referenced = frozenset(s for (s,) in self._db.execute(
          "SELECT DISTINCT row / ? FROM revisions WHERE array_key=?",
          (rps, array_key)))
      reserved = set()
      for first, n in self._db.execute(
          "SELECT first_shard, num_shards FROM reservations WHERE "
          "array_key=?", (array_key,)):
        reserved.update(range(first, first + n))
    finally:
      self._db.execute("COMMIT")
    return ShardUsage(referenced, frozenset(reserved), next_shard)

  _REV_COLS = ("r.adapter_id, r.revision, r.parent, a.base_fingerprint, "
               "r.sha256, r.provenance, r.created, r.array_key, r.row, "
               "r.meta, r.xxh3_64")

  @staticmethod
  def _revision(t: tuple) -> Revision:
    return Revision(*t)

  @_wrap
  def revision(self, adapter_id: str, revision: int | None
               ) -> Revision | None:
    base = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
            "a.id=r.adapter_id WHERE r.adapter_id=? ")
    if revision is None:
      rows = self.query(base + "ORDER BY r.revision DESC LIMIT 1",
                        (adapter_id,))
    else:
      rows = self.query(base + "AND r.revision=?", (adapter_id, revision))
    return self._revision(rows[0]) if rows else None

  @_wrap
  def resolve_many(self, parsed: Sequence[tuple[str, int | None, str | None]]
                   ) -> list[tuple[Revision, str, str] | None]:
    out: list = [None] * len(parsed)
    # SQLite limits bound variables; 4 per request.
    for start in range(0, len(parsed), 200):
      chunk = parsed[start:start + 200]
      values = ",".join("(?, ?, ?, ?)" for _ in chunk)
      args = [x for i, (aid, rev, tag) in enumerate(chunk)
              for x in (start + i, aid, rev, tag)]
      rows = self._db.execute(
          f"WITH req(i, aid, rev, tag) AS (VALUES {values}) "
          f"SELECT req.i, {self._REV_COLS}, a.spec, a.layout FROM req "
          "JOIN revisions r ON r.adapter_id = req.aid AND r.revision = "
          "COALESCE(req.rev, (SELECT t.revision FROM tags t WHERE "
          "t.adapter_id = req.aid AND t.tag = req.tag), CASE WHEN req.tag "
          "IS NULL OR req.tag = 'latest' THEN (SELECT MAX(m.revision) FROM "
          "revisions m WHERE m.adapter_id = req.aid) END) "
          "JOIN adapters a ON a.id = r.adapter_id", args).fetchall()
      for row in rows:
        out[row[0]] = (self._revision(row[1:12]), row[12], row[13])
    return out

  @_wrap
  def revisions(self, adapter_id: str | None = None) -> list[Revision]:
    sql = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
           "a.id=r.adapter_id")
    if adapter_id is None:
      return [self._revision(t) for t in self.query(
          sql + " ORDER BY r.adapter_id, r.revision")]
    return [self._revision(t) for t in self.query(
        sql + " WHERE r.adapter_id=? ORDER BY r.revision", (adapter_id,))]

  # --- tags, evals, residency ----------------------------------------------

  @_wrap
  def tag_revision(self, adapter_id: str, tag: str) -> int | None:
    rows = self.query("SELECT revision FROM tags WHERE adapter_id=? AND tag=?",
                      (adapter_id, tag))
    return rows[0][0] if rows else None

  @_wrap
  def tags(self, adapter_id: str) -> dict[str, int]:
    return dict(self.query(
        "SELECT tag, revision FROM tags WHERE adapter_id=? ORDER BY tag",
        (adapter_id,)))

  @_wrap
  def set_tag(self, adapter_id: str, tag: str, revision: int, reason: str,
              expect_current: int | None = None) -> int | None:
    with self._write() as db:
      old = db.execute("SELECT revision FROM tags WHERE adapter_id=? AND "
                       "tag=?", (adapter_id, tag)).fetchone()
      old = old[0] if old else None
      if expect_current is not None and old != expect_current:
        raise RegistryError(
            f"{adapter_id}:{tag} moved to {old} while this call expected "
            f"{expect_current}; look at `mint log {adapter_id}` and retry")
      now = _now()
      db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)",
                 (adapter_id, tag, revision, now))
      db.execute("INSERT INTO tag_events (adapter_id, tag, old_revision, "
                 "new_revision, reason, created) VALUES (?, ?, ?, ?, ?, ?)",
                 (adapter_id, tag, old, revision, reason, now))
    return old

  @_wrap
  def tag_events(self, adapter_id: str, tag: str | None = None) -> list[dict]:
    sql = ("SELECT tag, old_revision, new_revision, reason, created FROM "
           "tag_events WHERE adapter_id=?")
    args: tuple = (adapter_id,)
    if tag is not None:
      sql, args = sql + " AND tag=?", (adapter_id, tag)
    return [dict(tag=t, old=o, new=n, reason=r, created=c)
            for t, o, n, r, c in self.query(sql + " ORDER BY id", args)]

  @_wrap
  def insert_eval(self, adapter_id: str, revision: int, metric: str,
                  value: float, data_fingerprint: str) -> None:
    with self._write() as db:
      db.execute("INSERT INTO evals (adapter_id, revision, metric, value, "
                 "data_fingerprint, created) VALUES (?, ?, ?, ?, ?, ?)",
                 (adapter_id, revision, metric, value, data_fingerprint,
                  _now()))

  @_wrap
  def evals(self, adapter_id: str, revision: int | None = None) -> list[dict]:
    sql = ("SELECT revision, metric, value, data_fingerprint, created FROM "
           "evals WHERE adapter_id=?")
    args: tuple = (adapter_id,)
    if revision is not None:
      sql, args = sql + " AND revision=?", (adapter_id, revision)
    return [dict(revision=r, metric=m, value=v, data_fingerprint=d, created=c)
            for r, m, v, d, c in self.query(sql + " ORDER BY id", args)]

  @_wrap
  def add_residency(self, adapter_id: str, revision: int, served: int,
                    loads: int) -> None:
    now = _now()
    with self._write() as db:
      db.execute(
          "INSERT INTO residency (adapter_id, revision) VALUES (?, ?) "
          "ON CONFLICT DO NOTHING", (adapter_id, revision))
      db.execute(
          "UPDATE residency SET served_count=served_count+?, load_count="
          "load_count+?, last_served=CASE WHEN ?>0 THEN ? ELSE last_served "
          "END, last_loaded=CASE WHEN ?>0 THEN ? ELSE last_loaded END "
          "WHERE adapter_id=? AND revision=?",
          (served, loads, served, now, loads, now, adapter_id, revision))

  @_wrap
  def residency(self, adapter_id: str) -> list[dict]:
    return [dict(revision=r, served_count=s, last_served=ls, load_count=lc,
                 last_loaded=ll)
            for r, s, ls, lc, ll in self.query(
                "SELECT revision, served_count, last_served, load_count, "
                "last_loaded FROM residency WHERE adapter_id=? ORDER BY "
                "revision", (adapter_id,))]
