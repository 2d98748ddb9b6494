"""The Tinker HTTP API (FastAPI): what the official `tinker` SDK calls.

Owns `create_app`. Routes, all under /api/v1/:

  service   healthz, client/config, client/dynamic_config, create_session,
            session_heartbeat, telemetry, get_server_capabilities
  training  create_model, get_info, forward_backward (protobuf body),
            optim_step, save_weights, save_weights_for_sampler,
            load_weights, unload_model
  sampling  create_sampling_session, samplers/{id}, asample
  futures   retrieve_future

Long-running calls answer at once with a future id ({'request_id'}); the
client polls `retrieve_future`, which waits up to `long_poll_s` for the
result and otherwise answers 'try_again'. `futures.py` keeps the results
(a retried poll gets the same answer for a while, then the result expires)
and de-duplicates a submission that repeats one already seen. forward_backward and asample results are protobuf
(`wire.py`), the rest JSON. A refused request fails its future with category
'user' and a message saying what to change; the SDK raises it as
`RequestFailedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from typing import Any, Callable

import fastapi
from fastapi import responses

from mintjax.apps.tinker_service import wire
from mintjax.apps.tinker_service.futures import ExpiredError, Futures
from mintjax.apps.tinker_service.sampler import Sampler
from mintjax.apps.tinker_service.inputs import (UserError, adam_payload,
                                                datum_rows, registry_ref)
from mintjax.apps.tinker_service.trainer import ATTN, MLP, Trainer
from mintjax.store.identity import check_name

PROTO = "application/x-protobuf"


def _error(e: BaseException) -> dict:
  user = isinstance(e, (UserError, LookupError, ValueError))
  return {"error": str(e) if user else f"{type(e).__name__}: {e}",
          "category": "user" if user else "server"}


def create_app(trainer: Trainer, sampler: Sampler, *, base_name: str,
               tokenizer_dir: str | None = None, long_poll_s: float = 10.0,
               executor_threads: int = 64,
               futures: Futures | None = None) -> fastapi.FastAPI:
  """The API over a running trainer and sampler (module docstring);
  `futures` sets the result expiry policy (default: `Futures()`)."""
  app = fastapi.FastAPI(title="mintjax Tinker-compatible service")
  futures = futures if futures is not None else Futures()
  pool = concurrent.futures.ThreadPoolExecutor(executor_threads,
                                               thread_name_prefix="tinker")
  sessions: dict[str, dict] = {}
  app.state.trainer, app.state.sampler, app.state.futures = (
      trainer, sampler, futures)
  max_len = trainer.config.max_len
  vocab = trainer.base.config.vocab_size

  async def body(request: fastapi.Request) -> dict:
    try:
      data = await request.json()
    except ValueError:
      raise fastapi.HTTPException(400, "the body must be JSON") from None
    if not isinstance(data, dict):
      raise fastapi.HTTPException(400, "the body must be a JSON object")
    return data

  def need(d: dict, key: str, kind=str):
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
      raise fastapi.HTTPException(400, f"'{key}' must be a {kind.__name__}")
    return v

  # --- service ----------------------------------------------------------------

  @app.get("/api/v1/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.post("/api/v1/client/config")
  async def client_config():
    # API keys only (no JWT exchange); plain httpx transport.
    return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False,
            "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": True,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": False}

  @app.post("/api/v1/client/dynamic_config")
  async def dynamic_config():
    return {"refresh_interval_sec": 3600, "sample_cancel_enabled": False}

  @app.post("/api/v1/create_session")
  async def create_session(request: fastapi.Request):
    d = await body(request)
    sid = f"session-{uuid.uuid4().hex[:12]}"
    sessions[sid] = {"tags": d.get("tags"), "metadata": d.get("user_metadata")}
    return {"type": "create_session", "session_id": sid}

  @app.post("/api/v1/session_heartbeat")
  async def heartbeat():
    return {"type": "session_heartbeat"}

  @app.post("/api/v1/telemetry")
  async def telemetry():
    return {"status": "accepted"}

  @app.get("/api/v1/mintjax/stats")
  async def stats():
    """Not a Tinker route: batching counters (tools/bench_tinker.py)."""
    return trainer.stats()

  @app.get("/api/v1/get_server_capabilities")
  async def capabilities():
    return {"supported_models": [{
        "model_name": base_name, "max_context_length": max_len,
        "trainable": True, "sampleable": True}]}

  # --- training ---------------------------------------------------------------

  @app.post("/api/v1/create_model")
  async def create_model(request: fastapi.Request):
    d = await body(request)
    sid, seq = need(d, "session_id"), need(d, "model_seq_id", int)
    lora = d.get("lora_config") or {}
    # The id the SDK derives for create-via-load too: (session, seq).
    model_id = f"{sid}:train:{seq}"

    def start():
      if d.get("base_model") != base_name:
        raise UserError(f"base model {d.get('base_model')!r} is not served; "
                        f"get_server_capabilities lists {base_name!r}")
      opt = (d.get("optimizer_config") or {}).get("type", "adamw")
      if opt != "adamw":
        raise UserError(f"optimizer {opt!r} is not supported; use Adam")
      targets = (ATTN if lora.get("train_attn", True) else ()) + (
          MLP if lora.get("train_mlp", True) else ())
      return trainer.create_tenant(
          model_id, rank=lora.get("rank", 32), targets=targets,
          session_id=sid, seed=lora.get("seed"),
          owner=str((d.get("user_metadata") or {}).get("user", "")))
    out = futures.add(("create_model", sid, seq), start)
    return dict(out, model_id=model_id)

  @app.post("/api/v1/get_info")
  async def get_info(request: fastapi.Request):
    d = await body(request)
    try:
      t = trainer.tenant(need(d, "model_id"))
    except UserError as e:
      raise fastapi.HTTPException(404, str(e)) from None
    return {"type": "get_info", "model_id": t.model_id, "is_lora": True,
            "lora_rank": t.rank, "model_name": base_name,
            "model_data": {"arch": trainer.base.config.architecture,
                           "model_name": base_name,
                           "tokenizer_id": tokenizer_dir}}

  @app.post("/api/v1/forward_backward")
  async def forward_backward(request: fastapi.Request):
    raw = await request.body()
    try:
      req = wire.decode_forward_backward(raw)
    except wire.WireError as e:
      raise fastapi.HTTPException(400, str(e)) from None

    def start():
      rows = datum_rows(req.data, req.loss_fn, req.loss_fn_config,
                        vocab=vocab, max_len=max_len,
                        forward_only=req.forward_only)
      return trainer.submit(trainer.tenant(req.model_id).model_id, "fwdbwd",
                            {"rows": rows})

    def encode(r):
      return wire.encode_forward_backward_output(
          {"logprobs": r["logprobs"], "elementwise_loss":
           r["elementwise_loss"]}, len(r["logprobs"]),
          {"loss:sum": r["loss_sum"]})
    return dict(futures.add(("fb", req.model_id, req.seq_id), start, encode),
                model_id=req.model_id)

  @app.post("/api/v1/optim_step")
  async def optim_step(request: fastapi.Request):
    d = await body(request)
    model_id = need(d, "model_id")
    params = d.get("adam_params", d.get("optimizer_params")) or {}
    start = lambda: trainer.submit(trainer.tenant(model_id).model_id,
                                   "optim", adam_payload(params))
    return dict(futures.add(("optim", model_id, d.get("seq_id")), start),
                model_id=model_id)

  def save(d: dict, kind: str):
    model_id = need(d, "model_id")
    name = d.get("path")
    session_seq = d.get("sampling_session_seq_id")

    def start():
      t = trainer.tenant(model_id)
      nm = name if name is not None else (
          f"step{t.optim_steps}-{uuid.uuid4().hex[:6]}")
      try:
        check_name(nm, "checkpoint name")
      except ValueError as e:
        raise UserError(str(e)) from None
      prov = {"user_metadata": d.get("user_metadata") or {},
              "tinker_request": kind}
      fut = trainer.submit(model_id, "save", (kind, nm, prov))
      if kind == "state" or name is not None:
        return fut
      # save_weights_and_get_sampling_client: answer with a session.
      out = concurrent.futures.Future()

      def chain(f):
        try:
          r = f.result()
          s = sampler.create_session(
              f"sampler-{uuid.uuid4().hex[:12]}", model_path=r["path"],
              base_model=None)
          out.set_result({"path": r["path"],
                          "sampling_session_id": s.session_id})
        except BaseException as e:  # pylint: disable=broad-except
          out.set_exception(e)
      fut.add_done_callback(chain)
      return out
    return dict(futures.add((kind, model_id, d.get("seq_id"), session_seq),
                            start), model_id=model_id)

  @app.post("/api/v1/save_weights")
  async def save_weights(request: fastapi.Request):
    return save(await body(request), "state")

  @app.post("/api/v1/save_weights_for_sampler")
  async def save_weights_for_sampler(request: fastapi.Request):
    return save(await body(request), "sampler")

  @app.post("/api/v1/load_weights")
  async def load_weights(request: fastapi.Request):
    d = await body(request)
    path, optimizer = need(d, "path"), bool(d.get("optimizer"))
    model_id = d.get("model_id")
    if model_id is None:  # create-via-load: a new client from a checkpoint
      model_id = f"{need(d, 'session_id')}:train:{need(d, 'model_seq_id', int)}"

      def start():
        ref = registry_ref(path)
        trainer.registry.resolve(ref)  # refuse a missing checkpoint now
        info = trainer.registry.adapter(ref.split(":")[0])["spec"]
        # The load queues behind the initialisation in the tenant's FIFO.
        trainer.create_tenant(
            model_id, rank=int(info["rank"]), targets=tuple(info["targets"]),
            session_id=need(d, "session_id"))
        return trainer.submit(model_id, "load", (path, optimizer))
      key = ("load", d.get("session_id"), d.get("model_seq_id"))
    else:
      start = lambda: trainer.submit(trainer.tenant(model_id).model_id,
                                     "load", (path, optimizer))
      key = ("load", model_id, d.get("seq_id"))
    return dict(futures.add(key, start), model_id=model_id)

  # --- sampling ---------------------------------------------------------------

  @app.post("/api/v1/create_sampling_session")
  async def create_sampling_session(request: fastapi.Request):
    d = await body(request)
    try:
      s = sampler.create_session(
          f"sampler-{uuid.uuid4().hex[:12]}", model_path=d.get("model_path"),
          base_model=d.get("base_model"))
    except UserError as e:
      raise fastapi.HTTPException(400, str(e)) from None
    return {"type": "create_sampling_session",
            "sampling_session_id": s.session_id}

  @app.get("/api/v1/samplers/{sampler_id}")
  async def get_sampler(sampler_id: str):
    try:
      s = sampler.session(sampler_id)
    except UserError as e:
      raise fastapi.HTTPException(404, str(e)) from None
    return {"sampler_id": s.session_id, "base_model": s.base_model,
            "model_path": s.model_path}

  @app.post("/api/v1/asample")
  async def asample(request: fastapi.Request):
    d = await body(request)
    sid = d.get("sampling_session_id")

    def start():
      if sid is not None:
        s = sampler.session(sid)
      else:  # direct addressing: model_path or base_model
        s = sampler.create_session(f"sampler-{uuid.uuid4().hex[:12]}",
                                   model_path=d.get("model_path"),
                                   base_model=d.get("base_model"))
      return pool.submit(sampler.sample, s, d)

    def encode(r):
      return wire.encode_sample_response(r["sequences"], r["prompt_logprobs"])
    key = ("sample", sid, d.get("seq_id")) if sid is not None else None
    out = futures.add(key, start, encode)
    n = d.get("num_samples", 1)
    n = n if isinstance(n, int) and 0 < n <= 64 else 1
    return dict(out, sample_sequence_ids=[f"{out['request_id']}-{i}"
                                          for i in range(n)])

  # --- futures ----------------------------------------------------------------

  @app.post("/api/v1/retrieve_future")
  async def retrieve_future(request: fastapi.Request):
    d = await body(request)
    rid = need(d, "request_id")
    try:
      fut, encode = futures.get(rid)
    except ExpiredError as e:
      return _error(e)
    except LookupError as e:
      raise fastapi.HTTPException(404, str(e)) from None
    if not fut.done():
      try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                               long_poll_s)
      except (asyncio.TimeoutError, Exception):  # pylint: disable=broad-except
        pass
    if not fut.done():
      return {"type": "try_again", "request_id": rid, "queue_state": "active"}
    futures.retrieved(rid)
    if fut.exception() is not None:
      return _error(fut.exception())
    try:
      out = encode(fut.result())
    except Exception as e:  # pylint: disable=broad-except
      return _error(e)
    if isinstance(out, bytes):
      return responses.Response(out, media_type=PROTO)
    return out

  @app.api_route("/api/v1/{rest:path}",
                 methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
  async def unsupported(rest: str):
    raise fastapi.HTTPException(
        404, f"this mintjax service does not implement /api/v1/{rest}; "
        "docs/TINKER.md lists the supported SDK calls")

  @app.on_event("shutdown")
  def _shutdown():
    pool.shutdown(wait=False, cancel_futures=True)

  return app
