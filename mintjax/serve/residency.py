"""Adapter residency: device bank slots <- host cache <- adapter store.

Owns the `AdapterSource` contract (what the engine needs from a registry:
resolve a ref, batch-load weights, record residency statistics),
`InMemoryAdapters` (a public, complete source held in memory, for adapters
handed to an engine directly, e.g. Hugging Face PEFT folders with
`InMemoryAdapters.from_peft_folders`; it uses the store's one ref parser,
`Revision` and base check), `served_shapes` (the largest rank and the
targets of the adapters an engine will serve, which size its bank), the
byte-budgeted LRU `HostCache`, the refcounted
`SlotTable` of device bank slots, and `Residency`, which moves adapters
between the tiers and counts hits, misses, loads, evictions and load time.

Policy: least recently used at both tiers; a slot used by a running request
(refcount > 0) or pinned is never evicted; pinned host entries stay cached.

Adapters of every family stay in their stored form in the host cache, which
counts their stored bytes (`weights.nbytes`: a VeRA adapter's vectors, so
many more of them fit a budget); they are materialised to LoRA factors only
when written into a device slot (`bank.pad_weights`), where they take a slot
like any LoRA adapter.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Iterable, Mapping, Protocol, Sequence

import jax

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.family import HostWeights
from mintjax.adapters.spec import BankSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import BaseModel
from mintjax.store import peft_io
from mintjax.store.errors import UnknownRefError
from mintjax.store.identity import check_name, parse_info, parse_ref
from mintjax.store.revision import LoadedAdapter, Revision, check_base


class ResidencyError(RuntimeError):
  """An adapter cannot be made resident (no evictable slot, bad weights)."""


class AdapterSource(Protocol):
  """What the engine needs from an adapter registry.

  `resolve` returns the `mintjax.store.revision.Revision` a ref names;
  `load_many` returns `LoadedAdapter(revision, weights)` per ref, in the
  order of `refs` (weights: the family's host weights, e.g.
  `AdapterWeights` or `VeraWeights`) and raises when any ref is unknown
  (a LookupError) or was trained on a different base (`check_base`'s
  `BaseMismatchError`). `mintjax.store.registry.Registry` and
  `InMemoryAdapters` satisfy this.
  """

  def resolve(self, ref: str) -> Revision: ...

  def load_many(self, refs: Sequence[str], expect_base: str | None = None
                ) -> list[LoadedAdapter]: ...

  def record_residency(self, ref: str, served: int = 0, loads: int = 0
                       ) -> None: ...


class InMemoryAdapters:
  """An `AdapterSource` over adapters held in memory: revisions and tags,
  no files.

  For adapters handed to an engine directly (benchmarks, studies, tests).
  It speaks the registry's language: the same references ('alice',
  'alice@3', 'alice:prod'; parsed by `mintjax.store.identity.parse_ref`),
  the same `mintjax.store.revision.Revision` records, the same base check
  (`check_base`) and the same errors (`UnknownRefError`, a LookupError;
  `BaseMismatchError`, `InvalidAdapterError`, ValueErrors). Nothing is
  persisted or checksummed: revisions carry no sha256 and no provenance.

  Example:
    >>> src = InMemoryAdapters()
    >>> rev = src.publish("alice", weights, base.fingerprint)  # alice@1
    >>> src.tag("alice", "prod", rev.revision)
    >>> engine = Engine(base, src, EngineConfig(num_slots=4))
    >>> engine.generate([GenerationRequest(prompt=(1, 2),
    ...                                    adapter="alice:prod")])
  """

  @classmethod
  def from_peft_folders(cls, folders: Mapping[str, str | os.PathLike],
                        base: BaseModel) -> "InMemoryAdapters":
    """Hugging Face PEFT LoRA folders as adapters named by the mapping.

    Each folder is read, checked against the base's config (shapes, layer
    count, finite values) and becomes revision 1 of its name, with the
    per-module `rank_pattern` / `alpha_pattern` scales folded in (as
    `peft_io.read_peft` returns them). All folders are read before the
    source is returned: a bad one fails the whole call, naming it.

    Example:
      >>> engine = Engine(base, {"alice": "peft/alice", "bob": "peft/bob"})
      >>> engine.generate([{"prompt": "hi", "adapter": "alice"}])
    """
    if not isinstance(folders, Mapping) or not folders:
      raise ValueError(
          "PEFT folders must be a non-empty mapping of adapter names to "
          f"folder paths, got {folders!r:.80}")
    src = cls()
    for name, folder in folders.items():
      if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(
            f"adapter {name!r}: expected a PEFT folder path, got "
            f"{type(folder).__name__}")
      weights = peft_io.read_peft(os.fspath(folder),
                                  config=base.config).weights
      src.publish(name, weights, base.fingerprint)
    return src

  def __init__(self):
    self._revs: dict[str, list[Revision]] = {}
    self._weights: dict[str, HostWeights] = {}
    self._tags: dict[tuple[str, str], int] = {}
    self.residency: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"served": 0, "loads": 0})

  def publish(self, adapter_id: str, weights: HostWeights,
              base_fingerprint: str) -> Revision:
    """Adds revision 1, 2, ... of `adapter_id` (its parent: the latest)."""
    check_name(adapter_id)
    revs = self._revs.setdefault(adapter_id, [])
    rev = Revision(adapter_id, len(revs) + 1, len(revs) or None,
                   base_fingerprint, sha256="", provenance_json="{}",
                   created=time.time())
    revs.append(rev)
    self._weights[rev.ref] = weights
    return rev

  def tag(self, adapter_id: str, tag: str, revision: int) -> None:
    """Points `adapter_id:tag` at an existing revision."""
    self.resolve(f"{adapter_id}@{revision}")
    self._tags[(adapter_id, check_name(tag, "tag"))] = revision

  def resolve(self, ref: str) -> Revision:
    """'alice' | 'alice@3' | 'alice:prod' -> Revision."""
    adapter_id, number, tag = parse_ref(ref)
    revs = self._revs.get(adapter_id)
    if revs is None:
      raise UnknownRefError(
          f"unknown adapter {adapter_id!r}; known adapters: "
          f"{sorted(self._revs)[:10]}{' ...' if len(self._revs) > 10 else ''}")
    if tag is not None and (adapter_id, tag) in self._tags:
      number = self._tags[(adapter_id, tag)]
    elif tag is not None and tag != "latest":
      raise UnknownRefError(f"adapter {adapter_id!r} has no tag {tag!r}")
    number = len(revs) if number is None else number
    if not 1 <= number <= len(revs):
      raise UnknownRefError(
          f"adapter {adapter_id!r} has revisions 1..{len(revs)}, not {number}")
    return revs[number - 1]

  def load_many(self, refs: Sequence[str], expect_base: str | None = None
                ) -> list[LoadedAdapter]:
    """`LoadedAdapter(revision, weights)` per ref, in order; refuses
    adapters of another base (`check_base`)."""
    revs = [self.resolve(ref) for ref in refs]
    for rev in revs:
      check_base(rev.ref, rev.base_fingerprint, expect_base)
    return [LoadedAdapter(rev, self._weights[rev.ref]) for rev in revs]

  def record_residency(self, ref: str, served: int = 0, loads: int = 0
                       ) -> None:
    self.residency[ref]["served"] += served
    self.residency[ref]["loads"] += loads

  def adapter_ids(self) -> list[str]:
    return sorted(self._revs)


def _shape_of(source, ref: str) -> tuple[int, tuple[str, ...]] | None:
  """(rank, targets) of the adapter `ref` names, None when unknowable."""
  if isinstance(source, InMemoryAdapters):
    w = source.load_many([ref])[0].weights
    return int(w.rank), tuple(w.targets)
  if hasattr(source, "adapter") and hasattr(source, "list_adapters"):
    # A registry: every revision of an adapter has the adapter's spec.
    info = parse_info(source.adapter(parse_ref(ref)[0])["spec"])
    return int(info.rank), tuple(info.targets)
  return None


def served_shapes(source, refs: Sequence[str] | None = None
                  ) -> dict[str, tuple[int, tuple[str, ...]]] | None:
  """Rank and targets of the adapters an engine will serve.

  Args:
    source: a `Registry`, `InMemoryAdapters` or another `AdapterSource`.
    refs: the refs to be served; None means every adapter of the source.

  Returns:
    ref or adapter id -> (rank, targets); None when the source cannot say
    (an `AdapterSource` that is neither a registry nor in memory, with no
    refs to resolve).

  Raises:
    LookupError: a ref names no adapter.
  """
  if refs is None:
    if isinstance(source, InMemoryAdapters):
      refs = source.adapter_ids()
    elif hasattr(source, "list_adapters"):
      return {rec["id"]: (int(info.rank), tuple(info.targets))
              for rec in source.list_adapters()
              for info in [parse_info(rec["spec"])]}
    else:
      return None
  out = {}
  for ref in refs:
    shape = _shape_of(source, ref)
    if shape is None:
      return None
    out[ref] = shape
  return out


def check_fits(shapes: Mapping[str, tuple[int, tuple[str, ...]]],
               max_rank: int, targets: Sequence[str]) -> None:
  """Refuses adapters a bank of `max_rank` on `targets` cannot hold.

  Raises:
    ValueError: naming the adapters, what they need and the fix.
  """
  big = {r: k for r, (k, _) in shapes.items() if k > max_rank}
  if big:
    need = max(big.values())
    raise ValueError(
        f"adapters {sorted(big)[:5]} have rank up to {need}, above the "
        f"engine's max_rank={max_rank}; set max_rank={need} (or leave it "
        "None to size the bank from the adapters)")
  outside = {r: sorted(set(t) - set(targets)) for r, (_, t) in shapes.items()
             if set(t) - set(targets)}
  if outside:
    first = sorted(outside)[0]
    want = sorted(set(targets).union(*map(set, outside.values())))
    raise ValueError(
        f"adapters {sorted(outside)[:5]} adapt {outside[first]} (e.g. "
        f"{first!r}), which the engine's targets {tuple(targets)} leave "
        f"out; set targets={tuple(want)} (or leave it None to size the "
        "bank from the adapters)")


@dataclasses.dataclass
class TierStats:
  """Counters of one residency tier."""

  hits: int = 0
  misses: int = 0
  loads: int = 0
  evictions: int = 0
  load_seconds: float = 0.0

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    looked = self.hits + self.misses
    d["hit_rate"] = self.hits / looked if looked else 0.0
    d["mean_load_ms"] = 1e3 * self.load_seconds / self.loads if self.loads else 0.0
    return d


def weights_nbytes(weights: HostWeights) -> int:
  """Host bytes of an adapter as cached, in its stored form (VeRA: its
  vectors, not the materialised factors)."""
  return int(weights.nbytes)


class HostCache:
  """Validated adapter weights in host memory under a byte budget (LRU)."""

  def __init__(self, budget_bytes: int):
    if budget_bytes <= 0:
      raise ValueError(f"host cache budget must be > 0 bytes, got "
                       f"{budget_bytes}")
    self.budget_bytes = int(budget_bytes)
    self._items: collections.OrderedDict[str, AdapterWeights] = (
        collections.OrderedDict())
    self.pinned: set[str] = set()
    self.nbytes = 0
    self.stats = TierStats()

  def __contains__(self, key: str) -> bool:
    return key in self._items

  def __len__(self) -> int:
    return len(self._items)

  def get(self, key: str, count: bool = True) -> AdapterWeights | None:
    w = self._items.get(key)
    if count:
      if w is None:
        self.stats.misses += 1
      else:
        self.stats.hits += 1
    if w is not None:
      self._items.move_to_end(key)
    return w

  def put(self, key: str, weights: AdapterWeights) -> None:
    """Caches `weights`, evicting least recently used unpinned entries.

    An adapter larger than everything evictable is not cached (it is still
    usable by the caller, who holds it).
    """
    if key in self._items:
      self._items.move_to_end(key)
      return
    size = weights_nbytes(weights)
    evictable = [k for k in self._items if k not in self.pinned]
    while self.nbytes + size > self.budget_bytes and evictable:
      victim = evictable.pop(0)
      self.nbytes -= weights_nbytes(self._items.pop(victim))
      self.stats.evictions += 1
    if self.nbytes + size <= self.budget_bytes or key in self.pinned:
      self._items[key] = weights
      self.nbytes += size


class SlotTable:
  """Which adapter each device bank slot holds, with refcounts and LRU.

  Slots 1..num_slots hold adapters; slot 0 is the null adapter (base).
  """

  def __init__(self, num_slots: int):
    self.num_slots = num_slots
    self.key_of: dict[int, str] = {}
    self.slot_of: dict[str, int] = {}
    self.refs = collections.Counter()
    self.pinned: set[int] = set()
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.stats = TierStats()

  def touch(self, slot: int) -> None:
    self._lru[slot] = None
    self._lru.move_to_end(slot)

  def victim(self) -> int | None:
    """A free slot, else the least recently used unreferenced unpinned one."""
    for s in range(1, self.num_slots + 1):
      if s not in self.key_of:
        return s
    for s in self._lru:
      if self.refs[s] == 0 and s not in self.pinned:
        return s
    return None

  def assign(self, slot: int, key: str) -> None:
    old = self.key_of.pop(slot, None)
    if old is not None:
      del self.slot_of[old]
      self.stats.evictions += 1
    self.key_of[slot] = key
    self.slot_of[key] = slot
    self.touch(slot)


class Residency:
  """Moves adapters store -> host cache -> device bank slots.

  Args:
    source: the adapter store (see `AdapterSource`).
    base_fingerprint: fingerprint of the served base; adapters for another
      base are refused.
    config: base model config.
    spec: the bank's spec (its num_slots includes the null slot 0).
    bank: the device bank (donated to every slot write).
    host_budget_bytes: host cache byte budget.
  """

  def __init__(self, source: AdapterSource, base_fingerprint: str,
               config: ModelConfig, spec: BankSpec,
               bank: bank_lib.AdapterBank, host_budget_bytes: int):
    self.source = source
    self.base_fingerprint = base_fingerprint
    self.config = config
    self.spec = spec
    self.bank = bank
    self.host = HostCache(host_budget_bytes)
    self.slots = SlotTable(spec.num_slots - 1)
    self.store = TierStats()
    self._pending: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter)

  # --- store -> host -------------------------------------------------------

  def prefetch(self, keys: Iterable[str]) -> dict[str, str]:
    """Loads uncached adapters into the host cache in one batched read.

    Returns:
      key -> error message for adapters that could not be loaded (the caller
      fails the requests that use them); the others are cached.
    """
    missing = list(dict.fromkeys(k for k in keys if k not in self.host))
    if not missing:
      return {}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
      pairs = self.source.load_many(missing, expect_base=self.base_fingerprint)
    except Exception:  # pylint: disable=broad-except
      # One bad ref fails the whole batch; retry one by one to isolate it.
      pairs = []
      for key in missing:
        try:
          pairs.extend(self.source.load_many(
              [key], expect_base=self.base_fingerprint))
        except Exception as e:  # pylint: disable=broad-except
          errors[key] = f"{type(e).__name__}: {e}"
    self.store.load_seconds += time.perf_counter() - t0
    for (rev, weights) in pairs:
      key = f"{rev.adapter_id}@{rev.revision}"
      try:
        weights.validate(self.config, self.spec)
      except ValueError as e:
        errors[key] = f"adapter {key!r} does not fit this engine: {e}"
        continue
      self.store.loads += 1
      self.host.stats.loads += 1
      self.host.put(key, weights)
    return errors

  # --- host -> device ------------------------------------------------------

  def is_resident(self, key: str) -> bool:
    return key in self.slots.slot_of

  def can_place(self, key: str) -> bool:
    """The adapter is resident or a slot could be freed for it now."""
    return self.is_resident(key) or self.slots.victim() is not None

  def acquire(self, key: str) -> int:
    """Makes `key` resident (loading it if needed) and takes a reference.

    Raises:
      ResidencyError: no slot is free of running requests and pins.
    """
    slot = self.slots.slot_of.get(key)
    if slot is not None:
      self.slots.stats.hits += 1
    else:
      self.slots.stats.misses += 1
      slot = self.slots.victim()
      if slot is None:
        raise ResidencyError(
            f"no device slot can take adapter {key!r}: all "
            f"{self.slots.num_slots} slots are used by running requests or "
            "pinned; raise num_slots or unpin adapters")
      weights = self.host.get(key)
      if weights is None:
        errors = self.prefetch([key])
        if key in errors:
          raise ResidencyError(errors[key])
        weights = self.host.get(key, count=False)
      if weights is None:
        # Larger than the host budget: read it straight from the store.
        weights = self.source.load_many(
            [key], expect_base=self.base_fingerprint)[0][1]
      t0 = time.perf_counter()
      self.bank = bank_lib.write_slot(self.bank, slot, weights, self.config,
                                      self.spec)
      jax.block_until_ready(self.bank.scale)
      self.slots.stats.load_seconds += time.perf_counter() - t0
      self.slots.stats.loads += 1
      self.slots.assign(slot, key)
      self._pending[key]["loads"] += 1
    self.slots.refs[slot] += 1
    self.slots.touch(slot)
    self._pending[key]["served"] += 1
    return slot

  def release(self, slot: int) -> None:
    if slot == 0:
      return
    if self.slots.refs[slot] <= 0:
      raise ResidencyError(f"slot {slot} released more often than acquired")
    self.slots.refs[slot] -= 1

  def pin(self, key: str) -> int:
    """Keeps `key` in a device slot and the host cache until unpinned."""
    if len(self.slots.pinned) >= self.slots.num_slots - 1:
      raise ResidencyError(
          f"cannot pin {key!r}: {len(self.slots.pinned)} of "
          f"{self.slots.num_slots} slots are pinned and at least one must "
          "stay free for other adapters")
    errors = self.prefetch([key])
    if key in errors:
      raise ResidencyError(errors[key])
    self.host.pinned.add(key)
    slot = self.acquire(key)
    self.release(slot)
    self.slots.pinned.add(slot)
    return slot

  def unpin(self, key: str) -> None:
    self.host.pinned.discard(key)
    slot = self.slots.slot_of.get(key)
    if slot is not None:
      self.slots.pinned.discard(slot)

  # --- statistics ----------------------------------------------------------

  def stats(self) -> dict:
    return dict(
        device=dict(self.slots.stats.as_dict(), slots=self.slots.num_slots,
                    resident=len(self.slots.key_of),
                    pinned=len(self.slots.pinned)),
        host=dict(self.host.stats.as_dict(), entries=len(self.host),
                  bytes=self.host.nbytes, budget_bytes=self.host.budget_bytes),
        store=self.store.as_dict())

  def flush_stats(self) -> None:
    """Writes served/load counts since the last flush back to the source."""
    pending, self._pending = self._pending, collections.defaultdict(
        collections.Counter)
    for key, c in pending.items():
      self.source.record_residency(key, served=c["served"], loads=c["loads"])
