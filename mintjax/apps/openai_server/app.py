"""FastAPI routes of the OpenAI-compatible server over an `EngineService`.

Owns `create_app`. Routes:
  POST /v1/completions, /v1/chat/completions   (stream: SSE ending [DONE])
  GET  /v1/models                              base + registry adapters
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   pin / unpin
  GET  /health, /metrics

`model` is the base's served name or an adapter ref ('alice', 'alice@3',
'alice:prod'). The engine thread resolves the ref once; the request then
runs on that exact revision, returned in the `X-Adapter-Revision` header
and the body's `adapter_revision` field. Errors use OpenAI's JSON: 400
malformed, 401 bad key, 404 unknown model, 429 queue full (Retry-After),
503 draining, 504 timed out. A client that disconnects cancels its
request, which frees its batch row at the next device call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator

import fastapi
from fastapi import responses
from starlette.exceptions import HTTPException as StarletteHTTPException

from mintjax.apps.openai_server import protocol as P
from mintjax.apps.openai_server.metrics import CONTENT_TYPE, ServerMetrics
from mintjax.serve.engine import Engine
from mintjax.serve.service import (EngineService, QueueFullError,
                                   RequestHandle, ServiceClosedError)

REVISION_HEADER = "X-Adapter-Revision"
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models",
              "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health",
              "/metrics")


class _ClientGone(Exception):
  """The client disconnected before its response was ready."""


class _CountRequests:
  """ASGI middleware: requests by endpoint and final status (stream-safe)."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    status = [499]  # stays 499 when the client leaves before a response

    async def counting_send(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, counting_send)
    finally:
      path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
      self.metrics.requests.labels(path, str(status[0])).inc()


def create_app(service: EngineService, *, model_name: str,
               api_key: str | None = None, default_max_tokens: int = 16,
               drain_timeout_s: float = 30.0,
               close_service: bool = True) -> fastapi.FastAPI:
  """The ASGI app; closing it (lifespan shutdown) drains the service.

  Args:
    service: a started service over a warmed-up engine.
    model_name: the base's name in `model` and /v1/models.
    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    default_max_tokens: max_tokens when a request gives none.
    drain_timeout_s: on shutdown, running requests get this long to finish.
    close_service: the app's shutdown closes the service (False when
      several apps share one service).
  """
  engine: Engine = service.engine
  metrics = ServerMetrics(service)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    if close_service:
      await asyncio.to_thread(service.close, True, drain_timeout_s)

  app = fastapi.FastAPI(title="mintjax OpenAI-compatible server",
                        lifespan=lifespan)
  app.state.service, app.state.metrics = service, metrics
  app.add_middleware(_CountRequests, metrics=metrics)

  @app.exception_handler(P.OpenAIError)
  async def _openai_error(_, e: P.OpenAIError):
    return responses.JSONResponse(e.body(), status_code=e.status,
                                  headers=e.headers)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    return responses.JSONResponse(
        P.OpenAIError(e.status_code, str(e.detail)).body(),
        status_code=e.status_code)

  def auth(request: fastapi.Request) -> None:
    if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
      raise P.OpenAIError(401, "missing or wrong API key; send "
                          "'Authorization: Bearer <key>'",
                          code="invalid_api_key")

  async def body_of(request: fastapi.Request) -> Any:
    try:
      return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise P.bad_request(f"the request body is not valid JSON ({e})"
                          ) from None

  async def on_engine(fn, *args):
    """Runs fn on the engine thread (registry and residency live there)."""
    try:
      return await asyncio.wrap_future(service.call(fn, *args))
    except ServiceClosedError as e:
      raise P.OpenAIError(503, str(e), type_="server_error") from None

  def adapter_for(model: str) -> str | None:
    return None if model == model_name else model

  # --- generation ----------------------------------------------------------

  def submit_all(gen_requests) -> list[RequestHandle]:
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
      for r in gen_requests:
        handles.append(service.submit(r, loop=loop))
    except QueueFullError as e:
      for h in handles:
        service.cancel(h, "another choice of this request was refused")
      raise P.OpenAIError(
          429, str(e), type_="rate_limit_error", code="queue_full",
          headers={"Retry-After": str(max(1, round(e.retry_after_s)))}
      ) from None
    except ServiceClosedError as e:
      raise P.OpenAIError(503, str(e), type_="server_error") from None
    return handles

  async def race_disconnect(request: fastapi.Request, aw):
    """Awaits `aw`; raises _ClientGone if the client disconnects first."""

    async def disconnected():
      while (await request.receive())["type"] != "http.disconnect":
        pass

    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(disconnected())
    try:
      done, _ = await asyncio.wait({task, watch},
                                   return_when=asyncio.FIRST_COMPLETED)
    finally:
      watch.cancel()
    if task not in done:
      task.cancel()
      raise _ClientGone()
    return task.result()

  def check_refused(h: RequestHandle, model: str) -> None:
    """Maps a request the engine refused to 404 / 400 / 504 / 500."""
    r = h.result
    if r is None or r.finish_reason not in ("error", "cancelled"):
      return
    if h.timed_out:
      raise P.OpenAIError(504, f"the request {r.error}; raise the server's "
                          "request_timeout_s or ask for fewer tokens",
                          type_="timeout_error")
    if isinstance(h.exception, LookupError):
      raise P.OpenAIError(
          404, f"the model {model!r} does not exist: {h.exception}; GET "
          "/v1/models lists the base and the adapters", param="model",
          code="model_not_found")
    if h.refused:
      raise P.bad_request(r.error.split(": ", 1)[-1])
    raise P.OpenAIError(500, f"generation failed: {r.error}",
                        type_="server_error")

  async def first_events(h: RequestHandle):
    it = h.__aiter__()
    return await it.__anext__(), it

  async def generate(request: fastapi.Request, chat: bool):
    auth(request)
    cls = P.ChatCompletionRequest if chat else P.CompletionRequest
    req = P.parse(cls, await body_of(request))
    kind = "chatcmpl" if chat else "cmpl"
    rid = P.new_id(kind)
    gen = P.to_generation_requests(req, adapter=adapter_for(req.model),
                                   default_max_tokens=default_max_tokens,
                                   request_id=rid)
    handles = submit_all(gen)
    try:
      if req.stream:
        # Wait for the first device call so refusals still get a status.
        first, it = await race_disconnect(request, first_events(handles[0]))
        check_refused(handles[0], req.model)
        stream = _sse(chat, req, rid, handles=handles, first=first,
                      first_it=it, service=service, metrics=metrics)
        return responses.StreamingResponse(
            stream, media_type="text/event-stream",
            headers={REVISION_HEADER: handles[0].revision or "base",
                     "Cache-Control": "no-cache"})
      results = await race_disconnect(
          request, asyncio.gather(*(h.wait_async() for h in handles)))
    except _ClientGone:
      for h in handles:
        service.cancel(h)
      return responses.Response(status_code=499)  # nobody reads it
    except BaseException:
      for h in handles:
        service.cancel(h)
      raise
    for h in handles:
      check_refused(h, req.model)
      metrics.observe(h)
    body = _response(chat, req, rid, handles, results, engine)
    return responses.JSONResponse(
        body, headers={REVISION_HEADER: handles[0].revision or "base"})

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await generate(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await generate(request, chat=True)

  # --- models and pinning --------------------------------------------------

  @app.get("/v1/models")
  async def models(request: fastapi.Request):
    auth(request)
    adapters = await on_engine(_list_adapters, engine)
    created = int(time.time())
    data = [{"id": model_name, "object": "model", "created": created,
             "owned_by": "mintjax", "root": model_name, "parent": None,
             "base_fingerprint": engine.base.fingerprint}]
    for a in adapters:
      data.append({"id": a["id"], "object": "model",
                   "created": int(a.get("created") or created),
                   "owned_by": a.get("owner") or "mintjax", "root": a["id"],
                   "parent": model_name, "revisions": a["revisions"],
                   "tags": a["tags"]})
    return {"object": "list", "data": data}

  async def pin_request(request: fastapi.Request, pin: bool):
    auth(request)
    body = await body_of(request)
    name = body.get("lora_name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
      raise P.bad_request("give 'lora_name': an adapter ref such as "
                          "'alice', 'alice@3' or 'alice:prod'", "lora_name")
    if isinstance(body, dict) and body.get("lora_path"):
      raise P.bad_request(
          "lora_path is not supported: adapters come from the registry; "
          "import a PEFT folder first (python -m tools.mint import-peft) and "
          "pass its id as lora_name", "lora_path")
    try:
      if pin:
        slot = await on_engine(engine.pin, name)
        rev = await on_engine(engine.resolve, name)
        return {"status": "pinned", "lora_name": name,
                "adapter_revision": rev, "slot": slot}
      await on_engine(engine.unpin, name)
      return {"status": "unpinned", "lora_name": name}
    except LookupError as e:
      raise P.OpenAIError(404, f"the adapter {name!r} does not exist: {e}",
                          param="lora_name", code="model_not_found") from None
    except (ValueError, RuntimeError) as e:
      raise P.bad_request(str(e), "lora_name") from None

  @app.post("/v1/load_lora_adapter")
  async def load_lora_adapter(request: fastapi.Request):
    return await pin_request(request, pin=True)

  @app.post("/v1/unload_lora_adapter")
  async def unload_lora_adapter(request: fastapi.Request):
    return await pin_request(request, pin=False)

  # --- operations ----------------------------------------------------------

  @app.get("/health")
  async def health():
    snap = service.snapshot()
    ok = service.alive
    body = {"status": "ok" if ok else "unavailable",
            "queue_depth": snap["queue_depth"], "running": snap["running"],
            "last_error": snap["last_error"]}
    return responses.JSONResponse(body, status_code=200 if ok else 503)

  @app.get("/metrics")
  async def metrics_route():
    return responses.Response(metrics.render(), media_type=CONTENT_TYPE)

  return app


def _list_adapters(engine: Engine) -> list[dict]:
  """Registry adapters with revisions and tags (engine thread only)."""
  source = engine.residency.source if engine.residency is not None else None
  if source is None or not hasattr(source, "list_adapters"):
    return []
  out = []
  for a in source.list_adapters():
    revisions = [r.revision for r in source.history(a["id"])]
    out.append(dict(id=a["id"], owner=a.get("owner"),
                    created=a.get("created"), revisions=revisions,
                    tags=dict(a.get("tags") or source.tags(a["id"]))))
  return out


def _choice_text(chat: bool, text: str, index: int, finish: str | None,
                 logprobs: dict | None, first: bool = False) -> dict:
  if not chat:
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": finish}
  delta = {"role": "assistant", "content": text} if first else (
      {"content": text} if text else {})
  return {"index": index, "delta": delta, "logprobs": logprobs,
          "finish_reason": finish}


def _response(chat: bool, req, rid: str, handles, results, engine) -> dict:
  tok = engine.tokenizer
  choices = []
  for i, r in enumerate(results):
    if chat:
      lp = (P.chat_logprobs(tok, r.tokens, r.logprobs,
                            req.return_tokens_as_token_ids, r.top_logprobs)
            if req.logprobs else None)
      choices.append({"index": i, "message": {"role": "assistant",
                                              "content": r.text},
                      "logprobs": lp, "finish_reason": P.finish_reason(r)})
    else:
      prefix = _echo_text(req, engine) if req.echo else ""
      toks, lps, top = r.tokens, r.logprobs, r.top_logprobs
      offset = len(prefix)
      if req.echo and r.prompt_logprobs is not None:
        # Echo with logprobs: the prompt's tokens come first (OpenAI).
        toks = _echo_ids(req, engine) + toks
        lps = r.prompt_logprobs + lps
        top = (r.prompt_top_logprobs + top) if top is not None else None
        offset = 0
      lp = (P.completion_logprobs(tok, toks, lps, offset,
                                  req.return_tokens_as_token_ids, top)
            if req.logprobs is not None else None)
      choices.append({"index": i, "text": prefix + r.text, "logprobs": lp,
                      "finish_reason": P.finish_reason(r)})
  kind = "chat.completion" if chat else "text_completion"
  return P.envelope(kind, rid, req.model, choices, handles[0].revision,
                    P.usage(results))


def _echo_ids(req, engine) -> list[int]:
  """The prompt's token ids as the engine tokenized it (no bos)."""
  p = P.prompt_of(req)
  return list(p) if not isinstance(p, str) else engine.tokenizer.encode(p)


def _echo_text(req, engine) -> str:
  p = P.prompt_of(req)
  if isinstance(p, str):
    return p
  return engine.tokenizer.decode(list(p)) if engine.tokenizer else ""


async def _sse(chat: bool, req, rid: str, *, handles: list[RequestHandle],
               first: list, first_it, service: EngineService,
               metrics: ServerMetrics) -> AsyncIterator[str]:
  """Server-sent events of all choices, interleaved as tokens arrive."""
  engine = service.engine
  kind = "chat.completion.chunk" if chat else "text_completion"
  rev = handles[0].revision
  stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
  prefix = _echo_text(req, engine) if not chat and req.echo else ""
  want_lp = bool(req.logprobs) if chat else req.logprobs is not None
  tasks: list[asyncio.Future] = []

  async def merged() -> AsyncIterator[tuple[int, list]]:
    """(choice, events) as they arrive; one choice needs no tasks."""
    yield 0, first
    if len(handles) == 1:
      async for events in first_it:
        yield 0, events
      return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, it):
      try:
        async for events in it:
          await queue.put((i, events))
      finally:
        await queue.put((i, None))

    tasks.extend(asyncio.ensure_future(pump(i, it)) for i, it in enumerate(
        [first_it] + [h.__aiter__() for h in handles[1:]]))
    open_streams = len(handles)
    while open_streams:
      i, events = await queue.get()
      if events is None:
        open_streams -= 1
      else:
        yield i, events

  def chunk(choices, usage=None) -> str:
    return "data: " + json.dumps(P.envelope(kind, rid, req.model, choices,
                                            rev, usage)) + "\n\n"

  deltas = [P.TextDeltas(engine.tokenizer, stop, prefix) for _ in handles]
  offsets = [len(prefix)] * len(handles)
  started = [False] * len(handles)
  events_of = merged()
  try:
    async for i, events in events_of:
      toks = [e.token for e in events if e.token is not None]
      lps = [e.logprob for e in events if e.token is not None]
      tops = [e.top_logprobs for e in events if e.token is not None]
      tops = tops if all(t is not None for t in tops) else None
      result = events[-1].result
      if result is not None and result.finish_reason in ("error",
                                                         "cancelled"):
        err = P.OpenAIError(504 if handles[i].timed_out else 500,
                            f"generation stopped: {result.error}",
                            type_="server_error")
        yield "data: " + json.dumps(err.body()) + "\n\n"
        break
      text = deltas[i].add(toks)
      if result is not None:
        text += deltas[i].finish(result.text)
      lp = None
      if want_lp and toks:
        as_ids = req.return_tokens_as_token_ids
        if chat:
          lp = P.chat_logprobs(engine.tokenizer, toks, lps, as_ids, tops)
        else:
          lp = P.completion_logprobs(engine.tokenizer, toks, lps, offsets[i],
                                     as_ids, tops)
          offsets[i] += sum(len(t) for t in lp["tokens"])
      finish = P.finish_reason(result) if result is not None else None
      if text or lp or finish or (chat and not started[i]):
        yield chunk([_choice_text(chat, text, i, finish, lp,
                                  first=chat and not started[i])])
        started[i] = True
      if result is not None:
        metrics.observe(handles[i])
    else:
      opts = req.stream_options or {}
      if opts.get("include_usage"):
        yield chunk([], P.usage([h.result for h in handles]))
      yield "data: [DONE]\n\n"
  finally:
    for h in handles:
      if h.result is None:  # the client left mid-stream: free the row
        service.cancel(h)
    for t in tasks:
      t.cancel()
    await events_of.aclose()
