"""Request futures of the Tinker API: ids, de-duplication and expiry.

Owns `Futures`: every long call gets a request id ('req-<n>', n counting up
from 1) whose result the SDK polls through `retrieve_future`. A submission
that repeats one already seen (same key: model or session and seq_id, e.g.
a client retrying after a dropped connection) gets the original id instead
of running twice.

Memory stays bounded: a finished result is kept `retain_s` after it was
first handed out (so a retried poll still gets the same bytes), at most
`ttl_s` after it finished if nobody asks for it, and at most `max_done`
finished results are kept (the oldest go first). A poll of an expired id
gets `ExpiredError`, which names the id and says to resubmit; an id this
process never issued is unknown (a LookupError the route turns into 404).
Running futures never expire.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable


class ExpiredError(LookupError):
  """A request id whose result was dropped (module docstring)."""


@dataclasses.dataclass
class _Entry:
  future: concurrent.futures.Future
  encode: Callable[[Any], Any]
  key: tuple | None
  done_at: float | None = None
  retrieved_at: float | None = None


class Futures:
  """Request id -> concurrent future and how to encode its result."""

  def __init__(self, *, retain_s: float = 300.0, ttl_s: float = 3600.0,
               max_done: int = 10_000,
               refuse: tuple[type[BaseException], ...] = (ValueError,
                                                          LookupError),
               clock: Callable[[], float] = time.monotonic):
    """Args: retain_s, ttl_s, max_done: the expiry policy (module doc);
    refuse: exceptions `start()` may raise that fail the future (a refused
    request) instead of the HTTP call; clock: seconds (tests pass a fake)."""
    self.retain_s, self.ttl_s, self.max_done = retain_s, ttl_s, max_done
    self._refuse = refuse
    self._clock = clock
    self._lock = threading.Lock()
    self._items: dict[str, _Entry] = {}
    self._by_key: dict[tuple, str] = {}
    self._ids = itertools.count(1)
    self._issued = 0
    self._swept_at = float("-inf")
    self._done = 0
    self.expired = 0

  def add(self, key: tuple | None, start: Callable[[], Any],
          encode: Callable[[Any], Any] = lambda r: r) -> dict:
    """Starts `start()` (a future, or a value / exception now) once per key."""
    with self._lock:
      self._expire()
      if key is not None and key in self._by_key:
        return {"request_id": self._by_key[key]}
      n = next(self._ids)
      self._issued = n
      rid = f"req-{n}"
      if key is not None:
        self._by_key[key] = rid
      try:
        fut = start()
      except self._refuse as e:
        fut = concurrent.futures.Future()
        fut.set_exception(e)
      if not isinstance(fut, concurrent.futures.Future):
        done = concurrent.futures.Future()
        done.set_result(fut)
        fut = done
      entry = _Entry(fut, encode, key)
      self._items[rid] = entry
    fut.add_done_callback(lambda _: self._finished(entry))
    return {"request_id": rid}

  def get(self, rid: str) -> tuple[concurrent.futures.Future, Callable]:
    """The future and encoder of a request id; raises ExpiredError for an
    id whose result was dropped, LookupError for one never issued."""
    with self._lock:
      self._expire()
      entry = self._items.get(rid)
      if entry is not None:
        return entry.future, entry.encode
      if rid.startswith("req-") and rid[4:].isdigit() and (
          0 < int(rid[4:]) <= self._issued):
        raise ExpiredError(
            f"request {rid!r} expired: its result was dropped (results are "
            f"kept {self.retain_s:g} s after first retrieval, {self.ttl_s:g}"
            f" s unretrieved, at most {self.max_done} at once); resubmit "
            "the request")
      raise LookupError(f"unknown request_id {rid!r}")

  def retrieved(self, rid: str) -> None:
    """Marks a finished result as handed out (starts its `retain_s`)."""
    with self._lock:
      entry = self._items.get(rid)
      if entry is not None and entry.retrieved_at is None:
        entry.retrieved_at = self._clock()

  def __len__(self) -> int:
    with self._lock:
      self._expire()
      return len(self._items)

  def _finished(self, entry: _Entry) -> None:
    with self._lock:
      entry.done_at = self._clock()
      self._done += 1

  def _expire(self) -> None:
    """Drops expired finished results (lock held). A sweep is O(results),
    so it runs at most once a second unless too many results are kept."""
    now = self._clock()
    if now - self._swept_at < 1.0 and self._done <= self.max_done:
      return
    self._swept_at = now
    done = [(rid, e) for rid, e in self._items.items()
            if e.done_at is not None]
    drop = {rid for rid, e in done
            if (e.retrieved_at is not None
                and now - e.retrieved_at > self.retain_s)
            or now - e.done_at > self.ttl_s}
    alive = [(rid, e) for rid, e in done if rid not in drop]
    excess = len(alive) - self.max_done
    if excess > 0:  # the oldest finished first
      alive.sort(key=lambda x: x[1].done_at)
      drop.update(rid for rid, _ in alive[:excess])
    self._done -= len(drop)
    for rid in drop:
      e = self._items.pop(rid)
      if e.key is not None and self._by_key.get(e.key) == rid:
        del self._by_key[e.key]
    self.expired += len(drop)
