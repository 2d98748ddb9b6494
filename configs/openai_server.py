"""OpenAI-compatible HTTP server config (launch/openai_server.py).

Variants (`--config=configs/openai_server.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests, demos).
  smollm2  SmolLM2-135M-Instruct from the bundled GGUF file.
Override any field, e.g. `--config.registry=REG --config.server.port=8000
--config.engine.max_batch=32`. The engine fields mean what they mean in
configs/serve.py (the same `engine_from_config` builds the engine).
"""

import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "random:tiny"  # 'random:<variant>', .gguf, HF folder, checkpoint
  c.base_seed = 0
  c.registry = ""         # registry directory; empty serves the base only
  c.pin = ""              # comma-separated adapter refs kept resident
  c.engine = ml_collections.ConfigDict(dict(
      num_slots=16, max_batch=16, max_len=256, host_cache_mb=1024,
      steps_per_call=8, prefill_batch=4, min_bucket=16, max_rank=8,
      targets="q,k,v,o,gate,up,down", adapter_dtype="float32",
      lora_impl="auto", lookahead=64))
  c.mesh = ml_collections.ConfigDict(dict(use=False, data=1, fsdp=-1,
                                          tensor=1))
  c.server = ml_collections.ConfigDict(dict(
      host="127.0.0.1",        # 0.0.0.0 to listen on every interface
      port=8000,
      model_name="mintjax-tiny",  # the base's name in `model`
      api_key="",              # or $MINTJAX_API_KEY; empty = no auth
      max_queue=256,           # waiting requests before 429
      request_timeout_s=600.0,  # 0 = no limit
      retry_after_s=1.0,
      admission_wait_s=0.05,   # see ServiceConfig: lets follow-ups join
      default_max_tokens=16,
      drain_timeout_s=30.0,    # SIGTERM: in-flight requests get this long
      log_level="info"))
  if variant == "tiny":
    c.engine.max_len = 128
  elif variant == "smollm2":
    from mintjax.model.smollm2 import default_gguf_path  # pylint: disable=g-import-not-at-top
    c.base = str(default_gguf_path())
    c.engine.max_len = 512
    c.server.model_name = "smollm2-135m-instruct"
    c.server.default_max_tokens = 64
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny' or "
                     "'smollm2'")
  return c
