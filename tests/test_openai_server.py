"""OpenAI server: the real `openai` SDK against a live server on 127.0.0.1.

A tiny random model and a real registry (50 adapters, tensorstore files,
SQLite catalog) served through 8 device slots. References are computed by
the same engine, one request at a time, before the server owns it.
"""

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from mintjax.adapters.spec import AdapterWeights
from mintjax.apps.openai_server.app import REVISION_HEADER, create_app
from mintjax.apps.openai_server.server import ServerThread
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.sampling import SamplingParams
from mintjax.serve.service import EngineService, ServiceConfig
from mintjax.store.registry import Registry

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
ENGINE = EngineConfig(num_slots=8, max_batch=8, max_len=64, steps_per_call=4,
                      prefill_batch=4, min_bucket=16, max_rank=8)
BASE = "tiny-base"
NUM_ADAPTERS = 50
NUM_ISOLATION = 200
MAX_QUEUE = 256


def _build_registry(path, base):
  reg = Registry.open(path)
  ids = [f"u{i}" for i in range(NUM_ADAPTERS)]
  reg.create_adapters(ids, spec=dict(targets=["q", "v", "down"], rank=4,
                                     alpha=8.0),
                      base_fingerprint=base.fingerprint)
  # u0 twice: u0@2 is a second revision (one batched publish).
  reg.publish_many([(a, AdapterWeights.random(
      CFG, ("q", "v", "down"), 4, alpha=8.0, seed=i, std=0.3), {})
                    for i, a in enumerate(ids + ["u0"])])
  reg.tag("u0@1", "prod")
  return reg


def _isolation_requests():
  rng = np.random.default_rng(7)
  out = []
  for i in range(NUM_ISOLATION):
    a = i % (NUM_ADAPTERS + 1)
    model = BASE if a == NUM_ADAPTERS else f"u{a}"
    prompt = [int(t) for t in rng.integers(3, 259, size=rng.integers(2, 20))]
    out.append((model, tuple(prompt), int(rng.integers(1, 7))))
  return out


def _gen(model, prompt, n):
  return GenerationRequest(
      prompt=tuple(prompt), adapter=None if model == BASE else model,
      sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  base = random_base(CFG, seed=0, std=0.3)
  reg_dir = tmp_path_factory.mktemp("reg")
  reg = _build_registry(reg_dir, base)
  engine = Engine(base, reg, ENGINE)
  # Single-request references, before the service owns the engine.
  refs = {k: engine.generate([_gen(*k)])[0].tokens
          for k in _isolation_requests()}
  service = EngineService(engine, ServiceConfig(max_queue=MAX_QUEUE)).start()
  server = ServerThread(create_app(service, model_name=BASE)).start()
  yield dict(base=base, reg_dir=reg_dir, engine=engine, service=service,
             server=server, refs=refs)
  server.stop()
  assert not service.alive


@pytest.fixture(scope="module")
def client(setup):
  return openai.OpenAI(base_url=setup["server"].base_url, api_key="none",
                       max_retries=0, timeout=60)


def _metrics(setup) -> dict[str, float]:
  text = httpx.get(setup["server"].base_url[:-3] + "/metrics").text
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      out[name] = float(value)
  return out


def _tokens(choice) -> list[int]:
  return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


def test_completion_adapter_revision_header_and_body(client, setup):
  model, prompt, n = _isolation_requests()[3]
  raw = client.completions.with_raw_response.create(
      model="u0:prod", prompt=list(prompt), max_tokens=4, temperature=0,
      extra_body=dict(ignore_eos=True))
  assert raw.headers[REVISION_HEADER] == "u0@1"
  r = raw.parse()
  assert r.model_extra["adapter_revision"] == "u0@1"
  assert r.usage.prompt_tokens == len(prompt)
  assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
  latest = client.completions.create(model="u0", prompt=list(prompt), max_tokens=4,
                                     temperature=0, logprobs=0,
                                     extra_body=dict(ignore_eos=True))
  assert latest.model_extra["adapter_revision"] == "u0@2"
  assert len(latest.choices[0].logprobs.token_logprobs) == 4
  del model, n


def test_mixed_adapters_async_streaming_equal_references(setup):
  reqs = _isolation_requests()[:24]

  async def one(ac, model, prompt, n):
    stream = await ac.completions.create(
        model=model, prompt=list(prompt), max_tokens=n, temperature=0, logprobs=0,
        stream=True, extra_body=dict(ignore_eos=True))
    toks = []
    async for chunk in stream:
      if chunk.choices and chunk.choices[0].logprobs:
        toks += [lp for lp in chunk.choices[0].logprobs.token_logprobs]
    return len(toks)

  async def main():
    async with openai.AsyncOpenAI(base_url=setup["server"].base_url,
                                  api_key="x", max_retries=0) as ac:
      return await asyncio.gather(*(one(ac, *r) for r in reqs))

  counts = asyncio.run(main())
  assert counts == [n for _, _, n in reqs]


def test_isolation_200_requests_50_adapters_8_slots(setup):
  reqs = _isolation_requests()
  before = _metrics(setup)

  async def one(ac, model, prompt, n):
    r = await ac.completions.create(model=model, prompt=list(prompt), max_tokens=n,
                                    temperature=0, logprobs=0,
                                    extra_body=dict(ignore_eos=True,
                                                    return_tokens_as_token_ids=True))
    return _tokens(r.choices[0])

  async def main():
    async with openai.AsyncOpenAI(base_url=setup["server"].base_url,
                                  api_key="x", max_retries=0,
                                  timeout=120) as ac:
      return await asyncio.gather(*(one(ac, *r) for r in reqs))

  got = asyncio.run(main())
  for req, tokens in zip(reqs, got):
    assert tokens == setup["refs"][req], req
  after = _metrics(setup)
  evict = 'mintjax_residency_evictions_total{tier="device"}'
  assert after[evict] - before.get(evict, 0) > 20  # 8 slots really churned
  assert after["mintjax_compilations_since_warmup"] == 0
  assert after["mintjax_backend_compiles_since_warmup"] == 0
  assert after["mintjax_time_to_first_token_seconds_count"] >= NUM_ISOLATION


def test_chat_stream_equals_non_stream_and_ends_with_done(client, setup):
  msgs = [{"role": "user", "content": "hello there"}]
  kw = dict(model="u5", messages=msgs, max_tokens=12, temperature=0.8,
            seed=11, stop=["q"], extra_body=dict(ignore_eos=True, top_k=40))
  whole = client.chat.completions.create(**kw)
  chunks = list(client.chat.completions.create(
      stream=True, stream_options={"include_usage": True}, **kw))
  text = "".join(c.choices[0].delta.content or "" for c in chunks
                 if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[0].choices[0].delta.role == "assistant"
  assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
  with httpx.stream("POST", setup["server"].base_url + "/chat/completions",
                    json=dict(kw.pop("extra_body"), stream=True, **kw)) as r:
    lines = [ln for ln in r.iter_lines() if ln]
  assert lines[-1] == "data: [DONE]"
  assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"]


def test_n_seed_stop_echo(client):
  kw = dict(model=BASE, prompt="abc", max_tokens=8, temperature=1.0, seed=3,
            extra_body=dict(ignore_eos=True))
  a = client.completions.create(n=3, **kw)
  b = client.completions.create(n=3, **kw)
  assert [c.text for c in a.choices] == [c.text for c in b.choices]
  assert len({c.text for c in a.choices}) > 1
  assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == 3
  probe = client.completions.create(model=BASE, prompt="abc", max_tokens=8,
                                    temperature=0,
                                    extra_body=dict(ignore_eos=True))
  text = probe.choices[0].text
  stop = text[3:5]
  cut = client.completions.create(model=BASE, prompt="abc", max_tokens=8,
                                  temperature=0, stop=stop, echo=True,
                                  extra_body=dict(ignore_eos=True))
  assert cut.choices[0].text == "abc" + text[:text.index(stop)]
  assert cut.choices[0].finish_reason == "stop"


def test_top_logprobs_and_echoed_prompt_logprobs(client):
  """Chat top_logprobs, completions logprobs=n (stream too) and echo with
  logprobs carry the engine's alternatives and prompt logprobs."""
  ids = dict(return_tokens_as_token_ids=True, ignore_eos=True)
  chat = client.chat.completions.create(
      model="u1", messages=[{"role": "user", "content": "hey"}], max_tokens=3,
      temperature=0, logprobs=True, top_logprobs=3, extra_body=ids)
  for c in chat.choices[0].logprobs.content:
    assert len(c.top_logprobs) == 3
    assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (
        c.token, c.logprob)
  prompt = [5, 6, 7, 8]
  echo = client.completions.create(
      model="u1", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
      echo=True, extra_body=ids).choices[0].logprobs
  assert _tokens_of(echo.tokens)[:4] == prompt
  assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None
  assert all(len(t) == 2 for t in echo.top_logprobs[1:])
  # After the echoed prompt come exactly the plain response's logprobs.
  plain = client.completions.create(
      model="u1", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
      extra_body=ids).choices[0].logprobs
  assert echo.token_logprobs[4:] == pytest.approx(plain.token_logprobs,
                                                  abs=1e-5)
  assert echo.top_logprobs[4:] == plain.top_logprobs
  chunks = client.completions.create(
      model="u1", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
      stream=True, extra_body=ids)
  streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
              for t in ch.choices[0].logprobs.top_logprobs]
  assert streamed == plain.top_logprobs


def _tokens_of(texts) -> list[int]:
  return [int(t.split(":")[1]) for t in texts]


def test_bad_requests_and_unknown_models(client, setup):
  ok = dict(model=BASE, prompt="hi", max_tokens=2)
  cases = [
      (dict(ok, temperature=-1), "temperature"),
      (dict(ok, logprobs=21), "logprobs"),
      (dict(ok, n=0), "n"),
      (dict(ok, prompt=list(range(3, 70))), "max_len is 64"),
      (dict(ok, prompt=[3, 999]), "[0, 259)"),
      (dict(ok, prompt=["a", "b"]), "2 prompts"),
      (dict(ok, presence_penalty=0.5), "presence_penalty"),
      (dict(ok, extra_body=dict(bogus=1)), "bogus"),
      (dict(ok, model="u0@notanumber"), "u0@notanumber"),
  ]
  for kw, needle in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.completions.create(**kw)
    assert needle in e.value.message, (kw, e.value.message)
    assert e.value.body["type"] == "invalid_request_error"
  with pytest.raises(openai.BadRequestError, match="needs logprobs=true"):
    client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "x"}],
        top_logprobs=2)
  for model in ("nobody", "u0@9", "u0:staging"):
    with pytest.raises(openai.NotFoundError) as e:
      client.completions.create(**dict(ok, model=model))
    assert e.value.code == "model_not_found"
  r = httpx.post(setup["server"].base_url + "/completions", content=b"{nope")
  assert r.status_code == 400 and "not valid JSON" in r.json()["error"][
      "message"]
  assert client.completions.create(**ok).choices[0].finish_reason


def test_models_list_revisions_and_tags(client):
  models = {m.id: m for m in client.models.list()}
  assert BASE in models and len(models) == NUM_ADAPTERS + 1
  u0 = models["u0"].model_extra
  assert u0["revisions"] == [1, 2] and u0["tags"] == {"prod": 1}
  assert u0["parent"] == BASE


def test_load_and_unload_lora_adapter_pin(setup):
  url, service = setup["server"].base_url, setup["service"]
  engine = service.engine
  r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "u7"})
  assert r.status_code == 200 and r.json()["adapter_revision"] == "u7@1"
  slot = r.json()["slot"]
  pinned = service.call(lambda: set(engine.residency.slots.pinned)).result()
  assert slot in pinned
  r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "u7"})
  assert r.status_code == 200
  pinned = service.call(lambda: set(engine.residency.slots.pinned)).result()
  assert slot not in pinned
  assert httpx.post(url + "/load_lora_adapter",
                    json={"lora_name": "ghost"}).status_code == 404
  r = httpx.post(url + "/load_lora_adapter",
                 json={"lora_name": "u1", "lora_path": "/tmp/x"})
  assert r.status_code == 400 and "registry" in r.json()["error"]["message"]


def _gate(service):
  gate, entered = threading.Event(), threading.Event()
  service.call(lambda: (entered.set(), gate.wait(60)))
  assert entered.wait(60)
  return gate


def test_queue_full_answers_429_with_retry_after(client, setup):
  service = setup["service"]
  gate = _gate(service)
  try:
    held = [service.submit(_gen(BASE, [3, 4], 1)) for _ in range(MAX_QUEUE)]
    with pytest.raises(openai.RateLimitError) as e:
      client.completions.create(model=BASE, prompt="hi", max_tokens=2)
    assert e.value.response.headers["Retry-After"] == "1"
    assert "max_queue=256" in e.value.message
  finally:
    gate.set()
  assert all(h.wait().finish_reason == "length" for h in held)
  assert client.completions.create(model=BASE, prompt="hi", max_tokens=1)


def test_client_disconnect_cancels_and_frees_the_row(setup):
  service = setup["service"]
  cancelled = service.snapshot()["outcomes"]["cancelled"]
  with httpx.stream("POST", setup["server"].base_url + "/completions",
                    json=dict(model="u3", prompt=[5, 6, 7], max_tokens=60,
                              temperature=0, stream=True,
                              ignore_eos=True)) as r:
    first = next(r.iter_lines())
    assert first.startswith("data: ")
    gate = _gate(service)  # hold the engine while the client walks away
  time.sleep(0.5)
  gate.set()
  deadline = time.monotonic() + 30
  while service.snapshot()["outcomes"]["cancelled"] == cancelled:
    assert time.monotonic() < deadline, "disconnect did not cancel"
    time.sleep(0.05)
  snap = service.snapshot()
  assert snap["running"] == 0 and snap["queue_depth"] == 0
  generated = snap["stats"]["generated_tokens"]
  time.sleep(0.3)
  assert service.snapshot()["stats"]["generated_tokens"] == generated


def test_bearer_auth_on_a_second_app(setup):
  app = create_app(setup["service"], model_name=BASE, api_key="s3cret",
                   close_service=False)
  srv = ServerThread(app).start()
  try:
    bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      bad.models.list()
    good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret",
                         max_retries=0)
    assert good.completions.create(model=BASE, prompt="x", max_tokens=1)
    assert httpx.get(srv.base_url[:-3] + "/health").status_code == 200
  finally:
    srv.stop()
  assert setup["service"].alive


def test_restart_on_the_same_registry(setup):
  """A new process-equivalent (registry reopened, new engine) serves the
  same adapters with the same outputs."""
  reqs = [r for r in _isolation_requests()[:12] if len(r[1]) + r[2] <= 32]
  # One prompt bucket keeps the second engine's compile short.
  small = dataclasses.replace(ENGINE, max_len=32, min_bucket=32)
  engine = Engine(setup["base"], Registry.open(setup["reg_dir"]), small)
  for round_ in range(2):
    service = EngineService(engine).start()
    srv = ServerThread(create_app(service, model_name=BASE)).start()
    try:
      c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
      assert len(c.models.list().data) == NUM_ADAPTERS + 1
      for model, prompt, n in reqs:
        r = c.completions.create(model=model, prompt=list(prompt), max_tokens=n,
                                 temperature=0, logprobs=0,
                                 extra_body=dict(
                                     ignore_eos=True, return_tokens_as_token_ids=True))
        assert _tokens(r.choices[0]) == setup["refs"][(model, prompt, n)]
    finally:
      srv.stop()
    assert not service.alive, round_


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_drains_a_running_stream_then_exits(tmp_path):
  port = _free_port()
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.openai_server",
       "--config=configs/openai_server.py:tiny",
       f"--config.server.port={port}", "--config.server.log_level=warning",
       "--config.engine.max_batch=2", "--config.engine.prefill_batch=1",
       "--config.engine.steps_per_call=1", "--config.engine.max_len=64",
       "--config.engine.min_bucket=64",
       "--config.engine.num_slots=1"],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
      assert time.monotonic() < deadline, "server did not start"
      try:
        if httpx.get(url + "/health").status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    body = dict(model="mintjax-tiny", prompt=[5, 6], max_tokens=60,
                temperature=0, stream=True, ignore_eos=True)
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      timeout=60) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      proc.send_signal(signal.SIGTERM)
      rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
