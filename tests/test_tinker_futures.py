"""Request futures of the Tinker service expire (bounded memory).

`mintjax.apps.tinker_service.futures.Futures` with a fake clock: no model,
no server, milliseconds; runs in the default suite. The HTTP side (an
expired id polled through the SDK's route) is in tests/test_tinker.py.
"""

import concurrent.futures

import pytest

from mintjax.apps.tinker_service.futures import ExpiredError, Futures


class Clock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def _futures(**kw):
  clock = Clock()
  return Futures(clock=clock, **kw), clock


def test_a_retrieved_result_stays_for_retain_s_then_expires_by_name():
  f, clock = _futures(retain_s=10, ttl_s=1000)
  rid = f.add(("fb", "m", 1), lambda: 42)["request_id"]
  fut, _ = f.get(rid)
  assert fut.result() == 42
  f.retrieved(rid)
  clock.t = 9.0
  assert f.get(rid)[0].result() == 42  # a retried poll: same answer
  clock.t = 11.0
  with pytest.raises(ExpiredError, match=f"request '{rid}' expired.*resubmit"):
    f.get(rid)
  assert len(f) == 0 and f.expired == 1


def test_an_unretrieved_result_expires_after_ttl_s():
  f, clock = _futures(retain_s=10, ttl_s=100)
  rid = f.add(None, lambda: "x")["request_id"]
  clock.t = 99.0
  assert f.get(rid)[0].result() == "x"  # got, but never marked retrieved
  clock.t = 101.0
  with pytest.raises(ExpiredError, match=rid):
    f.get(rid)


def test_at_most_max_done_results_are_kept_oldest_first():
  f, clock = _futures(max_done=3)
  rids = []
  for i in range(5):
    clock.t = float(i)
    rids.append(f.add(None, lambda i=i: i)["request_id"])
  clock.t = 10.0
  assert len(f) == 3
  for rid in rids[:2]:
    with pytest.raises(ExpiredError):
      f.get(rid)
  assert [f.get(r)[0].result() for r in rids[2:]] == [2, 3, 4]


def test_running_futures_never_expire_and_finish_time_counts():
  f, clock = _futures(retain_s=1, ttl_s=5)
  running = concurrent.futures.Future()
  rid = f.add(None, lambda: running)["request_id"]
  clock.t = 1000.0
  assert f.get(rid)[0] is running
  running.set_result("done")  # finishes at t=1000
  clock.t = 1004.0
  assert f.get(rid)[0].result() == "done"
  clock.t = 1006.0
  with pytest.raises(ExpiredError):
    f.get(rid)


def test_dedupe_key_is_dropped_with_its_result():
  f, clock = _futures(retain_s=1)
  calls = []
  start = lambda: calls.append(1) or len(calls)
  a = f.add(("optim", "m", 3), start)["request_id"]
  assert f.add(("optim", "m", 3), start)["request_id"] == a  # a resubmit
  f.retrieved(a)
  clock.t = 5.0
  b = f.add(("optim", "m", 3), start)["request_id"]
  assert b != a and len(calls) == 2


def test_an_id_never_issued_is_unknown_not_expired():
  f, _ = _futures()
  f.add(None, lambda: 1)
  for rid in ("req-2", "req-0", "bogus"):
    with pytest.raises(LookupError, match="unknown request_id") as e:
      f.get(rid)
    assert not isinstance(e.value, ExpiredError)


def test_a_refused_start_fails_its_future_not_the_call():
  f, _ = _futures()

  def start():
    raise ValueError("rank 99 is not served")
  rid = f.add(None, start)["request_id"]
  with pytest.raises(ValueError, match="rank 99"):
    f.get(rid)[0].result()
