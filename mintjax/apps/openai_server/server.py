"""Running the OpenAI server: under uvicorn in the main thread, or in a
background thread for tests and benchmarks.

Owns `serve` (the body of `launch/openai_server.py` and the
`mintjax-openai-server` console script: engine from a
`configs/openai_server.py` config, `EngineService`, app, uvicorn) and
`ServerThread`.

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections, lets
in-flight requests (streams included) finish for up to
`server.drain_timeout_s`, then the app's lifespan drains and stops the
engine thread; the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import uvicorn
from absl import logging

from mintjax.apps.openai_server.app import create_app
from mintjax.apps.jsonl_serving import engine_from_config
from mintjax.serve.engine import Engine
from mintjax.serve.service import EngineService, ServiceConfig


def build_app(engine: Engine, server_config):
  """A started service over `engine` and its app (config: `config.server`)."""
  s = server_config
  service = EngineService(engine, ServiceConfig(
      max_queue=s.max_queue, request_timeout_s=s.request_timeout_s,
      retry_after_s=s.retry_after_s,
      admission_wait_s=s.admission_wait_s)).start()
  api_key = s.api_key or os.environ.get("MINTJAX_API_KEY") or None
  return create_app(service, model_name=s.model_name, api_key=api_key,
                    default_max_tokens=s.default_max_tokens,
                    drain_timeout_s=s.drain_timeout_s)


def serve(config) -> None:
  """Serves until SIGTERM/SIGINT, then drains (see the module docstring)."""
  t0 = time.perf_counter()
  engine = engine_from_config(config)
  logging.info("engine ready in %.1f s (%d programs compiled)",
               time.perf_counter() - t0, engine.compilations_at_warmup or 0)
  app = build_app(engine, config.server)
  s = config.server
  # uvicorn drains on SIGTERM, then re-raises the signal to the handler that
  # was installed before it: a no-op one lets the process exit 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.Server(uvicorn.Config(
      app, host=s.host, port=s.port, log_level=s.log_level,
      timeout_graceful_shutdown=s.drain_timeout_s)).run()
  logging.info("drained and stopped")


class ServerThread:
  """Serves an app on 127.0.0.1 (a free port) from a background thread.

  Args:
    app: the ASGI app (its lifespan shutdown runs on `stop`).
    port: 0 picks a free port.
  """

  def __init__(self, app, port: int = 0, drain_timeout_s: float = 30.0):
    self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._sock.bind(("127.0.0.1", port))
    self.port = self._sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=drain_timeout_s,
        limit_concurrency=4096, backlog=4096))
    self._thread = threading.Thread(target=self.server.run,
                                    kwargs=dict(sockets=[self._sock]),
                                    name="mintjax-http", daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def start(self, timeout_s: float = 60.0) -> "ServerThread":
    self._thread.start()
    deadline = time.monotonic() + timeout_s
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the HTTP server did not start; see its log")
      time.sleep(0.01)
    return self

  def stop(self, timeout_s: float = 60.0) -> None:
    self.server.should_exit = True
    self._thread.join(timeout_s)
    self._sock.close()
