"""The Ray Serve fleet on this machine: 2 replicas, one PostgreSQL catalog,
weights on a local S3 server (moto), a tiny model.

Checks: every adapter's output equals a single local Engine's for the same
request (correct and isolated: each request gets its own adapter), requests
for one adapter stick to the replica that loaded it (multiplexed routing),
an adapter published while the fleet runs is served on its first request,
and the official `openai` client gets the same text through Serve's HTTP
proxy (127.0.0.1). Marked `fleet` (`make test-fleet`): Ray's start-up
alone takes tens of seconds on 2 shared cores.
"""

import functools
import time

import pytest

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.store.registry import Registry

pytestmark = pytest.mark.fleet

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
TARGETS = ("q", "v")
ENGINE = EngineConfig(num_slots=2, max_batch=4, max_len=32, steps_per_call=4,
                      prefill_batch=2, min_bucket=16, max_rank=4,
                      targets=TARGETS)
USERS = [f"u{i}" for i in range(4)]
PROMPTS = [[5, 17, 42, 99], [7, 3, 250], [11, 12, 13, 14, 15]]


def _weights(seed):
  return AdapterWeights.random(CFG, TARGETS, 4, alpha=8.0, seed=seed,
                               std=0.3)


@pytest.fixture(scope="module")
def fleet(postgres_server, s3_server):
  ray = pytest.importorskip("ray")
  serve = pytest.importorskip("ray.serve")
  from mintjax.apps.fleet import deployment, replica
  base_fn = functools.partial(random_base, CFG, seed=0, std=0.3)
  url = postgres_server.registry_url(s3_server.store_url(s3_server.bucket()))
  reg = Registry.open(url)
  fp = base_fn().fingerprint
  for i, u in enumerate(USERS + ["late"]):
    reg.create_adapter(u, spec=dict(targets=TARGETS, rank=4, alpha=8.0),
                       base_fingerprint=fp, config=CFG)
  for i, u in enumerate(USERS):
    reg.publish(u, _weights(i))
  ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False,
           log_to_driver=False, runtime_env={"env_vars": {
               "JAX_PLATFORMS": "cpu", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing"}})
  try:
    app = deployment.fleet_deployment(
        # Serve's LRU sized to the host cache (8 refs), not the 2 device
        # slots, so no adapter of the test is evicted from routing.
        replica.ReplicaConfig(url, base_fn, ENGINE, max_adapters=8),
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5})
    from tools import local_services
    port = local_services.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(app, name="fleet_test", route_prefix="/")
    yield dict(client=deployment.FleetClient(handle), registry=reg,
               url=url, base=base_fn, http=f"http://127.0.0.1:{port}")
  finally:
    serve.shutdown()
    ray.shutdown()
    reg.close()


def _reference(fleet, refs):
  """Greedy outputs of one local Engine over the same registry."""
  engine = Engine(fleet["base"](), Registry.open(fleet["url"]), ENGINE,
                  refs=())
  reqs = [dict(prompt=tuple(p), adapter=r, max_new_tokens=6,
               temperature=0.0)
          for r in refs for p in PROMPTS]
  return [list(x.tokens) for x in engine.generate(reqs)]


def test_outputs_correct_isolated_and_routed_by_adapter(fleet):
  client = fleet["client"]

  def ask(u, p):
    return client.generate(dict(prompt=p, model=u, max_tokens=6,
                                temperature=0.0))

  # First request per adapter: some replica loads it.
  holder = {u: ask(u, PROMPTS[0]).result()["replica"] for u in USERS}
  time.sleep(3.0)  # Replicas report their model ids to the router.
  # Then each adapter's requests, a few at a time (no replica saturated).
  results = []
  for _ in range(2):
    for u in USERS:
      futures = [(p, ask(u, p)) for p in PROMPTS]
      results += [(u, p, f.result()) for p, f in futures]
  want = dict(zip([(u, tuple(p)) for u in USERS for p in PROMPTS],
                  _reference(fleet, USERS)))
  for u, p, got in results:
    assert got["revision"] == f"{u}@1"
    assert got["tokens"] == want[(u, tuple(p))], (u, p)
  # Adapters differ, so isolation is visible: not all outputs are equal.
  assert len({tuple(v) for v in want.values()}) > len(PROMPTS)
  # Multiplexed routing: requests go to the replica holding the adapter
  # (random routing would send half of them elsewhere).
  at_holder = sum(got["replica"] == holder[u] for u, _, got in results)
  assert at_holder >= 0.8 * len(results), (holder, [
      (u, got["replica"]) for u, _, got in results])


def test_adapter_published_while_running_is_served_at_once(fleet):
  rev = fleet["registry"].publish("late", _weights(77))
  got = fleet["client"].generate(dict(prompt=PROMPTS[0], model="late",
                                      max_tokens=6, temperature=0.0)).result()
  assert got["revision"] == rev.ref == "late@1"
  assert got["tokens"] == _reference(fleet, ["late"])[0]
  rev2 = fleet["registry"].publish("late", _weights(78))
  got = fleet["client"].generate(dict(prompt=PROMPTS[0], model="late",
                                      max_tokens=6, temperature=0.0)).result()
  assert got["revision"] == rev2.ref == "late@2"  # One resolve per request.


def test_openai_api_through_serves_http_proxy(fleet):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=fleet["http"] + "/v1", api_key="unused",
                         max_retries=0, timeout=120)
  engine = Engine(fleet["base"](), Registry.open(fleet["url"]), ENGINE,
                  refs=())
  for u in USERS[:2]:
    raw = client.completions.with_raw_response.create(
        model=u, prompt=PROMPTS[1], max_tokens=6, temperature=0.0,
        extra_headers={"serve_multiplexed_model_id": u})
    (want,) = engine.generate([dict(prompt=tuple(PROMPTS[1]), adapter=u,
                                    max_new_tokens=6, temperature=0.0)])
    assert raw.headers["x-adapter-revision"] == f"{u}@1"
    assert raw.parse().choices[0].text == want.text
