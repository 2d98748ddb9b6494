"""EngineService: concurrent callers join one batch; cancel, 429, timeout, drain."""

import asyncio
import threading
import time

import numpy as np
import pytest

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve import steps as steps_lib
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams
from mintjax.serve.service import (EngineService, QueueFullError,
                                   ServiceClosedError, ServiceConfig)

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
NUM_ADAPTERS = 12


@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0, std=0.3)


@pytest.fixture(scope="module")
def engine(base):
  src = InMemoryAdapters()
  for i in range(NUM_ADAPTERS):
    src.publish(f"user{i}", AdapterWeights.random(
        CFG, TARGETS[:3 + i % 5], rank=2 + i % 7, seed=100 + i, std=0.3),
                base.fingerprint)
  return Engine(base, src, EngineConfig(
      num_slots=4, max_batch=4, max_len=64, steps_per_call=2,
      prefill_batch=2, min_bucket=16, max_rank=8))


@pytest.fixture
def service(engine):
  svc = EngineService(engine, ServiceConfig(max_queue=64)).start()
  yield svc
  svc.close(drain=False, timeout_s=30)
  assert engine.idle
  assert sum(engine.residency.slots.refs.values()) == 0


def _req(i, n=6, **kw):
  rng = np.random.default_rng(i)
  prompt = tuple(int(t) for t in rng.integers(3, 259, size=3 + i % 9))
  adapter = None if i % 4 == 0 else f"user{i % NUM_ADAPTERS}"
  return GenerationRequest(prompt=prompt, adapter=adapter, request_id=f"r{i}",
                           sampling=SamplingParams(max_new_tokens=n,
                                                   ignore_eos=True, **kw))


def _gate(service):
  """Blocks the engine thread until the returned event is set."""
  gate, entered = threading.Event(), threading.Event()
  service.call(lambda: (entered.set(), gate.wait(30)))
  assert entered.wait(30)
  return gate


def test_concurrent_threads_get_their_single_request_outputs(engine, service):
  reqs = [_req(i, n=1 + i % 7) for i in range(24)]
  want = [engine_alone.tokens for engine_alone in _alone(engine, reqs)]
  compiles = steps_lib.backend_compiles()
  got = [None] * len(reqs)

  def client(i):
    got[i] = service.submit(reqs[i]).wait()

  threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert [g.tokens for g in got] == want
  assert all(g.finish_reason == "length" for g in got)
  assert steps_lib.backend_compiles() == compiles


def _alone(engine, reqs):
  # Run on the test thread before the service owns the engine's batch:
  # the service fixture is idle until the first submit.
  return [engine.generate([r])[0] for r in reqs]


def test_a_late_request_joins_the_running_batch(service):
  long = service.submit(_req(1, n=40))
  first = next(iter(long))  # `long` is decoding now
  assert first[0].token is not None
  short = service.submit(_req(2, n=2))
  short.wait()
  assert long.result is None  # finished while `long` was still running
  long.wait()
  assert len(long.result.tokens) == 40


def test_cancel_frees_the_row_and_slot(engine, service):
  h = service.submit(_req(3, n=50))
  next(iter(h))
  service.cancel(h)
  res = h.wait()
  assert res.finish_reason == "cancelled" and "client" in res.error
  assert 0 < len(res.tokens) < 50
  done = service.call(lambda: (len(engine.scheduler.running),
                               sum(engine.residency.slots.refs.values())))
  assert done.result(30) == (0, 0)


def test_queue_full_raises_and_recovers(engine):
  svc = EngineService(engine, ServiceConfig(max_queue=3,
                                            retry_after_s=2.0)).start()
  try:
    gate = _gate(svc)
    handles = [svc.submit(_req(i, n=2)) for i in range(3)]
    with pytest.raises(QueueFullError, match="max_queue=3") as e:
      svc.submit(_req(9))
    assert e.value.retry_after_s == 2.0
    assert svc.snapshot()["queue_depth"] == 3
    gate.set()
    assert all(h.wait().finish_reason == "length" for h in handles)
    assert svc.submit(_req(9, n=1)).wait().error is None
  finally:
    svc.close()


def test_timeout_cancels_a_request(engine):
  svc = EngineService(engine, ServiceConfig(request_timeout_s=0.2)).start()
  try:
    gate = _gate(svc)
    h = svc.submit(_req(4, n=3))
    time.sleep(0.4)
    gate.set()
    res = h.wait()
    assert h.timed_out and res.finish_reason == "cancelled"
    assert "timed out" in res.error
    ok = svc.submit(_req(5, n=2), timeout_s=0).wait()
    assert ok.finish_reason == "length"
  finally:
    svc.close()


def test_unknown_adapter_is_refused_with_its_lookup_error(service):
  h = service.submit(GenerationRequest(prompt=(3, 4), adapter="nobody"))
  res = h.wait()
  assert h.refused and isinstance(h.exception, LookupError)
  assert res.finish_reason == "error" and "nobody" in res.error
  bad = service.submit(GenerationRequest(prompt=(3, 999)))
  assert "[0, 259)" in bad.wait().error and bad.refused


def test_async_callers_on_one_loop(engine, service):
  reqs = [_req(i, n=4) for i in range(8)]
  want = [r.tokens for r in _alone(engine, reqs)]

  async def one(r):
    h = service.submit(r, loop=asyncio.get_running_loop())
    streamed = []
    async for events in h:
      streamed += [e.token for e in events if e.token is not None]
    assert streamed == h.result.tokens
    return h.result.tokens

  async def main():
    return await asyncio.gather(*(one(r) for r in reqs))

  assert asyncio.run(main()) == want


def test_close_drains_running_requests_then_refuses(engine):
  svc = EngineService(engine).start()
  handles = [svc.submit(_req(i, n=8)) for i in range(6)]
  assert svc.close(drain=True, timeout_s=60)
  assert all(h.result.finish_reason == "length" for h in handles)
  with pytest.raises(ServiceClosedError, match="shutting down"):
    svc.submit(_req(0))
  assert engine.idle
