"""An OpenAI-compatible HTTP server: adapters as models, one continuous batch.

  protocol.py  OpenAI request/response shapes, validation, streamed text
  metrics.py   Prometheus metrics (prometheus-client)
  app.py       FastAPI routes over an `EngineService`
  server.py    ServerConfig, running under uvicorn (SIGTERM drains), a
               background-thread server for tests and benchmarks

See docs/SERVING.md.
"""
