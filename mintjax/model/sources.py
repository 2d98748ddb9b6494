"""Where a base model comes from: one string names it, one function loads it.

Owns the base-source names every launcher, tool and application accepts,
and `load_base_source`, which turns one into a `BaseModel`:

  'smollm2'          the embedded SmolLM2-135M-Instruct GGUF
                     (`mintjax.model.smollm2`; `resolve_base_source` gives
                     its file path).
  'random:<variant>' a randomly initialised model of a `RANDOM_VARIANTS`
                     shape (tests, benchmarks, the quick demo).
  <file>.gguf        a GGUF file (`mintjax.model.gguf`).
  <folder>           a Hugging Face folder with config.json
                     (`mintjax.model.hf`), else an Orbax base checkpoint
                     written by `tools/convert.py` (`mintjax.model.checkpoint`).

It sits beside the loaders so that training, serving and evaluation all load
a base without importing one another.
"""

from __future__ import annotations

import os

from mintjax.config import ModelConfig
from mintjax.model import checkpoint, smollm2
from mintjax.model.base import BaseModel, random_base
from mintjax.model.gguf import load_gguf
from mintjax.model.hf import load_hf

SMOLLM2 = "smollm2"  # the embedded SmolLM2-135M-Instruct GGUF

RANDOM_VARIANTS = {
    "tiny": ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                        intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=1e5, tie_word_embeddings=True),
}


def resolve_base_source(source: str) -> str:
  """'smollm2' -> the embedded GGUF's path; any other source unchanged.

  Raises:
    FileNotFoundError: 'smollm2' was asked for and its package is missing
      (the message says how to install it).
  """
  if source == SMOLLM2:
    return str(smollm2.default_gguf_path())
  return source


def load_base_source(source: str, seed: int = 0) -> BaseModel:
  """Loads a base named as in the module docstring.

  Args:
    source: 'smollm2', 'random:<variant>', a .gguf file, an HF folder or an
      Orbax base checkpoint directory.
    seed: initialisation seed of a 'random:<variant>' base (ignored
      otherwise).

  Raises:
    ValueError: `source` names none of these.
  """
  if source == SMOLLM2:
    return smollm2.load_smollm2()  # checks the file has SmolLM2's shape
  if source.startswith("random:"):
    variant = source.split(":", 1)[1]
    if variant not in RANDOM_VARIANTS:
      raise ValueError(f"unknown random base variant {variant!r}; choose "
                       f"from {sorted(RANDOM_VARIANTS)}")
    return random_base(RANDOM_VARIANTS[variant], seed=seed)
  if source.endswith(".gguf") and os.path.isfile(source):
    return load_gguf(source)
  if os.path.isdir(source) and os.path.isfile(
      os.path.join(source, "config.json")):
    return load_hf(source)
  if os.path.isdir(source):
    return checkpoint.load_base(source)
  raise ValueError(
      f"base source {source!r} is not 'random:<variant>', an existing .gguf "
      "file, a Hugging Face folder (config.json + *.safetensors) or a base "
      f"checkpoint directory (or {SMOLLM2!r}, the embedded GGUF)")
