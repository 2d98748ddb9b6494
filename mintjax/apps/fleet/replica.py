"""One fleet replica without Ray: an `Engine` serving a shared registry.

Owns `ReplicaConfig` and `FleetReplica`. A replica opens the registry by
URL (every replica of a fleet opens the same PostgreSQL catalog and object
store), builds its base model with the config's `base` factory (run inside
the replica's process), and serves requests through an `EngineService`, so
concurrent callers share one continuous batch. `load(ref)` is what Ray
Serve's multiplexing calls the first time a replica sees an adapter ref: it
resolves the ref (one catalog query: an adapter published a moment ago is
found) and makes the adapter resident in a device slot, reading it from the
store unless the host cache has it.

Capacity: Serve keeps at most `capacity` adapter refs per replica: the
device slots (`EngineConfig.num_slots`) by default, or `max_adapters`
(what the host cache, `host_cache_bytes`, holds), which keeps an adapter
routed to the replica that still has it in host memory.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Callable, Mapping

from mintjax.apps.openai_server.app import create_app
from mintjax.model.base import BaseModel
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.requests import GenerationRequest, RequestError
from mintjax.serve.residency import ResidencyError
from mintjax.serve.service import EngineService, ServiceConfig
from mintjax.store.registry import Registry

__all__ = ["ReplicaConfig", "FleetReplica"]


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
  """What every replica of a fleet is built from.

  Attributes:
    registry: registry URL shared by the fleet (e.g.
      'postgresql://host/db?schema=prod&store=s3://bucket/adapters').
    base: builds the base model inside the replica (picklable: Ray ships
      it to every replica), e.g. `functools.partial(random_base, cfg)` or
      a loader of Hugging Face files every host can read.
    engine: engine shapes; set max_rank and targets (adapters published
      later must fit the bank without a recompile).
    service: queue bound and timeouts of the replica's service loop.
    max_adapters: adapter refs Serve keeps routed to one replica; None is
      the device slots. Set it to what the host cache holds
      (host_cache_bytes // adapter bytes) to route an adapter back to the
      replica that still has it in host memory after it left the slots
      (docs/BENCHMARKS.md, "Fleet", measures both).
  """

  registry: str
  base: Callable[[], BaseModel]
  engine: EngineConfig = EngineConfig()
  service: ServiceConfig = ServiceConfig()
  max_adapters: int | None = None

  def __post_init__(self):
    if self.engine.max_rank is None or self.engine.targets is None:
      raise ValueError(
          "ReplicaConfig.engine must set max_rank and targets: a fleet "
          "serves adapters published after it started, and the bank's "
          "shape cannot change without a recompile")

  @property
  def capacity(self) -> int:
    """Adapter refs Serve keeps per replica (`max_adapters`, else the
    device slots)."""
    return self.max_adapters or self.engine.num_slots


class FleetReplica:
  """An `Engine` + `EngineService` over the fleet's registry."""

  def __init__(self, config: ReplicaConfig, *, warmup: bool = True):
    self.config = config
    self.name = f"{socket.gethostname()}:{os.getpid()}"
    self.registry = Registry.open(config.registry, create=False)
    self.engine = Engine(config.base(), self.registry, config.engine,
                         warmup=warmup, refs=())
    self.service = EngineService(self.engine, config.service).start()
    self.loaded: list[str] = []  # Refs Serve asked this replica to load.

  def load(self, ref: str) -> str:
    """Makes `ref`'s adapter resident in a device slot; returns the
    'id@revision' it names now (one catalog resolve)."""
    def make_resident():
      key = self.engine.resolve(ref)
      res = self.engine.residency
      errors = res.prefetch([key])  # Store -> host cache (if not there).
      if key in errors:
        raise ResidencyError(errors[key])
      try:
        res.release(res.acquire(key))  # Host -> a device slot, evictable.
      except ResidencyError:
        pass  # Every slot serves a running request: the scheduler places
        # it when one frees, as for any queued request.
      return key
    key = self.service.call(make_resident).result()
    self.loaded.append(ref)
    return key

  def generate(self, request: Mapping[str, Any]) -> dict:
    """Runs one request (a `GenerationRequest` dict; OpenAI's 'model' and
    'max_tokens' are accepted for 'adapter' and 'max_new_tokens') and
    returns a JSON-ready result."""
    request = dict(request)
    if "model" in request:
      request["adapter"] = request.pop("model")
    if "max_tokens" in request:  # OpenAI's name.
      request["max_new_tokens"] = request.pop("max_tokens")
    req = GenerationRequest.from_dict(request)
    result = self.service.submit(req).wait()
    if result.finish_reason == "error":
      raise RequestError(result.error)
    return dict(adapter=result.adapter, revision=result.revision,
                tokens=list(result.tokens), text=result.text,
                finish_reason=result.finish_reason, replica=self.name)

  def openai_app(self, model_name: str = "base"):
    """The OpenAI-compatible server's ASGI app over this replica's service
    (`mintjax.apps.openai_server.app.create_app`; built once, on first
    use). `model_name` is the base's name in 'model'."""
    if getattr(self, "_openai_app", None) is None:
      self._openai_app = create_app(self.service, model_name=model_name,
                                    close_service=False)
    return self._openai_app

  def stats(self) -> dict:
    """Engine and residency counters, with this replica's name."""
    stats = self.service.call(self.engine.stats).result()
    return dict(stats, replica=self.name, loaded=list(self.loaded))

  def close(self) -> None:
    self.service.close(drain=True, timeout_s=30)
    self.registry.close()
