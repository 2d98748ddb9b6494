"""Engine: batched == alone, base == plain model, bad input, no recompiles."""

import jax
import numpy as np
import pytest

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.serve import steps as steps_lib
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingError, SamplingParams

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
NUM_ADAPTERS = 40


def _weights(i):
  # Ranks 2..8 so zero padding to max_rank is exercised.
  return AdapterWeights.random(CFG, TARGETS[:3 + i % 5], rank=2 + i % 7,
                               seed=100 + i, std=0.3)


@pytest.fixture(scope="module")
def base():
  # std 0.3 gives peaked logits: greedy choices are far from ties.
  return random_base(CFG, seed=0, std=0.3)


@pytest.fixture(scope="module")
def source(base):
  src = InMemoryAdapters()
  for i in range(NUM_ADAPTERS):
    src.publish(f"user{i}", _weights(i), base.fingerprint)
  src.publish("user0", _weights(999), base.fingerprint)  # user0@2
  src.tag("user0", "prod", 1)
  other = random_base(CFG, seed=1)
  src.publish("stranger", _weights(0), other.fingerprint)
  return src


@pytest.fixture(scope="module")
def engine(base, source):
  return Engine(base, source, EngineConfig(
      num_slots=8, max_batch=8, max_len=64, steps_per_call=4,
      prefill_batch=4, min_bucket=16, max_rank=8))


def _prompt(rng):
  return [int(t) for t in rng.integers(3, 259, size=rng.integers(2, 30))]


def _reference_greedy(base, weights, prompt, n):
  """Plain model, no cache: recompute the whole sequence for every token."""
  spec = AdapterSpec(targets=TARGETS, max_rank=8, num_slots=2)
  bank = bank_lib.bank_from_weights(CFG, spec, {1: weights} if weights else {})
  idx = np.array([1 if weights else 0], np.int32)
  seq = list(prompt)
  for _ in range(n):
    # Right padding to one length keeps one compiled program; causal
    # attention makes the padding invisible to earlier positions.
    padded = np.zeros((1, 64), np.int32)
    padded[0, :len(seq)] = seq
    logits = llama.jit_forward(base.params, bank, idx, padded, config=CFG)
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_base_and_adapted_rows_equal_the_plain_model(engine, base):
  rng = np.random.default_rng(0)
  reqs, want = [], []
  for i in range(10):
    prompt = _prompt(rng)
    adapter = None if i % 2 == 0 else f"user{i}"
    reqs.append(GenerationRequest(
        prompt=tuple(prompt), adapter=adapter,
        sampling=SamplingParams(max_new_tokens=6, ignore_eos=True)))
    want.append(_reference_greedy(base, _weights(i) if adapter else None,
                                  prompt, 6))
  got = engine.generate(reqs)
  for r, w in zip(got, want):
    assert r.error is None
    assert r.tokens == w, r.request_id


def test_isolation_mixed_batch_with_churn_equals_alone(engine):
  # 200 requests over 40 adapters (and the base) through 8 slots.
  rng = np.random.default_rng(1)
  reqs = []
  for i in range(200):
    a = int(rng.integers(-1, NUM_ADAPTERS))
    reqs.append(dict(prompt=_prompt(rng), adapter=None if a < 0 else
                     f"user{a}", max_new_tokens=int(rng.integers(1, 9)),
                     ignore_eos=bool(i % 3)))
  before = engine.stats()["residency"]["device"]
  compiles = steps_lib.backend_compiles()
  batched = engine.generate(reqs)
  assert steps_lib.backend_compiles() == compiles
  assert engine.compilations_since_warmup() == 0
  after = engine.stats()["residency"]["device"]
  assert after["evictions"] > before["evictions"]  # slots really churned
  for req, got in zip(reqs, batched):
    alone = engine.generate([req])[0]
    assert got.error is None and got.tokens == alone.tokens, req
    assert got.finish_reason == alone.finish_reason
    np.testing.assert_allclose(got.logprobs, alone.logprobs, rtol=1e-5,
                               atol=1e-5)
  assert steps_lib.backend_compiles() == compiles


@pytest.mark.slow
def test_isolation_2000_requests_200_adapters_16_slots(base):
  src = InMemoryAdapters()
  for i in range(200):
    src.publish(f"u{i}", _weights(i), base.fingerprint)
  eng = Engine(base, src, EngineConfig(
      num_slots=16, max_batch=16, max_len=64, steps_per_call=4,
      prefill_batch=4, min_bucket=32, max_rank=8))
  rng = np.random.default_rng(2)
  reqs = []
  for _ in range(2000):
    a = int(rng.integers(-1, 200))
    reqs.append(dict(prompt=_prompt(rng), adapter=None if a < 0 else f"u{a}",
                     max_new_tokens=int(rng.integers(1, 9)), ignore_eos=True))
  batched = eng.generate(reqs)
  assert eng.stats()["residency"]["device"]["evictions"] > 100
  for req, got in zip(reqs, batched):
    assert got.error is None
    assert got.tokens == eng.generate([req])[0].tokens, req
  assert eng.stats()["backend_compiles_since_warmup"] == 0


def test_refs_resolve_to_revisions(engine):
  out = engine.generate([
      dict(prompt=[5, 6, 7], adapter="user0", max_new_tokens=2),
      dict(prompt=[5, 6, 7], adapter="user0@1", max_new_tokens=2),
      dict(prompt=[5, 6, 7], adapter="user0:prod", max_new_tokens=2),
      dict(prompt=[5, 6, 7], adapter=None, max_new_tokens=2)])
  assert [r.revision for r in out] == ["user0@2", "user0@1", "user0@1", None]
  assert out[1].tokens == out[2].tokens


def test_bad_requests_fail_alone_and_others_complete(engine):
  good = dict(prompt=[10, 11, 12], adapter="user3", max_new_tokens=3)
  out = engine.generate([
      dict(prompt=[10, 11], adapter="nobody", max_new_tokens=3),
      good,
      dict(prompt=[10, 11], adapter="stranger", max_new_tokens=3),
      dict(prompt=list(range(3, 3 + 65)), max_new_tokens=3),
      dict(prompt=[10, 11], temperature=-1.0),
      dict(prompt=[10, 11], top_p=0.0),
      dict(prompt=[10, 11], max_new_tokens=0),
      dict(prompt=[10, 11], bogus=1),
      dict(prompt=[10, 999]),
  ])
  assert out[1].error is None and len(out[1].tokens) == 3
  assert out[1].tokens == engine.generate([good])[0].tokens
  bad = [r for i, r in enumerate(out) if i != 1]
  assert all(r.finish_reason == "error" and r.tokens == [] for r in bad)
  assert "unknown adapter 'nobody'" in out[0].error
  assert "trained on base" in out[2].error and "retrain" in out[2].error
  assert "65 tokens" in out[3].error and "max_len is 64" in out[3].error
  assert "temperature" in out[4].error
  assert "top_p" in out[5].error
  assert "max_new_tokens" in out[6].error
  assert "bogus" in out[7].error
  assert "[0, 259)" in out[8].error


def test_sampling_params_validate_on_construction():
  with pytest.raises(SamplingError, match="top_k"):
    SamplingParams(top_k=-1)
  with pytest.raises(SamplingError, match="seed"):
    SamplingParams(seed=-3)


def test_stop_strings_tokens_and_max_len(engine):
  probe = engine.generate([dict(prompt="abc", max_new_tokens=8,
                                ignore_eos=True)])[0]
  third = probe.tokens[2]
  stop_text = engine.tokenizer.decode(probe.tokens[1:3])
  out = engine.generate([
      dict(prompt="abc", max_new_tokens=8, ignore_eos=True,
           stop_token_ids=[third]),
      dict(prompt="abc", max_new_tokens=8, ignore_eos=True,
           stop=[stop_text]),
      dict(prompt=[7] * 60, max_new_tokens=20, ignore_eos=True),
  ])
  assert out[0].tokens == probe.tokens[:3] and out[0].finish_reason == "stop"
  assert out[1].finish_reason == "stop"
  assert stop_text not in out[1].text
  assert out[1].text == engine.tokenizer.decode(probe.tokens[:1])
  assert out[2].finish_reason == "max_len" and len(out[2].tokens) == 5
  assert probe.finish_reason == "length" and len(probe.tokens) == 8


def test_stream_yields_every_token_before_the_result(engine):
  reqs = [dict(prompt=[3, 4, 5], adapter=f"user{i}", max_new_tokens=5,
               request_id=f"r{i}") for i in range(3)]
  seen = {f"r{i}": [] for i in range(3)}
  results = {}
  for ev in engine.stream(reqs):
    if ev.result is None:
      assert ev.request_id not in results
      seen[ev.request_id].append(ev.token)
    else:
      results[ev.request_id] = ev.result
  assert all(results[k].tokens == v for k, v in seen.items())


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
  req = dict(prompt=[9, 8, 7], adapter="user5", max_new_tokens=8,
             temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
  crowd = [dict(req, seed=s) for s in range(6)] + [req]
  batched = engine.generate(crowd)
  alone = engine.generate([req])[0]
  assert batched[-1].tokens == alone.tokens
  assert len({tuple(r.tokens) for r in batched}) > 1  # seeds differ


def test_chat_messages_use_the_chat_template(engine):
  msgs = [{"role": "user", "content": "hi"}]
  text = engine.tokenizer.apply_chat_template(msgs)
  a, b = engine.generate([dict(messages=msgs, max_new_tokens=3),
                          dict(prompt=text, max_new_tokens=3)])
  assert a.error is None and a.tokens == b.tokens
  assert a.prompt_tokens == len(engine.tokenizer.encode(text))


def test_pinned_adapter_survives_churn(engine):
  slot = engine.pin("user39")
  engine.generate([dict(prompt=[3, 4], adapter=f"user{i}", max_new_tokens=1)
                   for i in range(20)])
  assert engine.residency.slots.key_of[slot] == "user39@1"
  engine.unpin("user39")
  assert slot not in engine.residency.slots.pinned


def test_stats_and_residency_written_back(engine, source):
  before = source.residency["user7@1"]["served"]
  engine.generate([dict(prompt=[3, 4], adapter="user7", max_new_tokens=1)])
  assert source.residency["user7@1"]["served"] == before + 1
  s = engine.stats()
  for tier in ("device", "host", "store"):
    assert {"hits", "misses", "loads", "evictions"} <= set(s["residency"][tier])
  assert s["residency"]["device"]["loads"] > 0
  assert s["compilations_since_warmup"] == 0


def test_base_only_engine_without_source(base):
  eng = Engine(base, None, EngineConfig(num_slots=1, max_batch=2, max_len=16,
                                        steps_per_call=2, prefill_batch=1))
  ok, bad = eng.generate([dict(prompt=[3, 4, 5], max_new_tokens=4,
                               ignore_eos=True),
                          dict(prompt=[3], adapter="user1")])
  assert ok.tokens == _reference_greedy(base, None, [3, 4, 5], 4)
  assert "no adapter source" in bad.error
  assert jax.device_count() == 8


def test_stopping_a_stream_early_leaves_the_engine_idle(engine):
  reqs = [dict(prompt=[3, 4, 5], adapter=f"user{i}", max_new_tokens=6)
          for i in range(10)]
  for _ in engine.stream(reqs):
    break  # the consumer walks away after the first event
  assert engine.scheduler.idle
  assert sum(engine.residency.slots.refs.values()) == 0
  assert len(engine.generate(reqs)) == 10


def test_sharded_engine_on_a_mesh_matches_unsharded(base, source, engine):
  from mintjax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  meshed = Engine(base, source, EngineConfig(
      num_slots=4, max_batch=8, max_len=32, steps_per_call=4,
      prefill_batch=4, min_bucket=32, max_rank=8), mesh=mesh)
  rng = np.random.default_rng(3)
  reqs = [dict(prompt=_prompt(rng)[:20], adapter=None if i % 3 == 0 else
               f"user{i}", max_new_tokens=5, ignore_eos=True)
          for i in range(12)]
  got = meshed.generate(reqs)
  want = engine.generate(reqs)
  assert [g.tokens for g in got] == [w.tokens for w in want]
  assert meshed.stats()["backend_compiles_since_warmup"] == 0
  assert meshed.cache.k.sharding.spec == steps_lib.cache_sharding(
      CFG, 8, 32, mesh).k.spec


def test_committed_base_params_do_not_recompile_after_warmup(base, source):
  # Orbax restores committed arrays; the engine must still compile each step
  # once (a committed/uncommitted mix used to add a program after warm-up).
  import dataclasses  # pylint: disable=g-import-not-at-top
  committed = dataclasses.replace(
      base, params=jax.device_put(base.params, jax.devices()[0]))
  eng = Engine(committed, source, EngineConfig(
      num_slots=3, max_batch=4, max_len=48, steps_per_call=4,
      prefill_batch=2, min_bucket=16, max_rank=8))
  compiles = steps_lib.backend_compiles()
  reqs = [dict(prompt="hi there", adapter=f"user{i}", max_new_tokens=3)
          for i in range(4)]
  assert all(r.error is None for r in eng.generate(reqs))
  assert eng.compilations_since_warmup() == 0
  assert steps_lib.backend_compiles() == compiles
