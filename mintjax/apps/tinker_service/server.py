"""Building and running the Tinker-compatible service.

Owns `build_service` (base, registry, trainer, engine service, sampler and
the ASGI app from a `configs/tinker_service.py` config), `serve` (the body
of `launch/tinker_service.py` and the `mintjax-tinker` console script) and
`write_tokenizer_dir`, which writes the base's tokenizer as a Hugging Face
folder so the SDK's `get_tokenizer()` loads it offline (the service reports
the folder as the model's `tokenizer_id`).

The same process also serves the OpenAI-compatible API
(`mintjax.apps.openai_server`) over the same engine at /v1/*, so a sampler a
Tinker client saved is served to OpenAI clients by its registry ref
('tinker-…:sampler-<name>') without a second server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import uvicorn
from absl import logging

from mintjax.apps.jsonl_serving import engine_from_config
from mintjax.apps.openai_server.app import create_app as create_openai_app
from mintjax.apps.tinker_service.app import create_app
from mintjax.apps.tinker_service.futures import Futures
from mintjax.apps.tinker_service.sampler import Sampler
from mintjax.apps.tinker_service.trainer import Trainer, TrainerConfig
from mintjax.model.base import BaseModel
from mintjax.serve.service import EngineService, ServiceConfig
from mintjax.store.registry import Registry


def write_tokenizer_dir(base: BaseModel, directory: str) -> str | None:
  """Writes tokenizer.json + tokenizer_config.json; returns the folder."""
  tok = base.tokenizer
  if tok is None:
    return None
  os.makedirs(directory, exist_ok=True)
  tok.backend.save(os.path.join(directory, "tokenizer.json"))
  name = lambda i: tok.backend.id_to_token(i) if i is not None else None
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
         "eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id),
         "pad_token": name(tok.pad_id), "add_bos_token": False,
         "model_max_length": 1 << 20}
  if tok.chat_template:
    cfg["chat_template"] = tok.chat_template
  with open(os.path.join(directory, "tokenizer_config.json"), "w",
            encoding="utf-8") as f:
    json.dump(cfg, f, indent=1)
  return os.path.abspath(directory)


@dataclasses.dataclass
class Service:
  """Everything one running service holds (closed by `close`)."""

  app: object
  trainer: Trainer
  sampler: Sampler
  engine_service: EngineService
  registry: Registry

  def close(self) -> None:
    self.trainer.close()
    self.engine_service.close(drain=False, timeout_s=10)
    self.registry.close()


def trainer_config(t) -> TrainerConfig:
  return TrainerConfig(num_slots=t.num_slots, max_rank=t.max_rank,
                       alpha=t.alpha, max_len=t.max_len, max_rows=t.max_rows,
                       batch_window_s=t.batch_window_s,
                       active_window_s=t.active_window_s, lora_impl=t.lora_impl,
                       seed=t.seed)


def build_service(config) -> Service:
  """A ready service from a config (see configs/tinker_service.py)."""
  if not config.registry or not config.state_dir:
    raise ValueError("set --config.registry (the adapter registry directory) "
                     "and --config.state_dir (optimizer states, tokenizer)")
  if config.engine.max_rank < config.trainer.max_rank:
    raise ValueError(
        f"engine.max_rank ({config.engine.max_rank}) must be at least "
        f"trainer.max_rank ({config.trainer.max_rank}): the engine serves "
        "what the trainer saves; raise --config.engine.max_rank")
  os.makedirs(config.state_dir, exist_ok=True)
  registry = Registry.open(config.registry, create=True)
  engine = engine_from_config(config)
  base = engine.base
  trainer = Trainer(base, registry, base_name=config.model_name,
                    state_dir=config.state_dir,
                    config=trainer_config(config.trainer))
  service = EngineService(engine, ServiceConfig(
      max_queue=config.server.max_queue, request_timeout_s=0,
      admission_wait_s=config.server.admission_wait_s)).start()
  sampler = Sampler(service, trainer, base_name=config.model_name,
                    max_len=config.engine.max_len)
  tok_dir = write_tokenizer_dir(base, os.path.join(config.state_dir,
                                                   "tokenizer"))
  app = create_app(trainer, sampler, base_name=config.model_name,
                   tokenizer_dir=tok_dir,
                   long_poll_s=config.server.long_poll_s,
                   futures=Futures(retain_s=config.server.future_retain_s,
                                   ttl_s=config.server.future_ttl_s,
                                   max_done=config.server.max_futures))
  app.mount("/", create_openai_app(service, model_name=config.model_name,
                                   close_service=False))
  return Service(app, trainer, sampler, service, registry)


def serve(config) -> None:
  """Serves until SIGTERM/SIGINT."""
  svc = build_service(config)
  logging.info("Tinker service for %s on http://%s:%d (TINKER_BASE_URL)",
               config.model_name, config.server.host, config.server.port)
  signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    uvicorn.Server(uvicorn.Config(
        svc.app, host=config.server.host, port=config.server.port,
        log_level=config.server.log_level)).run()
  finally:
    svc.close()
