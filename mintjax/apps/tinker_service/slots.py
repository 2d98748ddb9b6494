"""Bank slots of the Tinker trainer: who holds which, and slot state files.

Owns `SlotTable` (the free slots, which training client holds each slot, and
the least-recently-used choice of a client to evict when a client that is
not resident needs a slot) and the slot state files: a client's Adam moments
and step counter (and, for an evicted client, its not yet applied gradient
accumulator) as one `.npz` with its sha256 beside it, written durably
(`write_state_file`) and checked on every read (`read_state_file`).

Why a client can be evicted at any point of its loop: everything a slot
holds for it (LoRA weights in the registry revision; moments, counter and
the pending gradient in the state file) is saved bit for bit and written
back into whichever slot it gets next, so its next step is the step it
would have taken had it never left. The slot itself is then rewritten in
full for its next holder (weights, moments, counter, accumulator, target
mask), so nothing of one client's optimizer state reaches another.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import numpy as np

# A slot's state, host side: {"mu": {side: {target: [L, ...]}}, "nu": ...,
# "count": int, optional "grads": {side: {target: [L, ...]}}}.
TREES = ("mu", "nu", "grads")


class SlotTable:
  """Which client holds which of the bank's slots 1..num_slots (0 is null).

  Not thread safe: the trainer's worker is its only user.
  """

  def __init__(self, num_slots: int):
    self.num_slots = num_slots
    self._free = list(range(1, num_slots + 1))
    self._holder: dict[int, str] = {}
    self._last_use: dict[str, int] = {}
    self._clock = itertools.count()

  def holder(self, slot: int) -> str | None:
    return self._holder.get(slot)

  def resident(self) -> list[str]:
    return list(self._holder.values())

  def touch(self, model_id: str) -> None:
    """Marks a client as just used (the LRU order)."""
    self._last_use[model_id] = next(self._clock)

  def take_free(self) -> int | None:
    return self._free.pop(0) if self._free else None

  def assign(self, slot: int, model_id: str) -> None:
    self._holder[slot] = model_id
    self.touch(model_id)

  def release(self, slot: int) -> None:
    model_id = self._holder.pop(slot)
    self._last_use.pop(model_id, None)
    self._free.append(slot)
    self._free.sort()

  def victim(self, *, keep: set[str], queued: set[str]) -> str:
    """The client to evict: least recently used, idle ones (no queued
    request) before queued ones, never one in `keep` (this round's)."""
    candidates = [m for m in self._holder.values() if m not in keep]
    if not candidates:
      raise RuntimeError("no slot to evict: every holder is in this round "
                         "(the round must hold at most num_slots clients)")
    return min(candidates,
               key=lambda m: (m in queued, self._last_use.get(m, -1)))


def state_file(state_dir: str, ref: str) -> str:
  """The state file of a registry revision ('<id>@<rev>')."""
  return os.path.join(state_dir, "optimizer",
                      ref.replace("@", "_at_") + ".npz")


def write_state_file(path: str, state: dict) -> None:
  """Writes a slot state durably (tmp + fsync + rename), then its sha256."""
  flat = {"count": np.int64(state["count"])}
  for which in TREES:
    for side, tree in (state.get(which) or {}).items():
      for tgt, x in tree.items():
        flat[f"{which}/{side}/{tgt}"] = x
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **flat)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  with open(path + ".sha256", "w", encoding="utf-8") as f:
    f.write(digest)


def read_state_file(path: str, ref: str) -> dict | None:
  """A slot state back (None when the revision has none); checks sha256."""
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    data = f.read()
  with open(path + ".sha256", encoding="utf-8") as f:
    want = f.read().strip()
  if hashlib.sha256(data).hexdigest() != want:
    raise RuntimeError(f"optimizer state of {ref} fails its checksum "
                       f"({path}); it was modified after saving")
  with np.load(path) as z:
    out = {"mu": {}, "nu": {}, "count": int(z["count"])}
    for key in z.files:
      if key == "count":
        continue
      which, side, tgt = key.split("/")
      out.setdefault(which, {}).setdefault(side, {})[tgt] = z[key]
  return out
