"""Continuous batching: the request queue, sequence rows and admission.

Owns `Sequence` (one request's progress: prompt, adapter, row, generated
tokens, finish reason) and `Scheduler`, which keeps a FIFO queue and the B
sequence rows of the serving cache and decides, before every device call,
which queued requests join the running batch.

Admission is adapter-aware. Within a look-ahead window of the queue:
  1. requests whose adapter is already in a device slot (or the base) join
     first: they cost no slot write;
  2. then, in queue order, requests whose adapter can be placed in a slot
     that no running request uses and that is not pinned.
Adapters of the whole window are prefetched into the host cache (one
batched store read) before they are needed. A running request's slot is
never evicted: slots are refcounted by `Residency`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from mintjax.serve.residency import Residency, ResidencyError
from mintjax.serve.sampling import SamplingParams


@dataclasses.dataclass
class Sequence:
  """One request moving through the engine.

  Attributes:
    index: position of the request in its `generate` call.
    request_id: caller's id (or the index as a string).
    prompt_ids: prompt token ids.
    params: sampling parameters.
    stop_ids: stop token ids carried on device (eos first).
    adapter: the adapter ref as requested (None = base).
    key: resolved 'id@revision' (None = base).
    slot: bank slot while running (0 = base).
    row: sequence row of the serving cache while running.
    tokens / logprobs: generated so far.
    finish_reason: None while running; 'stop', 'length', 'max_len' or
      'error' when done.
    error: message when finish_reason == 'error'.
    text: decoded output (set when finished).
  """

  index: int
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  stop_ids: tuple[int, ...] = ()
  adapter: str | None = None
  key: str | None = None
  slot: int = 0
  row: int = -1
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  text: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def fail(self, message: str) -> None:
    self.finish_reason = "error"
    self.error = message


class Scheduler:
  """FIFO queue plus B sequence rows with adapter-aware admission.

  Args:
    batch: B, sequence rows.
    residency: adapter residency (slots are acquired on admission and
      released when a sequence finishes).
    lookahead: how many queued requests admission and prefetch consider.
  """

  def __init__(self, batch: int, residency: Residency | None,
               lookahead: int):
    self.batch = batch
    self.residency = residency
    self.lookahead = max(lookahead, batch)
    self.queue: collections.deque[Sequence] = collections.deque()
    self.rows: list[Sequence | None] = [None] * batch

  @property
  def running(self) -> list[Sequence]:
    return [s for s in self.rows if s is not None]

  @property
  def idle(self) -> bool:
    return not self.queue and not self.running

  def submit(self, seq: Sequence) -> None:
    self.queue.append(seq)

  def _window(self) -> list[Sequence]:
    return [s for _, s in zip(range(self.lookahead), self.queue)]

  def prefetch(self) -> list[Sequence]:
    """Loads the window's adapters into the host cache.

    Returns:
      sequences failed because their adapter could not be loaded (removed
      from the queue).
    """
    if self.residency is None:
      return []
    window = self._window()
    errors = self.residency.prefetch(s.key for s in window if s.key)
    failed = [s for s in window if s.key in errors]
    for s in failed:
      s.fail(errors[s.key])
      self.queue.remove(s)
    return failed

  def admit(self) -> tuple[list[Sequence], list[Sequence]]:
    """Moves queued requests into free rows.

    Returns:
      (admitted sequences with `row` and `slot` set, sequences that failed
      while their adapter was being placed).
    """
    free = [b for b, s in enumerate(self.rows) if s is None]
    admitted: list[Sequence] = []
    failed: list[Sequence] = []
    if not free or not self.queue:
      return admitted, failed
    window = self._window()
    res = self.residency
    ready = [s for s in window if s.key is None or res.is_resident(s.key)]
    later = [s for s in window if s not in ready]
    for s in ready + later:
      if not free:
        break
      if s.key is not None and not res.can_place(s.key):
        continue
      try:
        s.slot = 0 if s.key is None else res.acquire(s.key)
      except (ResidencyError, ValueError) as e:
        s.fail(str(e))
        self.queue.remove(s)
        failed.append(s)
        continue
      s.row = free.pop(0)
      self.rows[s.row] = s
      self.queue.remove(s)
      admitted.append(s)
    return admitted, failed

  def finish(self, seq: Sequence) -> None:
    """Frees the sequence's row and its adapter slot reference."""
    if seq.row >= 0 and self.rows[seq.row] is seq:
      self.rows[seq.row] = None
      if self.residency is not None and seq.key is not None:
        self.residency.release(seq.slot)
    seq.row = -1
