"""The bad-input corpus harness: cases, outcome classes, state fingerprints.

Owns `Case` (one bad input and the error it must produce), `outcome` (runs
a case and classifies what happened), `state_digest` (sha256 over a registry
directory's files and its catalog tables) and the tally that
`python tests/bad_input_corpus.py` prints over every `tests/test_bad_input_*`
module. The corpus modules hold the tables; pytest runs them through
`check`.

Outcome classes (the issue's tally):
  clear      an error a user can act on: a ValueError / LookupError (or a
             CLI exit != 0 with one 'error:' line on stderr, or an error in a
             result's `error` field) whose message is one line.
  traceback  any other exception class escaped (TypeError, OverflowError,
             sqlite3.Error, ...), a multi-line message, or a CLI traceback.
  silent     no error at all: the bad input was accepted.
  hang       (tally only) still running after HANG_AFTER_S seconds.
`check` is stricter than `clear`: the exception class must be the case's
and the message must match the case's regex, and stored state must be
unchanged.

The tally runs the same cases against any checkout, e.g. the code before a
fix:  cd OLD && PYTHONPATH=OLD python NEW/tests/bad_input_corpus.py (OLD and NEW
being two checkouts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import signal
import sqlite3
import sys
import tempfile
from typing import Any, Callable

CLEAR, TRACEBACK, SILENT, HANG = "clear", "traceback", "silent", "hang"
# A case still running after this long counts as a hang (the tally only).
HANG_AFTER_S = int(os.environ.get("BAD_INPUT_HANG_S", "20"))
# Error families a caller is expected to catch for bad input.
USER_ERRORS = (ValueError, LookupError)


@dataclasses.dataclass(frozen=True)
class Reported:
  """An error reported in place instead of raised (CLI, engine result)."""

  message: str | None
  traceback: bool = False


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input.

  Attributes:
    name: unique id (pytest param id).
    fn: fn(ctx) performs the bad call; raises, or returns `Reported`.
    error: exception class the call must raise (ignored for `Reported`).
    match: regex the one-line message must contain (names problem + fix).
    store: compare the registry's state before and after.
    xfail: reason when a known owner still has to fix it ('store: ...').
  """

  name: str
  fn: Callable[[Any], Any]
  error: type | tuple = ValueError
  match: str = ""
  store: bool = True
  xfail: str | None = None


def outcome(case: Case, ctx) -> tuple[str, BaseException | None, str | None]:
  """Runs `case`; returns (class, exception or None, message or None)."""
  try:
    got = case.fn(ctx)
  except USER_ERRORS as e:
    msg = str(e)
    return (CLEAR if "\n" not in msg.strip() else TRACEBACK), e, msg
  except Exception as e:  # pylint: disable=broad-except  # classify it
    return TRACEBACK, e, f"{type(e).__name__}: {e}"
  if isinstance(got, Reported):
    if got.traceback:
      return TRACEBACK, None, got.message
    if not got.message:
      return SILENT, None, None
    one = "\n" not in got.message.strip()
    return (CLEAR if one else TRACEBACK), None, got.message
  return SILENT, None, None


def state_digest(path: str | None) -> str:
  """sha256 over every file under `path` and the catalog's table rows.

  The SQLite catalog is compared by content (each table's rows in order),
  its -wal/-shm side files not at all: the same rows can sit in different
  bytes after a checkpoint.
  """
  if path is None or not os.path.exists(path):
    return "absent"
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      rel = os.path.relpath(p, path)
      if f.endswith((".sqlite-wal", ".sqlite-shm", "-journal")):
        continue
      h.update(rel.encode() + b"\0")
      if f.endswith(".sqlite"):
        h.update(_catalog_rows(p))
      else:
        with open(p, "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()


def _catalog_rows(path: str) -> bytes:
  con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
  try:
    out = []
    tables = [r[0] for r in con.execute(
        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    for t in tables:
      out.append(f"{t}:{con.execute(f'SELECT * FROM {t}').fetchall()!r}")
    return "\n".join(out).encode()
  except sqlite3.DatabaseError:
    with open(path, "rb") as fh:
      return fh.read()
  finally:
    con.close()


def check(case: Case, ctx, registry_dir: str | None) -> None:
  """Asserts the strict contract for one case (used by the test modules)."""
  before = state_digest(registry_dir) if case.store else None
  kind, exc, msg = outcome(case, ctx)
  assert kind == CLEAR, f"{case.name}: {kind}: {msg}"
  if exc is not None:
    assert isinstance(exc, case.error), (
        f"{case.name}: raised {type(exc).__name__}, expected "
        f"{case.error}: {msg}")
  assert msg and re.search(case.match, msg), (
      f"{case.name}: message {msg!r} lacks {case.match!r}")
  if case.store:
    assert state_digest(registry_dir) == before, (
        f"{case.name}: stored state changed")


def params(cases):
  """pytest.param per case (xfail(strict=True) where a reason is given)."""
  import pytest  # pylint: disable=g-import-not-at-top
  return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(
      strict=True, reason=c.xfail)] if c.xfail else [])
          for c in cases]


@contextlib.contextmanager
def captured_stderr():
  buf = io.StringIO()
  old = sys.stderr
  sys.stderr = buf
  try:
    yield buf
  finally:
    sys.stderr = old


class _Hang(BaseException):
  """Raised by the tally's alarm (a BaseException: no `except` eats it)."""


def _timed_outcome(case: Case, ctx):
  def on_alarm(*_):
    raise _Hang()
  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(HANG_AFTER_S)
  try:
    return outcome(case, ctx)
  except _Hang:
    return HANG, None, f"still running after {HANG_AFTER_S} s"
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def tally(modules) -> dict:
  """Runs every case of every module; prints and returns the counts."""
  counts = {CLEAR: 0, TRACEBACK: 0, SILENT: 0, HANG: 0}
  rows = []
  for mod in modules:
    with tempfile.TemporaryDirectory() as tmp:
      ctx = mod.build_context(tmp)
      for case in mod.CASES:
        before = state_digest(getattr(ctx, "registry_dir", None))
        kind, _, msg = _timed_outcome(case, ctx)
        changed = state_digest(getattr(ctx, "registry_dir", None)) != before
        counts[kind] += 1
        rows.append((mod.__name__, case.name, kind, changed,
                     " ".join((msg or "").split())[:110]))
      close = getattr(ctx, "close", None)
      if close:
        close()
  for r in rows:
    print(f"{r[0][14:]:10s} {r[1]:42s} {r[2]:9s} "
          f"{'STATE CHANGED ' if r[3] else ''}{r[4]}")
  total = sum(counts.values())
  changed = sum(r[3] for r in rows)
  print(f"\ntried {total}: clear {counts[CLEAR]}, traceback "
        f"{counts[TRACEBACK]}, silent {counts[SILENT]}, hang {counts[HANG]}; "
        f"stored state changed by {changed}")
  return counts


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("XLA_FLAGS",
                        "--xla_force_host_platform_device_count=8")
  import importlib  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  names = sorted(f[:-3] for f in os.listdir(here)
                 if f.startswith("test_bad_input_") and f.endswith(".py"))
  only = sys.argv[1:]
  # Through the imported module, not __main__: the corpus modules import
  # `bad_input_corpus`, and its `Reported` is the class `outcome` must see.
  importlib.import_module("bad_input_corpus").tally(
      [importlib.import_module(n) for n in names
       if not only or any(o in n for o in only)])
