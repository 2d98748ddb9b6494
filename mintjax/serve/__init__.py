"""Serving: multi-adapter batched generation over one shared base model.

`Engine` (engine.py) is the entry point; see its module docstring. Request
and result types live in requests.py, the compiled steps in steps.py,
sampling in sampling.py, adapter residency (device slots <- host cache <-
store) in residency.py, continuous batching in scheduler.py, and the engine's
service thread for concurrent callers in service.py. Applications built on
it (JSONL batch serving, the OpenAI-compatible HTTP server) live in
mintjax.apps.
"""

from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.requests import (GenerationRequest, GenerationResult,
                                    RequestError, TokenEvent)
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult",
           "RequestError", "TokenEvent", "InMemoryAdapters", "SamplingParams"]
