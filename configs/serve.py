"""Batch serving config: JSONL requests in, JSONL results out.

Variants (`--config=configs/serve.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests, demos).
  smollm2  SmolLM2-135M-Instruct from the bundled GGUF file.
Override any field, e.g. `--config.input=req.jsonl --config.engine.num_slots=32`.

Each input line is a request: {"prompt": "..." | [ids], "adapter": "alice:prod",
"max_new_tokens": 32, "temperature": 0.0, ...} or {"messages": [...], ...}.
"""

import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "random:tiny"  # 'random:<variant>', .gguf, HF folder, checkpoint
  c.base_seed = 0
  c.registry = ""         # registry directory; empty serves the base only
  c.input = ""            # JSONL requests
  c.output = ""           # JSONL results (one line per request, same order)
  c.pin = ""              # comma-separated adapter refs kept resident
  c.log_every = 50        # progress line every this many finished requests
  c.defaults = ml_collections.ConfigDict(dict(max_new_tokens=32))
  c.engine = ml_collections.ConfigDict(dict(
      num_slots=16, max_batch=16, max_len=256, host_cache_mb=1024,
      steps_per_call=8, prefill_batch=4, min_bucket=16, max_rank=8,
      targets="q,k,v,o,gate,up,down", adapter_dtype="float32",
      lora_impl="auto", lookahead=64))
  c.mesh = ml_collections.ConfigDict(dict(use=False, data=1, fsdp=-1,
                                          tensor=1))
  if variant == "tiny":
    c.engine.max_len = 128
  elif variant == "smollm2":
    from mintjax.model.smollm2 import default_gguf_path  # pylint: disable=g-import-not-at-top
    c.base = str(default_gguf_path())
    c.engine.max_len = 512
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny' or "
                     "'smollm2'")
  return c
