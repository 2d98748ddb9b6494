"""Whole int8 weight-only bases: quantize a `BaseModel`, save it, load it.

Owns `quantize_base` (float `BaseModel` -> int8 one with its own
fingerprint), and the on-disk form of an int8 base, one safetensors file of
int8 values and float32 scales plus a JSON header (`save_int8` /
`load_int8`). The arithmetic is `mintjax.model.quant`.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from mintjax.config import ModelConfig
from mintjax.model import llama, quant
from mintjax.model.base import BaseModel, compute_fingerprint

FORMAT = "mintjax-int8-weight-only-v1"


def quantize_base(base):
  """A `BaseModel` with an int8 tree and its own fingerprint (an adapter
  trained on the float base is refused by the int8 one, and vice versa)."""
  params = quant.quantize_params(base.params)
  config = base.config.replace(weight_format="int8")
  return BaseModel(config, params, compute_fingerprint(config, params),
                   base.tokenizer)


# --- on disk: one safetensors file + a small JSON header --------------------

def _flat(params: dict) -> dict[str, np.ndarray]:
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["/".join(quant.key_names(path))] = np.asarray(jax.device_get(x))
  return out


def save_int8(directory: str | os.PathLike, base) -> pathlib.Path:
  """Writes an int8 base: `int8.safetensors` + `int8.json` (config, format,
  fingerprint). Refuses a float tree."""
  if not quant.is_quantized(base.params):
    raise ValueError("save_int8 needs an int8 base; quantize it first with "
                     "int8_base.quantize_base(base)")
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  save_file(_flat(base.params), str(d / "int8.safetensors"))
  (d / "int8.json").write_text(json.dumps(
      {"format": FORMAT, "fingerprint": base.fingerprint,
       "config": json.loads(base.config.to_json())}, indent=1))
  return d


def load_int8(directory: str | os.PathLike, tokenizer=None):
  """Reads `save_int8`'s folder back into a `BaseModel` (int8 tree).

  Raises:
    ValueError: missing files, another format, missing or misshapen arrays,
      or a fingerprint that does not match the stored bytes.
  """
  d = pathlib.Path(directory)
  meta_path, data_path = d / "int8.json", d / "int8.safetensors"
  if not meta_path.is_file() or not data_path.is_file():
    raise ValueError(f"{str(d)!r} is not an int8 base folder (needs int8.json "
                     "and int8.safetensors; write one with int8_base.save_int8)")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{str(meta_path)!r} has format {meta.get('format')!r}, "
                     f"expected {FORMAT!r}")
  config = ModelConfig.from_dict(meta["config"])
  if config.weight_format != "int8":
    raise ValueError(f"{str(meta_path)!r} describes a {config.weight_format} "
                     "base, not an int8 one; re-export it with "
                     "int8_base.save_int8")
  want = llama.param_shapes(config)
  arrays = load_file(str(data_path))

  def one(path, s):
    key = "/".join(quant.key_names(path))
    if key not in arrays or arrays[key].shape != s.shape or (
        arrays[key].dtype != np.dtype(s.dtype)):
      got = arrays[key].shape if key in arrays else "missing"
      raise ValueError(
          f"int8 base {str(d)!r}: {key} should be {s.dtype}{list(s.shape)}, "
          f"found {got}; re-export it with int8_base.save_int8")
    return jnp.asarray(arrays[key])
  params = jax.tree_util.tree_map_with_path(one, want)
  fp = compute_fingerprint(config, params)
  if fp != meta["fingerprint"]:
    raise ValueError(f"int8 base {str(d)!r}: stored bytes hash to {fp[:19]}, "
                     f"the header says {meta['fingerprint'][:19]}; the file is "
                     "damaged, re-export it")
  return BaseModel(config, params, fp, tokenizer)
