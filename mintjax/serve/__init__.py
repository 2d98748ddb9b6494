"""Serving: multi-adapter batched generation over one shared base model.

`Engine` (engine.py) is the entry point; see its module docstring. The
compiled steps live in steps.py, sampling in sampling.py, adapter residency
(device slots <- host cache <- store) in residency.py, continuous batching in
scheduler.py and JSONL batch mode in batch.py.
"""

from mintjax.serve.engine import (Engine, EngineConfig, GenerationRequest,
                                  GenerationResult, TokenEvent)
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult",
           "TokenEvent", "InMemoryAdapters", "SamplingParams"]
