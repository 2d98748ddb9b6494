"""A loaded base model: config, parameters, tokenizer and fingerprint.

Owns `BaseModel` (what every train, serve and eval entry point receives),
`compute_fingerprint` (sha256 over the config and canonical parameter bytes;
the identity adapters are checked against) and `random_base` for tests and
the Scale Up experiment's randomly initialised twin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np

from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.tokenizer import Tokenizer, byte_tokenizer


@dataclasses.dataclass
class BaseModel:
  """A frozen base model ready to run.

  Attributes:
    config: model config.
    params: parameter tree (see `mintjax.model.llama`), possibly sharded.
    fingerprint: 'sha256:<hex>' of config + parameters.
    tokenizer: the model's tokenizer, or None.
  """

  config: ModelConfig
  params: dict
  fingerprint: str
  tokenizer: Tokenizer | None = None

  @property
  def short_fingerprint(self) -> str:
    return self.fingerprint[:19]


def compute_fingerprint(config: ModelConfig, params: dict) -> str:
  """sha256 over the canonical config JSON and every parameter's bytes.

  Parameters are visited in sorted path order, each as name, dtype, shape
  and little-endian bytes, so the same weights give the same fingerprint
  whatever their sharding or the order they were loaded in.
  """
  h = hashlib.sha256()
  h.update(config.replace(dtype="float32").to_json().encode())
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.asarray(jax.device_get(leaf))
    if arr.dtype != np.float32:
      arr = arr.astype(np.float32)
    h.update(json.dumps([jax.tree_util.keystr(path), str(arr.dtype),
                         list(arr.shape)]).encode())
    h.update(np.ascontiguousarray(arr).astype("<f4").tobytes())
  return "sha256:" + h.hexdigest()


def random_base(config: ModelConfig, seed: int = 0, std: float = 0.02,
                tokenizer: Tokenizer | None = None) -> BaseModel:
  """A randomly initialised base (tests; the Scale Up random twin)."""
  params = llama.init_params(config, seed=seed, std=std)
  if tokenizer is None and config.vocab_size >= 259:
    tokenizer = byte_tokenizer()
  return BaseModel(config, params, compute_fingerprint(config, params),
                   tokenizer)
