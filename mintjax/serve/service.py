"""The engine as a service: one engine thread, many concurrent callers.

Owns `EngineService` (runs `Engine.step` in its own thread; callers on any
thread or asyncio loop submit requests that join the running batch between
device calls), `RequestHandle` (one request's token stream and result),
`ServiceConfig` and the errors a front end maps to HTTP statuses
(`QueueFullError` -> 429, `ServiceClosedError` -> 503).

  service = EngineService(engine, ServiceConfig(max_queue=256)).start()
  handle = service.submit(GenerationRequest(prompt="hi", adapter="alice"))
  for events in handle: ...             # one list per device call
  result = handle.wait()                # or: await handle.wait_async()
  service.close(drain=True)

Threading: only the engine thread touches the engine (and through it the
registry and the device); other threads talk to it through a locked inbox
and get answers back through per-handle queues. Work is batched per device
call: the engine thread wakes callers once per step (one
`call_soon_threadsafe` per event loop per step), never once per token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

from absl import logging

from mintjax.serve.engine import (Engine, GenerationRequest, GenerationResult,
                                  TokenEvent)


class QueueFullError(RuntimeError):
  """Too many requests wait for a row; retry after `retry_after_s`."""

  def __init__(self, message: str, retry_after_s: float):
    super().__init__(message)
    self.retry_after_s = retry_after_s


class ServiceClosedError(RuntimeError):
  """The service is draining or stopped and accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """Admission and time limits of an `EngineService`.

  Attributes:
    max_queue: requests allowed to wait for a batch row; one more is
      refused with `QueueFullError`.
    request_timeout_s: a request running longer is cancelled (0 = never).
    retry_after_s: the wait suggested to refused callers.
    admission_wait_s: after a step that finished requests, wait up to this
      long (and at most `admission_wait_fraction` of that step's time) for
      as many new requests: callers that answer a finished request with
      the next one then join the next device call, not the one after it
      (on a slow model the gap between two calls is a whole multi-token
      decode call).
    admission_wait_fraction: the wait's bound relative to the last step, so
      a fast model loses at most this fraction of its throughput to it.
  """

  max_queue: int = 256
  request_timeout_s: float = 600.0
  retry_after_s: float = 1.0
  admission_wait_s: float = 0.05
  admission_wait_fraction: float = 0.05

  def __post_init__(self):
    if not isinstance(self.max_queue, int) or self.max_queue < 1:
      raise ValueError(f"max_queue must be an int >= 1, got {self.max_queue!r}")
    for name in ("request_timeout_s", "retry_after_s", "admission_wait_s",
                 "admission_wait_fraction"):
      if getattr(self, name) < 0:
        raise ValueError(f"ServiceConfig.{name} must be >= 0, got "
                         f"{getattr(self, name)!r}")


class RequestHandle:
  """One submitted request, readable from the thread or loop that submitted.

  Iterate it (or `async for` when submitted with a loop) to get the
  request's `TokenEvent`s in lists, one list per device call; the last
  event of the last list carries the `GenerationResult`.

  Attributes:
    key: the service-unique id the engine knows the request by.
    request: the request as submitted.
    revision: the resolved 'id@revision' (None for the base), set once the
      engine thread accepted the request.
    exception: why the request was refused before queuing (an unknown
      adapter raises LookupError), else None.
    refused: the request never ran (bad adapter, prompt or parameters).
    timed_out: cancelled because it ran past the request timeout.
    submitted_at / first_token_at / finished_at: time.monotonic() stamps.
  """

  def __init__(self, key: int, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None, timeout_s: float):
    self.key = key
    self.request = request
    self.revision: str | None = None
    self.exception: BaseException | None = None
    self.refused = False
    self.timed_out = False
    self.submitted_at = time.monotonic()
    self.deadline = self.submitted_at + timeout_s if timeout_s else None
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.result: GenerationResult | None = None
    self._loop = loop
    # asyncio.Queue binds to the running loop on first use, which is the
    # submitting loop: items are only ever put there via call_soon_threadsafe.
    self._aq: asyncio.Queue | None = asyncio.Queue() if loop else None
    self._q: queue.SimpleQueue | None = None if loop else queue.SimpleQueue()
    self._done = False

  @property
  def output_tokens(self) -> int:
    return len(self.result.tokens) if self.result is not None else 0

  def __iter__(self) -> Iterator[list[TokenEvent]]:
    if self._q is None:
      raise RuntimeError("this handle was submitted with an event loop; "
                         "use `async for` on it")
    while not self._done:
      events = self._q.get()
      self._done = events[-1].result is not None
      yield events

  async def __aiter__(self) -> AsyncIterator[list[TokenEvent]]:
    if self._aq is None:
      raise RuntimeError("this handle was submitted without an event loop; "
                         "iterate it with `for`")
    while not self._done:
      events = await self._aq.get()
      self._done = events[-1].result is not None
      yield events

  def wait(self) -> GenerationResult:
    """Blocks until the request finishes; returns its result."""
    for _ in self:
      pass
    return self.result

  async def wait_async(self) -> GenerationResult:
    async for _ in self:
      pass
    return self.result

  def ttft_s(self) -> float | None:
    if self.first_token_at is None:
      return None
    return self.first_token_at - self.submitted_at

  def tpot_s(self) -> float | None:
    """Mean time per output token after the first (None below 2 tokens)."""
    n = self.output_tokens
    if n < 2 or self.first_token_at is None or self.finished_at is None:
      return None
    return (self.finished_at - self.first_token_at) / (n - 1)


def _push_all(items: list[tuple[RequestHandle, list[TokenEvent]]]) -> None:
  for handle, events in items:
    handle._aq.put_nowait(events)  # pylint: disable=protected-access


class EngineService:
  """Runs an `Engine` in its own thread for concurrent callers.

  Args:
    engine: a warmed-up engine; from `start()` on only the service's
      thread may use it (go through `call` for anything else).
    config: queue bound and timeouts.
  """

  def __init__(self, engine: Engine, config: ServiceConfig = ServiceConfig()):
    self.engine = engine
    self.config = config
    self._cv = threading.Condition()
    self._inbox: list[RequestHandle] = []
    self._cancels: list[tuple[int, str]] = []
    self._calls: list[tuple[Callable, tuple, dict,
                            concurrent.futures.Future]] = []
    self._live: dict[int, RequestHandle] = {}  # engine thread only
    self._keys = itertools.count()
    self._inflight = 0   # submitted and not finished (under _cv)
    self._running = 0    # in a batch row after the last step (under _cv)
    self._closing = False
    self._stop = False
    self._abort: str | None = None  # cancel everything live, with this reason
    self._snapshot: dict[str, Any] = {}
    # Finished requests by outcome (engine thread writes, under _cv).
    self._outcomes = dict(completed=0, refused=0, cancelled=0, timed_out=0,
                          failed=0)
    self.last_error: str | None = None
    self._thread = threading.Thread(target=self._run, name="mintjax-engine",
                                    daemon=True)
    self._publish()

  # --- caller side (any thread) --------------------------------------------

  def start(self) -> "EngineService":
    self._thread.start()
    return self

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._closing

  def submit(self, request: GenerationRequest | Mapping, *,
             loop: asyncio.AbstractEventLoop | None = None,
             timeout_s: float | None = None) -> RequestHandle:
    """Queues a request; it joins the running batch at the next step.

    Args:
      request: the request (a dict is converted as `Engine.generate` does).
      loop: deliver events to this asyncio loop (iterate with `async for`);
        None delivers to a thread-safe queue (iterate with `for`).
      timeout_s: overrides the service's request timeout (0 = none).

    Raises:
      QueueFullError: `max_queue` requests are already waiting.
      ServiceClosedError: the service is draining or stopped.
    """
    if isinstance(request, Mapping):
      request = GenerationRequest.from_dict(request)
    timeout = (self.config.request_timeout_s if timeout_s is None
               else timeout_s)
    with self._cv:
      if self._closing or not self._thread.is_alive():
        raise ServiceClosedError(
            "the server is shutting down and accepts no new requests; retry "
            "on another replica")
      waiting = self._inflight - self._running
      if waiting >= self.config.max_queue:
        raise QueueFullError(
            f"{waiting} requests are already waiting for a batch row (the "
            f"limit is max_queue={self.config.max_queue}); retry after "
            f"{self.config.retry_after_s:g} s", self.config.retry_after_s)
      handle = RequestHandle(next(self._keys), request, loop, timeout)
      self._inbox.append(handle)
      self._inflight += 1
      self._cv.notify_all()
    return handle

  def cancel(self, handle: RequestHandle,
             reason: str = "cancelled by the client") -> None:
    """Ends the request at the next step and frees its row (no-op if done)."""
    with self._cv:
      if handle.result is None:
        self._cancels.append((handle.key, reason))
        self._cv.notify_all()

  def call(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
    """Runs `fn(*args, **kwargs)` on the engine thread between two steps.

    Use it for anything that touches the engine, its residency or its
    registry (pin, unpin, resolve, listing adapters): they are not
    thread-safe and must not race a step.
    """
    fut: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      if self._stop or not self._thread.is_alive():
        fut.set_exception(ServiceClosedError("the engine thread is stopped"))
        return fut
      self._calls.append((fn, args, kwargs, fut))
      self._cv.notify_all()
    return fut

  def snapshot(self) -> dict[str, Any]:
    """Queue depth, batch occupancy and engine stats after the last step."""
    with self._cv:
      return dict(self._snapshot, outcomes=dict(self._outcomes),
                  queue_depth=self._inflight - self._running,
                  inflight=self._inflight, running=self._running,
                  closing=self._closing, last_error=self.last_error)

  def close(self, drain: bool = True, timeout_s: float | None = None) -> bool:
    """Stops accepting; finishes (or cancels) what runs; stops the thread.

    Args:
      drain: let queued and running requests finish; False cancels them.
      timeout_s: longest wait for the drain; what is left is cancelled.

    Returns:
      True when every request finished without being cancelled.
    """
    with self._cv:
      self._closing = True
      if not drain:
        self._cancel_everything_locked("the server is shutting down")
      self._cv.notify_all()
      clean = self._cv.wait_for(lambda: self._inflight == 0, timeout_s)
      if not clean:
        self._cancel_everything_locked(
            f"the server shut down before this request finished (drain "
            f"timeout {timeout_s} s)")
        self._cv.wait_for(lambda: self._inflight == 0, 30.0)
      self._stop = True
      self._cv.notify_all()
    if self._thread.is_alive():
      self._thread.join(timeout=60.0)
    return clean and drain

  def _cancel_everything_locked(self, reason: str) -> None:
    # `_live` belongs to the engine thread: it cancels what is live there.
    self._abort = reason
    self._cv.notify_all()

  # --- engine thread -------------------------------------------------------

  def _run(self) -> None:
    engine = self.engine
    was_busy = False
    while True:
      with self._cv:
        while not (self._inbox or self._cancels or self._calls or self._stop
                   or self._abort) and engine.idle:
          self._cv.wait()
        if self._stop and engine.idle and not self._inbox:
          calls, self._calls = self._calls, []
          break
        inbox, self._inbox = self._inbox, []
        cancels, self._cancels = self._cancels, []
        calls, self._calls = self._calls, []
        abort, self._abort = self._abort, None
      for fn, args, kwargs, fut in calls:
        if fut.set_running_or_notify_cancel():
          try:
            fut.set_result(fn(*args, **kwargs))
          except Exception as e:  # pylint: disable=broad-except
            fut.set_exception(e)
      try:
        events = self._accept(inbox)
        if abort is not None:
          cancels += [(key, abort) for key in self._live]
        for key, reason in cancels:
          events.extend(self._cancel_now(key, reason))
        events.extend(self._expire())
        step_s = 0.0
        if not engine.idle:
          t0 = time.perf_counter()
          events.extend(engine.step())
          step_s = time.perf_counter() - t0
          was_busy = True
      except Exception as e:  # pylint: disable=broad-except
        # A failed device call must not strand callers: fail what is live,
        # reset the engine's rows and keep serving new requests.
        logging.exception("engine step failed")
        self.last_error = f"{type(e).__name__}: {e}"
        events = self._fail_all(self.last_error)
      finished = self._deliver(events)
      if finished and step_s:
        self._await_followers(finished, step_s)
      if was_busy and engine.idle:
        was_busy = False
        if engine.residency is not None:
          engine.residency.flush_stats()
      self._publish()
    for _, _, _, fut in calls:
      fut.set_exception(ServiceClosedError("the engine thread stopped"))
    if engine.residency is not None:
      engine.residency.flush_stats()

  def _await_followers(self, finished: int, step_s: float) -> None:
    """Gives callers of just-finished requests a moment to submit again."""
    wait = min(self.config.admission_wait_s,
               self.config.admission_wait_fraction * step_s)
    with self._cv:
      self._cv.wait_for(lambda: (len(self._inbox) >= finished or self._stop
                                 or self._abort is not None), wait)

  def _accept(self, inbox: list[RequestHandle]) -> list[TokenEvent]:
    """Resolves each new request's adapter and queues it in the engine."""
    events: list[TokenEvent] = []
    for h in inbox:
      self._live[h.key] = h
      request = h.request
      try:
        if request.adapter is not None:
          h.revision = self.engine.resolve(request.adapter)
          # Pin the revision now: a tag moved later must not change it.
          request = dataclasses.replace(request, adapter=h.revision)
      except Exception as e:  # pylint: disable=broad-except
        h.exception, h.refused = e, True
        events.append(_refusal(h, e))
        continue
      if not self.engine.submit(request, index=h.key):
        h.refused = True
    return events

  def _cancel_now(self, key: int, reason: str) -> list[TokenEvent]:
    ev = self.engine.cancel(key, reason)
    return [ev] if ev is not None else []

  def _expire(self) -> list[TokenEvent]:
    now = time.monotonic()
    events = []
    for h in list(self._live.values()):
      if h.deadline is not None and now > h.deadline:
        h.timed_out = True
        events.extend(self._cancel_now(
            h.key, f"timed out after {h.deadline - h.submitted_at:g} s"))
    return events

  def _fail_all(self, message: str) -> list[TokenEvent]:
    self.engine.cancel_all()
    events = []
    for h in self._live.values():
      h.exception = RuntimeError(message)
      events.append(_refusal(h, h.exception, reason="error"))
    return events

  def _deliver(self, events: list[TokenEvent]) -> int:
    """Hands each request its events: one wake-up per loop per step.

    Returns:
      how many requests finished.
    """
    if not events:
      return 0
    by_key: dict[int, list[TokenEvent]] = {}
    for ev in events:
      by_key.setdefault(ev.index, []).append(ev)
    now = time.monotonic()
    per_loop: dict[asyncio.AbstractEventLoop, list] = {}
    finished: list[RequestHandle] = []
    for key, evs in by_key.items():
      h = self._live.get(key)
      if h is None:
        continue
      if h.first_token_at is None and evs[0].token is not None:
        h.first_token_at = now
      if evs[-1].result is not None:
        h.finished_at, h.result = now, evs[-1].result
        del self._live[key]
        finished.append(h)
      if h._loop is None:  # pylint: disable=protected-access
        h._q.put(evs)  # pylint: disable=protected-access
      else:
        per_loop.setdefault(h._loop, []).append((h, evs))  # pylint: disable=protected-access
    for loop, items in per_loop.items():
      try:
        loop.call_soon_threadsafe(_push_all, items)
      except RuntimeError:  # the caller's loop is closed: nobody listens
        pass
    if finished:
      with self._cv:
        self._inflight -= len(finished)
        for h in finished:
          self._outcomes[_outcome(h)] += 1
        self._cv.notify_all()
    return len(finished)

  def _publish(self) -> None:
    stats = self.engine.stats()
    running = len(self.engine.scheduler.running)
    with self._cv:
      self._running = running
      self._snapshot = dict(stats=stats, max_batch=self.engine.config.max_batch)


def _outcome(h: RequestHandle) -> str:
  if h.refused:
    return "refused"
  if h.timed_out:
    return "timed_out"
  return {"cancelled": "cancelled", "error": "failed"}.get(
      h.result.finish_reason, "completed")


def _refusal(h: RequestHandle, e: BaseException,
             reason: str = "error") -> TokenEvent:
  result = GenerationResult(
      request_id=str(h.request.request_id or h.key), tokens=[], text="",
      logprobs=[], finish_reason=reason, adapter=h.request.adapter,
      revision=None, prompt_tokens=0, error=f"{type(e).__name__}: {e}")
  return TokenEvent(result.request_id, h.key, None, None, result)
