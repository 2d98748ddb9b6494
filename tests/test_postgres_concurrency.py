"""Many processes against one PostgreSQL catalog at once.

Workers are real subprocesses of `tools/crash_test.py` given a registry
URL: they publish (single and bulk), resolve and load, move tags and run
gc concurrently, and some are SIGKILLed. The checks are the store's
invariants: gap-free revision numbers, every acknowledged revision loads
bit-exact, nothing half-published is visible, gc never touches a live
reservation or a committed shard, and every tag's history is one chain
(no lost update between concurrent movers).

Each starts several fresh interpreters (~20 s or more on 2 shared cores),
so they are marked `fleet` and run by `make test-fleet`; the single-process
registry suite on PostgreSQL (tests/test_postgres_registry.py) is in the
default run.
"""

import threading

import pytest

from mintjax.store.errors import LeaseExpiredError
from mintjax.store.postgres_catalog import PostgresCatalog
from mintjax.store.registry import Registry
from tools import crash_test

_FAILURES = ("lost", "unreadable", "wrong", "bad", "gaps", "verify_bad")


def test_connections_commit_reserve_tag_and_reclaim_at_once(
    postgres_server, tmp_path):
  # Catalog-level, in threads with a connection each (no interpreter
  # start-ups, so it runs in the default suite): every thread reserves
  # shards, commits revisions of the same two adapters and moves the same
  # tag, while another reclaims expired reservations, released at once by
  # a barrier so their transactions overlap.
  url = postgres_server.registry_url(str(tmp_path))
  reg = Registry.open(url)
  for aid in ("a", "b"):
    reg.create_adapter(aid, spec=dict(targets=("q",), rank=1, alpha=1.0),
                       base_fingerprint="sha256:" + "1" * 64,
                       shapes={"q": (1, 4, 4)})
  rec = reg.catalog.adapter("a")
  key, layout = rec["array_key"], rec["layout_json"]
  threads, rounds = 6, 12
  barrier = threading.Barrier(threads + 1)
  results, errors = [], []

  def work(t):
    cat = PostgresCatalog(reg.catalog._url, reg.catalog.schema)
    try:
      barrier.wait()
      for i in range(rounds):
        res = cat.reserve_shards(array_key=key, layout_json=layout,
                                 rows_per_shard=4, num_shards=1,
                                 lease_s=0.05 if i % 4 == 3 else 60)
        items = [dict(adapter_id="ab"[(t + k) % 2], parent="latest",
                      array_key=key, row=res.first_row + k,
                      sha256=f"s{t}.{i}.{k}", xxh3_64=k, provenance_json="{}",
                      meta_json="{}") for k in range(3)]
        try:
          nums, _, _ = cat.commit_revisions(res.token, items)
          results.append((res.first_shard, [(it["adapter_id"], n) for it,
                                            n in zip(items, nums)]))
        except LeaseExpiredError:
          results.append((res.first_shard, []))  # gc fenced it: fine.
        cat.set_tag("a", "prod", i + 1, f"t{t}")
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))
    finally:
      cat.close()

  def reclaim():
    cat = PostgresCatalog(reg.catalog._url, reg.catalog.schema)
    barrier.wait()
    for _ in range(40):
      cat.reclaim_expired(__import__("time").time())
    cat.close()

  pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
  pool.append(threading.Thread(target=reclaim))
  for th in pool:
    th.start()
  for th in pool:
    th.join(120)
  assert not errors, errors[:3]
  shards = [s for s, _ in results]
  assert len(shards) == threads * rounds == len(set(shards))
  assert sorted(shards) == list(range(len(shards)))  # Handed out once each.
  for aid in ("a", "b"):
    got = sorted(n for _, pairs in results for a, n in pairs if a == aid)
    assert got == list(range(1, len(got) + 1)), aid  # Gap-free, no repeats.
    assert [r.revision for r in reg.history(aid)] == got
  prev = None
  for e in reg.tag_history("a", "prod"):  # One chain: no lost update.
    assert e["old"] == prev, e
    prev = e["new"]
  assert len(reg.tag_history("a", "prod")) == threads * rounds


@pytest.mark.fleet
def test_processes_publish_concurrently_with_gap_free_numbers(
    postgres_server, tmp_path):
  url = postgres_server.registry_url(str(tmp_path / "store"))
  crash_test.run_concurrent(url, workers=3, count=6)
  reg = Registry.open(url, create=False)
  shared = reg.history("shared")
  assert [r.revision for r in shared] == list(range(1, 10))
  assert sorted(r.provenance["seed"] for r in shared) == sorted(
      w * 1000 + i for w in range(3) for i in range(0, 6, 2))
  for w in range(3):
    assert [r.revision for r in reg.history(f"own-{w}")] == [1, 2, 3]
  summary = crash_test.check(url, str(tmp_path / "no-ledger"))
  assert summary["revisions"] == 18 and summary["bad"] == 0, summary
  assert summary["gaps"] == 0 and summary["verify_bad"] == 0, summary
  rows = [(r.array_key, r.row) for r in reg.catalog.revisions()]
  assert len(set(rows)) == len(rows) == 18


@pytest.mark.fleet
def test_publish_resolve_tag_and_gc_at_once(postgres_server, tmp_path):
  url = postgres_server.registry_url(str(tmp_path / "store"))
  result = crash_test.run_scenario(str(tmp_path / "work"), duration_s=8.0,
                                   writers=3, readers=2, taggers=2,
                                   registry=url)
  assert not result["worker_failures"], result["worker_failures"]
  assert result["acked"] > 0 and result["loads"] > 0, result
  assert result["tag_moves"] > 0, result
  assert result["read_wrong"] == 0 and not result["read_errors"], result
  assert set(result["refused"]) <= {"LeaseExpiredError"}, result
  assert result["tag_chains_broken"] == 0, result
  check = result["check"]
  assert check["acked"] == result["acked"]
  assert all(check[k] == 0 for k in _FAILURES), check
  assert result["final_gc"]["reservations_left"] == 0
  assert result["final_gc"]["orphan_shards"] == 0


@pytest.mark.fleet
def test_sigkilled_writers_lose_nothing_on_postgres(postgres_server,
                                                    tmp_path):
  template = postgres_server.url + "?schema={name}&store=" + str(
      tmp_path / "{name}")
  tally = crash_test.run_trials(trials=6, per_registry=3, max_delay_s=0.8,
                                seed=11, registry=template)
  assert tally["trials"] == 6 and tally["kills"] >= 6, tally
  assert tally["acked"] > 0, tally
  bad = _FAILURES + ("reservations_left", "orphan_shards")
  assert {k: tally[k] for k in bad} == dict.fromkeys(bad, 0), tally
