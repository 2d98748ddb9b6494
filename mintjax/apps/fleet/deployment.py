"""The fleet on Ray Serve: N `FleetReplica`s with adapter-affinity routing.

Owns `fleet_deployment` (the Serve application) and `FleetClient` (calls
through a deployment handle). Routing uses Serve's model multiplexing with
the adapter ref as the multiplexed model id: Serve's router prefers a
replica that already holds the ref, and a replica loads a new ref through
`FleetReplica.load` (its `@serve.multiplexed` loader), keeping at most
`ReplicaConfig.capacity` refs (its device slots), least recently used
first out. Requests without an adapter (the base) carry no model id and go
to any replica.

HTTP (Serve's proxy routes on the header `serve_multiplexed_model_id:
<adapter ref>`): the OpenAI-compatible API under /v1/ (the replica's
`mintjax.apps.openai_server` app: completions, chat completions, models),
or POST / with a `GenerationRequest` JSON body whose 'model' (or
'adapter') names the same ref as the header.

`ray` is imported when a deployment is built (`pip install
'mintjax[fleet]'`), never by `import mintjax`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

from mintjax.apps.fleet.replica import FleetReplica, ReplicaConfig

__all__ = ["fleet_deployment", "FleetClient", "MODEL_ID_HEADER"]

MODEL_ID_HEADER = "serve_multiplexed_model_id"


def fleet_deployment(config: ReplicaConfig, *, num_replicas: int = 2,
                     name: str = "mintjax_fleet",
                     ray_actor_options: Mapping[str, Any] | None = None):
  """The Serve application of a fleet (pass it to `serve.run`).

  Args:
    config: what each replica is built from (registry URL, base, engine).
    num_replicas: replicas to start.
    name: the deployment's name.
    ray_actor_options: per replica, e.g. {'num_cpus': 1} or
      {'resources': {'TPU': 4}}.
  """
  from ray import serve  # pylint: disable=import-outside-toplevel

  capacity = config.capacity

  @serve.deployment(name=name, num_replicas=num_replicas,
                    ray_actor_options=dict(ray_actor_options or {}),
                    max_ongoing_requests=max(8, config.engine.max_batch * 2))
  class FleetDeployment:
    """One replica: an Engine behind Serve's multiplexed routing."""

    def __init__(self, replica_config: ReplicaConfig):
      self.replica = FleetReplica(replica_config)

    @serve.multiplexed(max_num_models_per_replica=capacity)
    async def get_model(self, ref: str) -> str:
      # Serve calls this once per ref it routes here (and again after its
      # LRU dropped the ref); the engine's residency does the real work.
      return await asyncio.to_thread(self.replica.load, ref)

    async def _run(self, body: Mapping[str, Any]) -> dict:
      ref = serve.get_multiplexed_model_id()
      asked = body.get("model", body.get("adapter"))
      if ref:
        if asked is not None and asked != ref:
          raise ValueError(
              f"request names model {asked!r} but was routed as {ref!r}; "
              f"set the {MODEL_ID_HEADER} header to the request's model")
        await self.get_model(ref)
        body = dict(body, adapter=ref)
        body.pop("model", None)
      elif asked is not None:
        raise ValueError(
            f"request for adapter {asked!r} carries no multiplexed model id;"
            f" set the {MODEL_ID_HEADER} header (HTTP) or "
            "handle.options(multiplexed_model_id=ref) so it is routed to a "
            "replica holding it")
      return await asyncio.to_thread(self.replica.generate, body)

    async def generate(self, body: Mapping[str, Any]) -> dict:
      """Handle entry point: one request dict -> result dict."""
      return await self._run(body)

    async def stats(self) -> dict:
      return await asyncio.to_thread(self.replica.stats)

    async def __call__(self, request):
      """HTTP entry point (Serve's proxy passes a starlette Request).

      /v1/... goes to the OpenAI-compatible server's app of this replica
      (completions, chat completions, models, metrics); any other path
      takes a `GenerationRequest` JSON body.
      """
      if not request.url.path.startswith("/v1/"):
        return await self._run(await request.json())
      ref = serve.get_multiplexed_model_id()
      if ref:
        await self.get_model(ref)
      return await _forward(self.replica.openai_app(), request)

  return FleetDeployment.bind(config)


async def _forward(app, request):
  """Runs a starlette request through an ASGI app in this process and
  returns its (buffered) response: the replica's OpenAI server answers
  behind Serve's proxy. Streamed responses arrive whole."""
  import httpx  # pylint: disable=import-outside-toplevel
  from starlette.responses import Response  # pylint: disable=import-outside-toplevel
  headers = {k: v for k, v in request.headers.items()
             if k.lower() not in ("host", "content-length")}
  async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                               base_url="http://replica") as client:
    got = await client.request(request.method, request.url.path,
                               params=request.query_params,
                               content=await request.body(), headers=headers,
                               timeout=None)
  keep = {k: v for k, v in got.headers.items()
          if k.lower() not in ("content-length", "transfer-encoding",
                               "content-encoding")}
  return Response(got.content, status_code=got.status_code, headers=keep)


class FleetClient:
  """Calls a running fleet through its Serve deployment handle."""

  def __init__(self, handle):
    self.handle = handle

  def generate(self, request: Mapping[str, Any]):
    """Sends one request (returns a response future: `.result()`); its
    adapter ref, if any, is the multiplexed model id."""
    request = dict(request)
    ref = request.pop("model", None) or request.pop("adapter", None)
    handle = self.handle
    if ref:
      handle = handle.options(multiplexed_model_id=ref)
    return handle.generate.remote(request)
