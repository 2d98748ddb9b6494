"""Residency tiers: host LRU under a byte budget, refcounted slots, registry."""

import numpy as np
import pytest

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import (HostCache, InMemoryAdapters, Residency,
                                     ResidencyError, SlotTable, weights_nbytes)
from mintjax.store.errors import (BaseMismatchError, InvalidAdapterError,
                                  UnknownRefError)
from mintjax.store.registry import Registry
from mintjax.store.revision import LoadedAdapter, Revision

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
SPEC = AdapterSpec(targets=("q", "v"), max_rank=4, num_slots=3)
FP = "sha256:" + "ab" * 32


def _w(i, rank=4):
  return AdapterWeights.random(CFG, ("q", "v"), rank=rank, seed=i)


def test_host_cache_evicts_least_recently_used_within_budget():
  size = weights_nbytes(_w(0))
  cache = HostCache(budget_bytes=2 * size)
  cache.put("a", _w(0))
  cache.put("b", _w(1))
  assert cache.get("a") is not None  # a is now most recent
  cache.put("c", _w(2))
  assert "b" not in cache and "a" in cache and "c" in cache
  assert cache.nbytes == 2 * size and cache.stats.evictions == 1
  assert cache.get("b") is None
  assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_host_cache_keeps_pinned_entries():
  size = weights_nbytes(_w(0))
  cache = HostCache(budget_bytes=2 * size)
  cache.pinned.add("a")
  cache.put("a", _w(0))
  cache.put("b", _w(1))
  cache.put("c", _w(2))
  assert "a" in cache and "b" not in cache


def test_slot_table_never_picks_a_referenced_or_pinned_slot():
  table = SlotTable(num_slots=3)
  for slot, key in ((1, "a"), (2, "b"), (3, "c")):
    assert table.victim() == slot
    table.assign(slot, key)
  table.refs[1] += 1
  table.pinned.add(2)
  assert table.victim() == 3
  table.refs[3] += 1
  assert table.victim() is None


def _residency(src, budget=1 << 20):
  bank = bank_lib.init_bank(CFG, SPEC)
  return Residency(src, FP, CFG, SPEC, bank, budget)


def test_acquire_loads_into_the_bank_and_evicts_only_free_slots():
  src = InMemoryAdapters()
  for i in range(4):
    src.publish(f"u{i}", _w(i, rank=2 + i % 3), FP)
  res = _residency(src)
  s0 = res.acquire("u0@1")
  s1 = res.acquire("u1@1")
  got = bank_lib.read_slot(res.bank, s1)
  np.testing.assert_array_equal(got.lora_a["q"], _w(1, rank=3).lora_a["q"])
  with pytest.raises(ResidencyError, match="used by running requests"):
    res.acquire("u2@1")  # both slots referenced
  res.release(s0)
  assert res.acquire("u2@1") == s0  # the free slot was reused
  assert res.acquire("u1@1") == s1  # hit, no load
  st = res.stats()
  assert st["device"]["loads"] == 3 and st["device"]["hits"] == 1
  assert st["device"]["evictions"] == 1
  with pytest.raises(ResidencyError, match="released more often"):
    res.release(s0)
    res.release(s0)


def test_prefetch_isolates_unknown_and_foreign_adapters():
  src = InMemoryAdapters()
  src.publish("good", _w(0), FP)
  src.publish("foreign", _w(1), "sha256:" + "cd" * 32)
  res = _residency(src)
  errors = res.prefetch(["good@1", "missing@1", "foreign@1"])
  assert set(errors) == {"missing@1", "foreign@1"}
  assert "good@1" in res.host
  assert "retrain" in errors["foreign@1"]


@pytest.mark.parametrize("source", ["memory", "registry"])
def test_in_memory_source_speaks_the_registrys_refs_types_and_errors(
    tmp_path, source):
  # The same calls against InMemoryAdapters and a real Registry give the
  # same revisions and the same error types: one parser, one Revision, one
  # base check.
  if source == "memory":
    src = InMemoryAdapters()
    for i in range(3):
      src.publish("alice", _w(i), FP)
    src.tag("alice", "prod", 2)
  else:
    src = Registry.open(str(tmp_path / "reg"))
    src.create_adapter("alice", spec=dict(targets=("q", "v"), rank=4,
                                          alpha=4.0), base_fingerprint=FP)
    for i in range(3):
      src.publish("alice", _w(i))
    src.tag("alice@2", "prod")
  for ref, number in [("alice", 3), ("alice@1", 1), ("alice:prod", 2),
                      ("alice:latest", 3)]:
    rev = src.resolve(ref)
    assert isinstance(rev, Revision) and rev.ref == f"alice@{number}"
  (loaded,) = src.load_many(["alice:prod"], expect_base=FP)
  assert isinstance(loaded, LoadedAdapter) and loaded.revision.revision == 2
  np.testing.assert_array_equal(loaded.weights.lora_a["q"], _w(1).lora_a["q"])
  for bad in ("alice@x", "alice@0", "alice\n", "al/ice", "alice@\u0663"):
    with pytest.raises(InvalidAdapterError):
      src.resolve(bad)
  for unknown in ("bob", "alice@4", "alice:dev"):
    with pytest.raises(UnknownRefError):
      src.resolve(unknown)
  with pytest.raises(BaseMismatchError, match="alice@3.*convert or retrain"):
    src.load_many(["alice"], expect_base="sha256:" + "cd" * 32)


def test_weights_that_do_not_fit_the_bank_are_refused():
  src = InMemoryAdapters()
  src.publish("big", AdapterWeights.random(CFG, ("q", "v"), rank=8), FP)
  res = _residency(src)
  errors = res.prefetch(["big@1"])
  assert "max_rank" in errors["big@1"]
  assert res.stats()["device"]["resident"] == 0


@pytest.fixture(scope="module")
def tiny_base():
  return random_base(CFG, seed=0, std=0.3)


def test_engine_on_the_registry(tmp_path, tiny_base):
  reg = Registry.open(tmp_path / "reg")
  for i in range(3):
    reg.create_adapter(f"u{i}", spec=dict(targets=["q", "v"], rank=4,
                                          alpha=4.0),
                       base_fingerprint=tiny_base.fingerprint)
    reg.publish(f"u{i}", _w(i), {"seed": i})
  reg.publish("u0", _w(10), {"seed": 10})
  reg.tag("u0@1", "prod")
  eng = Engine(tiny_base, reg, EngineConfig(
      num_slots=2, max_batch=4, max_len=32, steps_per_call=4,
      prefill_batch=2, targets=("q", "v"), max_rank=4))
  reqs = [dict(prompt=[5, 6, 7], adapter=a, max_new_tokens=4)
          for a in ("u0", "u0:prod", "u1@1", "u2", None, "nope")]
  out = eng.generate(reqs)
  assert [r.revision for r in out[:5]] == ["u0@2", "u0@1", "u1@1", "u2@1",
                                           None]
  assert out[5].finish_reason == "error" and "nope" in out[5].error
  assert all(r.error is None and len(r.tokens) >= 1 for r in out[:5])
  rows = {(r["revision"]): r for r in reg.residency("u0")}
  assert rows[2]["served_count"] == 1 and rows[2]["load_count"] == 1
  assert eng.stats()["backend_compiles_since_warmup"] == 0
