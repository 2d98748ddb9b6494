"""The Tinker-compatible service, driven by the official `tinker` SDK.

One service (random tiny base, byte tokenizer, real registry, real
compiled steps) serves the whole module on 127.0.0.1; the acceptance
scripts in examples/ run against it at a small size. Marked `tinker`
(needs the `[tinker]` extra; `make test-tinker`).
"""

import concurrent.futures
import importlib.util
import os
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.tinker
tinker = pytest.importorskip("tinker")
from tinker import types  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example(name):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / "examples" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
  from configs import tinker_service  # pylint: disable=g-import-not-at-top
  from mintjax.apps.openai_server.server import ServerThread  # pylint: disable=g-import-not-at-top
  from mintjax.apps.tinker_service.server import build_service  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("tinker")
  c = tinker_service.get_config("tiny")
  c.registry, c.state_dir = str(d / "registry"), str(d / "state")
  c.engine.num_slots, c.engine.max_batch, c.engine.max_len = 6, 16, 64
  c.trainer.num_slots, c.trainer.batch_window_s = 24, 1.0
  c.server.long_poll_s = 2.0
  service = build_service(c)
  server = ServerThread(service.app).start()
  old = {k: os.environ.get(k) for k in ("TINKER_BASE_URL", "TINKER_API_KEY")}
  os.environ["TINKER_BASE_URL"] = f"http://127.0.0.1:{server.port}"
  os.environ["TINKER_API_KEY"] = "tml-placeholder"
  yield service
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()
  service.close()


@pytest.fixture(scope="module")
def client(svc):
  del svc
  return tinker.ServiceClient()


def _datum(ids, weights=None):
  return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                     loss_fn_inputs={"target_tokens": ids[1:], "weights":
                                     weights or [1.0] * (len(ids) - 1)})


def test_capabilities_list_the_served_base(client):
  models = client.get_server_capabilities().supported_models
  assert [m.model_name for m in models] == ["mintjax/tiny"]
  assert models[0].trainable and models[0].sampleable


def test_sft_example_lowers_every_users_loss(svc):
  out = _example("tinker_sft").main(["--users", "3", "--steps", "6",
                                     "--lr", "2e-2"])
  assert out["users"] == 3
  for u in out["per_user"]:
    assert u["loss_last"] < u["loss_first"] - 0.05, u
    assert 0.0 <= u["heldout_em"] <= 1.0
  # Each user is a registry identity with its sampler revision.
  ids = {a["id"] for a in svc.registry.list_adapters()}
  assert {u["model_id"].replace(":", ".") for u in out["per_user"]} <= ids


def test_rl_example_runs_grpo_and_leaves_a_bystander_bit_identical(svc):
  out = _example("tinker_rl").main(["--users", "2", "--steps", "3",
                                    "--group", "4", "--max_tokens", "4",
                                    "--lr", "2e-2"])
  assert out["bystander_unchanged"] is True
  for u in out["per_user"]:
    assert len(u["reward_curve"]) == 3
    assert all(0.0 <= r <= 1.0 for r in u["reward_curve"])
  assert svc.trainer.stats()["fwdbwd_calls"] > 0


def test_roundtrip_example_is_bit_exact_and_serves_through_openai(svc):
  out = _example("tinker_roundtrip").main(["--steps", "2"])
  assert out["same_logprobs_after_load"] is True
  assert out["bit_exact_after_next_step"] is True
  assert out["openai_matches_tinker"] is True
  rev = svc.registry.resolve(out["registry_ref"])
  assert rev.provenance["tinker_kind"] == "sampler"
  state = svc.registry.resolve(out["registry_ref"].replace("sampler-",
                                                            "state-"))
  assert state.provenance["tinker_kind"] == "state"
  assert state.provenance["steps"] == 2


def test_reload_without_optimizer_state_is_not_bit_exact(client):
  """Guards the round-trip check: without the Adam state the next step
  differs (so the example's equality means the state came back)."""
  rt = _example("tinker_roundtrip")
  a = client.create_lora_training_client(base_model="mintjax/tiny",
                                          rank=4).result()
  data = rt.datums(a.get_tokenizer())
  for _ in range(2):
    rt.step(a, data, 1e-2)
  path = a.save_state("noopt").result().path
  b = client.create_training_client_from_state(path).result()  # weights
  assert np.array_equal(rt.logprobs(a, data), rt.logprobs(b, data))
  rt.step(a, data, 1e-2)
  rt.step(b, data, 1e-2)
  assert not np.array_equal(rt.logprobs(a, data), rt.logprobs(b, data))


def test_concurrent_clients_share_compiled_steps(svc, client):
  before = svc.trainer.stats()
  tcs = [client.create_lora_training_client(base_model="mintjax/tiny",
                                            rank=2).result() for _ in range(4)]
  tok = tcs[0].get_tokenizer()
  data = [_datum(tok.encode(f"user {i} likes tea", add_special_tokens=False))
          for i in range(2)]

  def loop(tc):
    for _ in range(3):
      fb = tc.forward_backward(data, "cross_entropy")
      op = tc.optim_step(types.AdamParams(learning_rate=1e-2))
      fb.result()
      op.result()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(loop, tcs))
  after = svc.trainer.stats()
  calls = after["fwdbwd_calls"] - before.get("fwdbwd_calls", 0)
  ops = after["fwdbwd_ops"] - before.get("fwdbwd_ops", 0)
  ocalls = after["optim_calls"] - before.get("optim_calls", 0)
  oops = after["optim_ops"] - before.get("optim_ops", 0)
  assert ops == oops == 12
  # 4 clients x 3 steps: shared calls, not one call per request.
  assert ops / calls >= 2.0 and oops / ocalls >= 2.0, (calls, ocalls)


def test_batched_losses_equal_solo_losses(client):
  """A client's forward in a batch with others equals its forward alone."""
  tc = client.create_lora_training_client(base_model="mintjax/tiny",
                                          rank=4).result()
  other = client.create_lora_training_client(base_model="mintjax/tiny",
                                             rank=4).result()
  tok = tc.get_tokenizer()
  mine = [_datum(tok.encode("my dog is Rex", add_special_tokens=False))]
  theirs = [_datum(tok.encode(f"other text {i} here",
                              add_special_tokens=False)) for i in range(5)]
  solo = tc.forward(mine, "cross_entropy").result()
  f1 = tc.forward(mine, "cross_entropy")
  f2 = other.forward(theirs, "cross_entropy")
  together = f1.result()
  f2.result()
  np.testing.assert_allclose(together.loss_fn_outputs[0]["logprobs"].data,
                             solo.loss_fn_outputs[0]["logprobs"].data,
                             rtol=1e-5, atol=1e-6)


def test_bad_requests_fail_with_a_clear_message_and_change_nothing(svc,
                                                                   client):
  tc = client.create_lora_training_client(base_model="mintjax/tiny",
                                          rank=2).result()
  n_tenants = len(svc.trainer.tenants)
  bad = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                    loss_fn_inputs={"target_tokens": [6, 7]})
  with pytest.raises(Exception, match="has 2 entries but model_input has 3"):
    tc.forward_backward([bad], "cross_entropy").result()
  tc2 = client.create_lora_training_client(base_model="mintjax/tiny",
                                          rank=2).result()
  ok = _datum([5, 6, 7, 8])
  with pytest.raises(Exception, match="needs loss_fn_inputs\\['advantages'\\]"):
    tc2.forward_backward([ok], "importance_sampling").result()
  with pytest.raises(Exception, match="max_rank 16"):
    client.create_lora_training_client(base_model="mintjax/tiny",
                                       rank=64).result()
  with pytest.raises(Exception, match="not served"):
    client.create_lora_training_client(base_model="meta-llama/Llama-3-8B",
                                       rank=2).result()
  assert len(svc.trainer.tenants) == n_tenants + 1


def test_resubmitted_requests_get_the_same_future(svc):
  import httpx  # pylint: disable=g-import-not-at-top
  from tinker.proto.request_conv import forward_backward_request_to_proto  # pylint: disable=g-import-not-at-top
  base = os.environ["TINKER_BASE_URL"]
  s = httpx.post(f"{base}/api/v1/create_session", json={
      "tags": [], "user_metadata": None, "sdk_version": "x"}).json()
  m = httpx.post(f"{base}/api/v1/create_model", json={
      "session_id": s["session_id"], "model_seq_id": 0,
      "base_model": "mintjax/tiny", "lora_config": {"rank": 2}}).json()
  req = types.ForwardBackwardRequest(
      forward_backward_input=types.ForwardBackwardInput(
          data=[_datum([3, 4, 5, 6])], loss_fn="cross_entropy"),
      model_id=m["model_id"], seq_id=1)
  body = forward_backward_request_to_proto(req).SerializeToString()
  hdr = {"Content-Type": "application/x-protobuf"}
  ops_before = svc.trainer.stats().get("fwdbwd_ops", 0)
  r1 = httpx.post(f"{base}/api/v1/forward_backward", content=body,
                  headers=hdr).json()
  r2 = httpx.post(f"{base}/api/v1/forward_backward", content=body,
                  headers=hdr).json()
  assert r1["request_id"] == r2["request_id"]
  got = []
  for _ in range(2):  # a retried poll gets the same result
    while True:
      r = httpx.post(f"{base}/api/v1/retrieve_future", timeout=60, json={
          "request_id": r1["request_id"]})
      if r.headers["content-type"].startswith("application/x-protobuf"):
        got.append(r.content)
        break
  assert got[0] == got[1]
  # One forward-backward ran, not two.
  assert svc.trainer.stats()["fwdbwd_ops"] - ops_before == 1


def test_an_expired_future_is_refused_by_name(svc):
  """A retrieved result is dropped after `future_retain_s`; polling it again
  fails with an error naming the request (not a silent 404 or a hang)."""
  import httpx  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  base = os.environ["TINKER_BASE_URL"]
  s = httpx.post(f"{base}/api/v1/create_session", json={
      "tags": [], "user_metadata": None, "sdk_version": "x"}).json()
  rid = httpx.post(f"{base}/api/v1/create_model", json={
      "session_id": s["session_id"], "model_seq_id": 0,
      "base_model": "mintjax/tiny", "lora_config": {"rank": 2}}
                   ).json()["request_id"]
  poll = lambda: httpx.post(f"{base}/api/v1/retrieve_future", timeout=60,
                            json={"request_id": rid}).json()
  first = poll()
  while first.get("type") == "try_again":
    first = poll()
  assert "model_id" in first
  futures = svc.app.state.futures
  old = futures.retain_s
  futures.retain_s = 0.0
  try:
    time.sleep(1.1)  # the sweep runs at most once a second
    again = poll()
  finally:
    futures.retain_s = old
  assert again["category"] == "user"
  assert f"request '{rid}' expired" in again["error"]
  assert "resubmit" in again["error"]
