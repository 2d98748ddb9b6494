"""The catalog: every adapter's metadata in one SQLite database (WAL mode).

Owns the schema and all SQL: adapters (identity, owner, spec, base
fingerprint, row layout), immutable revisions (number, parent, storage row,
sha256, provenance), evaluations, tags and their move history, residency
stats, and the row allocator of the weights store (pending and free rows).
It knows nothing about tensors; `mintjax.store.registry` ties it to
`mintjax.store.weights`.

Concurrency: every write runs in `BEGIN IMMEDIATE` (one writer at a time
across processes, others wait up to `busy_timeout`), so revision numbers are
assigned as max + 1 inside the transaction that inserts them: unique and
gap-free per adapter however many processes publish.

Crash safety: a row is first recorded as *pending* (its own short
transaction), then written, read back and hashed, and only then does one
transaction insert the revision and drop the pending record. A crash leaves
at worst a pending record, which `reclaim_pending` turns into free rows that
the allocator reuses; no revision ever references an unverified row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sqlite3
import time
from typing import Any, Iterator, Sequence

from mintjax.store.errors import RegistryError
from mintjax.store.identity import hostname

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL,
  base_fingerprint TEXT NOT NULL, layout TEXT, array_key TEXT,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
  adapter_id TEXT NOT NULL REFERENCES adapters(id), revision INTEGER NOT NULL,
  parent INTEGER, array_key TEXT NOT NULL, row INTEGER NOT NULL,
  sha256 TEXT NOT NULL, created REAL NOT NULL, provenance TEXT NOT NULL,
  meta TEXT NOT NULL, PRIMARY KEY (adapter_id, revision));
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
  key TEXT PRIMARY KEY, layout TEXT NOT NULL, next_row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
  id INTEGER PRIMARY KEY, array_key TEXT NOT NULL, start INTEGER NOT NULL,
  stop INTEGER NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
  since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS free_rows (
  array_key TEXT NOT NULL, row INTEGER NOT NULL,
  PRIMARY KEY (array_key, row));
"""


@dataclasses.dataclass(frozen=True)
class Revision:
  """One immutable published revision of an adapter.

  Attributes:
    adapter_id: the adapter's stable id.
    revision: 1, 2, 3, ... per adapter.
    parent: revision it was derived from, or None.
    base_fingerprint: base model the adapter was trained on.
    sha256: 'sha256:<hex>' of the stored row bytes.
    provenance: (property) base/data fingerprints, training config, code
      version, steps, seed, host (and any extra keys the publisher gave);
      stored as `provenance_json`.
    created: unix time of publication.
    array_key: weights-store array holding the row.
    row: row index in that array.
    meta: (property) storage details, e.g. PEFT per-module ranks/alphas;
      stored as `meta_json`.
  """

  adapter_id: str
  revision: int
  parent: int | None
  base_fingerprint: str
  sha256: str
  provenance_json: str = dataclasses.field(repr=False)
  created: float = 0.0
  array_key: str = ""
  row: int = -1
  meta_json: str = dataclasses.field(default="{}", repr=False)

  @property
  def ref(self) -> str:
    return f"{self.adapter_id}@{self.revision}"

  # Decoded on first use: loading many adapters rarely needs provenance.
  @functools.cached_property
  def provenance(self) -> dict:
    return json.loads(self.provenance_json)

  @functools.cached_property
  def meta(self) -> dict:
    return {} if self.meta_json == "{}" else json.loads(self.meta_json)


def _now() -> float:
  return time.time()


class Catalog:
  """SQLite catalog of one registry (see the module docstring)."""

  def __init__(self, path: str, busy_timeout_s: float = 60.0):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    self._db = sqlite3.connect(path, timeout=busy_timeout_s,
                               isolation_level=None, check_same_thread=False)
    self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    self._db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a killed process (only power loss can
    # drop the newest transactions, never corrupt older ones).
    self._db.execute("PRAGMA synchronous=NORMAL")
    self._db.execute("PRAGMA foreign_keys=ON")
    # Random lookups over millions of rows: read pages through mmap and keep
    # a larger page cache, so a resolve costs microseconds, not syscalls.
    self._db.execute("PRAGMA mmap_size=4294967296")
    self._db.execute("PRAGMA cache_size=-131072")
    with self.write() as db:
      for stmt in _SCHEMA.split(";"):
        if stmt.strip():
          db.execute(stmt)
      db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))
    found = self.meta("schema_version")
    if found != str(SCHEMA_VERSION):
      raise RegistryError(
          f"catalog {path} has schema version {found}, this mintjax reads "
          f"version {SCHEMA_VERSION}; open it with a matching mintjax")

  def close(self) -> None:
    self._db.close()

  @contextlib.contextmanager
  def write(self) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE): all or nothing."""
    self._db.execute("BEGIN IMMEDIATE")
    try:
      yield self._db
    except BaseException:
      self._db.execute("ROLLBACK")
      raise
    self._db.execute("COMMIT")

  def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    return self._db.execute(sql, args).fetchall()

  def meta(self, key: str) -> str | None:
    rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
    return rows[0][0] if rows else None

  # --- adapters ------------------------------------------------------------

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

  def adapters(self) -> list[dict]:
    """Every adapter with its revision count, latest revision and tags."""
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

  def insert_adapter(self, db, adapter_id: str, owner: str, spec: dict,
                     base_fingerprint: str, layout: dict | None,
                     array_key: str | None) -> None:
    db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
               (adapter_id, owner, json.dumps(spec, sort_keys=True),
                base_fingerprint,
                json.dumps(layout, sort_keys=True) if layout else None,
                array_key, _now()))

  def insert_adapters(self, db, rows: Sequence[tuple]) -> None:
    """Bulk insert: rows of (id, owner, spec_json, base, layout_json, key)."""
    now = _now()
    db.executemany("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(*r, now) for r in rows])

  def existing_ids(self, ids: Sequence[str]) -> list[str]:
    out = []
    for i in range(0, len(ids), 500):
      chunk = list(ids[i:i + 500])
      out += [r[0] for r in self.query(
          f"SELECT id FROM adapters WHERE id IN ({','.join('?' * len(chunk))})",
          chunk)]
    return out

  def set_layout(self, db, adapter_id: str, layout: dict, array_key: str
                 ) -> None:
    db.execute("UPDATE adapters SET layout=?, array_key=? WHERE id=? AND "
               "layout IS NULL",
               (json.dumps(layout, sort_keys=True), array_key, adapter_id))

  # --- row allocation ------------------------------------------------------

  def allocate_rows(self, db, array_key: str, layout: dict, n: int
                    ) -> tuple[list[int], list[int], int]:
    """Reserves n rows as pending (inside the caller's write transaction).

    Returns:
      (rows, pending ids, rows the array must hold afterwards).
    """
    if not db.execute("SELECT 1 FROM arrays WHERE key=?",
                      (array_key,)).fetchone():
      db.execute("INSERT INTO arrays VALUES (?, ?, 0)",
                 (array_key, json.dumps(layout, sort_keys=True)))
    free = [r for (r,) in db.execute(
        "SELECT row FROM free_rows WHERE array_key=? ORDER BY row LIMIT ?",
        (array_key, n))]
    if free:
      db.executemany("DELETE FROM free_rows WHERE array_key=? AND row=?",
                     [(array_key, r) for r in free])
    (next_row,) = db.execute("SELECT next_row FROM arrays WHERE key=?",
                             (array_key,)).fetchone()
    fresh = n - len(free)
    db.execute("UPDATE arrays SET next_row=? WHERE key=?",
               (next_row + fresh, array_key))
    host, pid, now = hostname(), os.getpid(), _now()
    ranges = [(r, r + 1) for r in free]
    if fresh:
      ranges.append((next_row, next_row + fresh))
    ids = []
    for start, stop in ranges:
      cur = db.execute(
          "INSERT INTO pending (array_key, start, stop, host, pid, since) "
          "VALUES (?, ?, ?, ?, ?, ?)", (array_key, start, stop, host, pid, now))
      ids.append(cur.lastrowid)
    rows = free + list(range(next_row, next_row + fresh))
    return rows, ids, next_row + fresh

  def release_pending(self, db, pending_ids: Sequence[int]) -> None:
    """Returns pending rows to the free list (a publish that failed)."""
    for pid in pending_ids:
      got = db.execute("SELECT array_key, start, stop FROM pending WHERE id=?",
                       (pid,)).fetchone()
      if got:
        key, start, stop = got
        db.executemany("INSERT OR IGNORE INTO free_rows VALUES (?, ?)",
                       [(key, r) for r in range(start, stop)])
        db.execute("DELETE FROM pending WHERE id=?", (pid,))

  def pending(self) -> list[dict]:
    return [dict(id=i, array_key=k, start=s, stop=e, host=h, pid=p, since=t)
            for i, k, s, e, h, p, t in self.query(
                "SELECT id, array_key, start, stop, host, pid, since "
                "FROM pending ORDER BY id")]

  # --- revisions -----------------------------------------------------------

  def insert_revisions(self, db, items: Sequence[dict],
                       pending_ids: Sequence[int]
                       ) -> tuple[list[int], list, float]:
    """Inserts revisions (numbered max + 1 per adapter) and drops pending.

    Each item has adapter_id, parent ('latest' for the current latest),
    array_key, row, sha256, provenance_json, meta_json. Runs inside the caller's write
    transaction; raises if the pending rows were reclaimed meanwhile.

    Returns:
      (revision numbers, parents, commit time).
    """
    for pid in pending_ids:
      if not db.execute("SELECT 1 FROM pending WHERE id=?",
                        (pid,)).fetchone():
        raise RegistryError(
            "this publish's reserved rows were reclaimed by `gc` before it "
            "committed (it ran longer than gc's stale_after); publish again")
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
        raise RegistryError(
            f"parent revision {aid}@{parent} does not exist (latest is "
            f"{latest[aid] or 'none'}); pass an existing revision or None")
      latest[aid] += 1
      numbers.append(latest[aid])
      parents.append(parent)
      db.execute(
          "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
          (aid, latest[aid], parent, it["array_key"], it["row"],
           it["sha256"], now, it["provenance_json"], it["meta_json"]))
    db.executemany("DELETE FROM pending WHERE id=?",
                   [(p,) for p in pending_ids])
    return numbers, parents, now

  _REV_COLS = ("r.adapter_id, r.revision, r.parent, a.base_fingerprint, "
               "r.sha256, r.provenance, r.created, r.array_key, r.row, r.meta")

  @staticmethod
  def _revision(t: tuple) -> Revision:
    aid, rev, parent, base, sha, prov, created, key, row, meta = t
    return Revision(aid, rev, parent, base, sha, prov, created, key, row,
                    meta)

  def revision(self, adapter_id: str, revision: int | None) -> Revision | None:
    """A revision by number, or the latest when `revision` is None."""
    base = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
            "a.id=r.adapter_id WHERE r.adapter_id=? ")
    if revision is None:
      rows = self.query(base + "ORDER BY r.revision DESC LIMIT 1",
                        (adapter_id,))
    else:
      rows = self.query(base + "AND r.revision=?", (adapter_id, revision))
    return self._revision(rows[0]) if rows else None

  def resolve_many(self, parsed: Sequence[tuple[str, int | None, str | None]]
                   ) -> list[tuple[Revision, str, str] | None]:
    """Resolves (id, revision, tag) triples in one query.

    A revision number wins; else a tag; else (no tag, or the tag 'latest'
    when no such tag is set) the latest revision.

    Returns:
      Per triple (Revision, spec_json, layout_json), or None if unresolved.
    """
    out: list = [None] * len(parsed)
    # SQLite limits bound variables; 3 per request.
    for start in range(0, len(parsed), 300):
      chunk = parsed[start:start + 300]
      values = ",".join("(?, ?, ?, ?)" for _ in chunk)
      args = [x for i, (aid, rev, tag) in enumerate(chunk)
              for x in (start + i, aid, rev, tag)]
      rows = self.query(
          f"WITH req(i, aid, rev, tag) AS (VALUES {values}) "
          f"SELECT req.i, {self._REV_COLS}, a.spec, a.layout FROM req "
          "JOIN revisions r ON r.adapter_id = req.aid AND r.revision = "
          "COALESCE(req.rev, (SELECT t.revision FROM tags t WHERE "
          "t.adapter_id = req.aid AND t.tag = req.tag), CASE WHEN req.tag "
          "IS NULL OR req.tag = 'latest' THEN (SELECT MAX(m.revision) FROM "
          "revisions m WHERE m.adapter_id = req.aid) END) "
          "JOIN adapters a ON a.id = r.adapter_id", args)
      for row in rows:
        out[row[0]] = (self._revision(row[1:11]), row[11], row[12])
    return out

  def revisions(self, adapter_id: str | None = None) -> list[Revision]:
    sql = (f"SELECT {self._REV_COLS} FROM revisions r JOIN adapters a ON "
           "a.id=r.adapter_id")
    if adapter_id is None:
      return [self._revision(t) for t in self.query(
          sql + " ORDER BY r.adapter_id, r.revision")]
    return [self._revision(t) for t in self.query(
        sql + " WHERE r.adapter_id=? ORDER BY r.revision", (adapter_id,))]

  # --- tags, evals, residency ----------------------------------------------

  def tag_revision(self, adapter_id: str, tag: str) -> int | None:
    rows = self.query("SELECT revision FROM tags WHERE adapter_id=? AND tag=?",
                      (adapter_id, tag))
    return rows[0][0] if rows else None

  def tags(self, adapter_id: str) -> dict[str, int]:
    return dict(self.query(
        "SELECT tag, revision FROM tags WHERE adapter_id=? ORDER BY tag",
        (adapter_id,)))

  def set_tag(self, db, adapter_id: str, tag: str, revision: int,
              reason: str) -> int | None:
    old = db.execute("SELECT revision FROM tags WHERE adapter_id=? AND tag=?",
                     (adapter_id, tag)).fetchone()
    now = _now()
    db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)",
               (adapter_id, tag, revision, now))
    db.execute("INSERT INTO tag_events (adapter_id, tag, old_revision, "
               "new_revision, reason, created) VALUES (?, ?, ?, ?, ?, ?)",
               (adapter_id, tag, old[0] if old else None, revision, reason,
                now))
    return old[0] if old else None

  def tag_events(self, adapter_id: str, tag: str | None = None) -> list[dict]:
    sql = ("SELECT tag, old_revision, new_revision, reason, created FROM "
           "tag_events WHERE adapter_id=?")
    args: tuple = (adapter_id,)
    if tag is not None:
      sql, args = sql + " AND tag=?", (adapter_id, tag)
    return [dict(tag=t, old=o, new=n, reason=r, created=c)
            for t, o, n, r, c in self.query(sql + " ORDER BY id", args)]

  def insert_eval(self, adapter_id: str, revision: int, metric: str,
                  value: float, data_fingerprint: str) -> None:
    with self.write() as db:
      db.execute("INSERT INTO evals (adapter_id, revision, metric, value, "
                 "data_fingerprint, created) VALUES (?, ?, ?, ?, ?, ?)",
                 (adapter_id, revision, metric, value, data_fingerprint,
                  _now()))

  def evals(self, adapter_id: str, revision: int | None = None) -> list[dict]:
    sql = ("SELECT revision, metric, value, data_fingerprint, created FROM "
           "evals WHERE adapter_id=?")
    args: tuple = (adapter_id,)
    if revision is not None:
      sql, args = sql + " AND revision=?", (adapter_id, revision)
    return [dict(revision=r, metric=m, value=v, data_fingerprint=d, created=c)
            for r, m, v, d, c in self.query(sql + " ORDER BY id", args)]

  def add_residency(self, adapter_id: str, revision: int, served: int,
                    loads: int) -> None:
    now = _now()
    with self.write() as db:
      db.execute(
          "INSERT INTO residency (adapter_id, revision) VALUES (?, ?) "
          "ON CONFLICT DO NOTHING", (adapter_id, revision))
      db.execute(
          "UPDATE residency SET served_count=served_count+?, load_count="
          "load_count+?, last_served=CASE WHEN ?>0 THEN ? ELSE last_served "
          "END, last_loaded=CASE WHEN ?>0 THEN ? ELSE last_loaded END "
          "WHERE adapter_id=? AND revision=?",
          (served, loads, served, now, loads, now, adapter_id, revision))

  def residency(self, adapter_id: str) -> list[dict]:
    return [dict(revision=r, served_count=s, last_served=ls, load_count=lc,
                 last_loaded=ll)
            for r, s, ls, lc, ll in self.query(
                "SELECT revision, served_count, last_served, load_count, "
                "last_loaded FROM residency WHERE adapter_id=? ORDER BY "
                "revision", (adapter_id,))]

  def counts(self) -> dict[str, int]:
    """Row counts of the main tables (tests check 'nothing changed')."""
    out = {}
    for table in ("adapters", "revisions", "evals", "tags", "tag_events",
                  "residency", "arrays", "pending", "free_rows"):
      out[table] = self.query(f"SELECT COUNT(*) FROM {table}")[0][0]
    return out


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  # A zombie (killed child not yet reaped) is dead for our purposes.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return True
