"""Hugging Face safetensors folders <-> `BaseModel`.

Owns the mapping between transformers' checkpoint keys (Llama, Mistral,
Qwen2, Qwen3, Qwen3-MoE, Mixtral, DeepSeek-V3/Kimi-K2; experts one tensor
per expert, as the hub and transformers 5's `save_pretrained` store them)
and mintjax's stacked parameter tree (see `mintjax.model.llama`), reading
single-file (`model.safetensors`) and sharded
(`model.safetensors.index.json`) folders, and writing them back
(`save_hf`), so round trips are testable and models export to the
Hugging Face ecosystem.

HF linear weights are [out, in]; ours are the transpose ([in, out], for
`x @ W`). Per-layer tensors are stacked on a leading layer axis.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from mintjax.config import ConfigError, ModelConfig, SUPPORTED_ARCHITECTURES
from mintjax.model import llama
from mintjax.model.base import BaseModel, compute_fingerprint
from mintjax.model.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# mintjax layer param -> (HF key template, is a linear weight to transpose).
_LAYER_KEYS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "q_a": ("model.layers.{i}.self_attn.q_a_proj.weight", True),
    "q_a_norm": ("model.layers.{i}.self_attn.q_a_layernorm.weight", False),
    "q_b": ("model.layers.{i}.self_attn.q_b_proj.weight", True),
    "kv_a": ("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", True),
    "kv_a_norm": ("model.layers.{i}.self_attn.kv_a_layernorm.weight", False),
    "kv_b": ("model.layers.{i}.self_attn.kv_b_proj.weight", True),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
# MoE layer params (`moe/<name>`); {e} is the expert. Mixtral names its
# block and experts differently (w1 = gate, w3 = up, w2 = down).
_MOE_KEYS = {
    "router": ("model.layers.{i}.mlp.gate.weight", True),
    "router_bias": ("model.layers.{i}.mlp.gate.e_score_correction_bias",
                    False),
    "gate": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", True),
    "up": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", True),
    "down": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", True),
    "shared_gate": ("model.layers.{i}.mlp.shared_experts.gate_proj.weight",
                    True),
    "shared_up": ("model.layers.{i}.mlp.shared_experts.up_proj.weight", True),
    "shared_down": ("model.layers.{i}.mlp.shared_experts.down_proj.weight",
                    True),
}
_MIXTRAL_KEYS = {
    "router": ("model.layers.{i}.block_sparse_moe.gate.weight", True),
    "gate": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", True),
    "up": ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", True),
    "down": ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", True),
}
_TOP_KEYS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


class CheckpointError(ValueError):
  """A checkpoint folder or file is missing, corrupt or does not match."""


def hf_key_map(config: ModelConfig
               ) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """HF tensor name -> (mintjax param path, index into it, transpose).

  The param path is 'embed', 'final_norm', 'lm_head', 'layers/<name>',
  'dense_mlp/<name>' or 'moe/<name>'; the index is () for top-level
  tensors, (layer,) for stacked ones and (moe layer, expert) for routed
  experts. Only tensors the config needs are listed (no biases without
  `attention_bias`, no `lm_head` with tied embeddings).
  """
  shapes = llama.param_shapes(config)
  out = {}
  for name, (key, transpose) in _TOP_KEYS.items():
    if name in shapes:
      out[key] = (name, (), transpose)
  for name, (key, transpose) in _LAYER_KEYS.items():
    if name in shapes["layers"]:
      for i in range(config.num_layers):
        out[key.format(i=i)] = ("layers/" + name, (i,), transpose)
  dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
  for name in shapes.get("dense_mlp", {}):
    key, transpose = _LAYER_KEYS[name]
    for j, i in enumerate(dense):
      out[key.format(i=i)] = ("dense_mlp/" + name, (j,), transpose)
  moe_keys = _MIXTRAL_KEYS if config.architecture == "mixtral" else _MOE_KEYS
  for name in shapes.get("moe", {}):
    key, transpose = moe_keys[name]
    for j, i in enumerate(config.moe_layers):
      if "{e}" not in key:
        out[key.format(i=i)] = ("moe/" + name, (j,), transpose)
        continue
      for e in range(config.num_experts):
        out[key.format(i=i, e=e)] = ("moe/" + name, (j, e), transpose)
  return out


def _leaf(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def read_hf_config(folder: str | os.PathLike) -> dict:
  """The parsed `config.json` of an HF folder, with errors that say why."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise CheckpointError(
        f"Hugging Face model folder {str(folder)!r} does not exist or is not "
        "a directory; pass the folder holding config.json and *.safetensors")
  path = folder / "config.json"
  if not path.exists():
    raise CheckpointError(
        f"{str(folder)!r} has no config.json; a Hugging Face model folder "
        "needs config.json next to model.safetensors (save it with "
        "`model.save_pretrained(folder)`)")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from None


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file that holds it."""
  index = folder / INDEX_FILE
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"{str(index)!r} is not a valid safetensors index (expected JSON "
          f"with a 'weight_map' object): {e!r}") from None
    return {k: folder / v for k, v in weight_map.items()}
  single = folder / SINGLE_FILE
  if not single.exists():
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE} "
        f"(found: {found}); save the model with "
        "`save_pretrained(folder, safe_serialization=True)`")
  with _open(single) as f:
    return {k: single for k in f.keys()}


def _open(path: pathlib.Path):
  try:
    return safetensors.safe_open(str(path), framework="numpy")
  except FileNotFoundError:
    raise CheckpointError(
        f"safetensors file {str(path)!r} is listed by the checkpoint but "
        "missing; copy the complete folder") from None
  except Exception as e:  # safetensors raises its own SafetensorError types.
    raise CheckpointError(
        f"cannot read safetensors file {str(path)!r} ({type(e).__name__}: "
        f"{e}); the file is truncated or not a safetensors file, "
        "re-download or re-export it") from None


def load_hf_params(folder: str | os.PathLike, config: ModelConfig,
                   place: Callable[[np.ndarray], object] | None = None
                   ) -> dict:
  """Reads HF tensors into the mintjax parameter tree (numpy, float32).

  Args:
    folder: HF model folder.
    config: the model config (decides which tensors are expected).
    place: optional function applied to every finished leaf (e.g. a
      `jax.device_put` onto a sharding); default converts to a jnp array in
      `config.dtype`.

  Raises:
    CheckpointError: a tensor is missing, has the wrong shape, or a file is
      unreadable.
  """
  folder = pathlib.Path(folder)
  files = _tensor_files(folder)
  key_map = hf_key_map(config)
  missing = [k for k in key_map if k not in files]
  if missing:
    raise CheckpointError(
        f"{str(folder)!r} is missing tensor {missing[0]!r}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + f" needed by the {config.architecture} config; the checkpoint does "
        "not match config.json")
  shapes = llama.param_shapes(config)
  host = jax.tree.map(lambda s: np.empty(s.shape, np.float32), shapes)
  by_file: dict[pathlib.Path, list[str]] = {}
  for key in key_map:
    by_file.setdefault(files[key], []).append(key)
  for path, keys in sorted(by_file.items()):
    with _open(path) as f:
      for key in keys:
        dest_name, index, transpose = key_map[key]
        dest = _leaf(host, dest_name)
        want = dest.shape[len(index):]
        try:
          arr = f.get_tensor(key)
        except Exception as e:  # corrupt payload inside a valid header
          raise CheckpointError(
              f"cannot read tensor {key!r} from {str(path)!r}: {e}") from None
        if transpose:
          arr = arr.T
        if arr.shape != tuple(want):
          hf_want = tuple(reversed(want)) if transpose else tuple(want)
          hf_found = tuple(reversed(arr.shape)) if transpose else arr.shape
          raise CheckpointError(
              f"tensor {key!r} in {str(path)!r} has shape {hf_found}, "
              f"expected {hf_want} from config.json; the weights and the "
              "config belong to different models")
        dest[index] = arr
  dt = jnp.dtype(config.dtype)
  place = place or (lambda a: jnp.asarray(a, dt))
  return jax.tree.map(place, host)


def load_hf(folder: str | os.PathLike, dtype: str = "float32",
            tokenizer: Tokenizer | None = None) -> BaseModel:
  """Loads a Hugging Face Llama/Mistral/Qwen2 safetensors folder.

  Args:
    folder: folder with config.json and model.safetensors (or sharded
      model-*.safetensors + model.safetensors.index.json).
    dtype: parameter/compute dtype ('float32', 'bfloat16', 'float16').
    tokenizer: optional tokenizer; if None and the folder has a
      tokenizer.json it is loaded (eos ids from config.json and
      generation_config.json; see `eos_ids_from_folder`).

  Returns:
    A `BaseModel` whose fingerprint is `compute_fingerprint(config, params)`.

  Raises:
    CheckpointError: missing/corrupt files, missing or mis-shaped tensors.
    ConfigError: unsupported architecture or invalid config.json.
  """
  hf = read_hf_config(folder)
  try:
    config = ModelConfig.from_hf_config(hf, dtype=dtype)
  except ConfigError as e:
    raise ConfigError(
        f"{str(folder)!r}: {e} (supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)})") from None
  params = load_hf_params(folder, config)
  if tokenizer is None:
    tokenizer = _folder_tokenizer(pathlib.Path(folder), hf)
  return BaseModel(config, params, compute_fingerprint(config, params),
                   tokenizer)


def _eos_list(value, where: str) -> list[int]:
  """An `eos_token_id` field (an int, a list of ints or null) as a list."""
  if value is None:
    return []
  ids = value if isinstance(value, list) else [value]
  if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
    raise CheckpointError(
        f"{where}: eos_token_id must be a non-negative int or a list of "
        f"them, got {value!r:.80}; fix the file")
  return ids


def eos_ids_from_folder(folder: pathlib.Path, hf: dict) -> list[int]:
  """Every eos id of a Hugging Face folder, the primary one first.

  The primary id is config.json's `eos_token_id` (its first entry when a
  list); `generation_config.json` (what `generate` stops on in
  transformers) adds its ids, so a model like Llama-3-Instruct, whose
  config names <|end_of_text|> but whose turns end with <|eot_id|>, stops
  at either. Empty when neither file names one.
  """
  ids = _eos_list(hf.get("eos_token_id"), str(folder / "config.json"))
  gen_path = folder / "generation_config.json"
  if gen_path.exists():
    try:
      gen = json.loads(gen_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(
          f"{gen_path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(gen, dict):
      raise CheckpointError(f"{gen_path} must hold a JSON object")
    ids += _eos_list(gen.get("eos_token_id"), str(gen_path))
  return list(dict.fromkeys(ids))


def _folder_tokenizer(folder: pathlib.Path, hf: dict) -> Tokenizer | None:
  """A tokenizer.json beside the weights, if any (no transformers needed)."""
  path = folder / "tokenizer.json"
  if not path.exists():
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top

  backend = tokenizers.Tokenizer.from_file(str(path))
  template = None
  tok_cfg = folder / "tokenizer_config.json"
  if tok_cfg.exists():
    template = json.loads(tok_cfg.read_text()).get("chat_template")
  eos = eos_ids_from_folder(folder, hf) or [0]
  vocab = backend.get_vocab_size(with_added_tokens=True)
  bad = [i for i in eos if i >= vocab]
  if bad:
    raise CheckpointError(
        f"{folder}: eos ids {bad} are outside the tokenizer's vocabulary of "
        f"{vocab}; fix eos_token_id in config.json / generation_config.json")
  bos = hf.get("bos_token_id")
  pad = hf.get("pad_token_id")
  return Tokenizer(backend=backend, eos_id=int(eos[0]), bos_id=bos,
                   pad_id=int(pad if pad is not None else 0),
                   chat_template=template, extra_eos_ids=tuple(eos[1:]))


def to_hf_tensors(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """The parameter tree as HF-named float32 numpy tensors ([out, in])."""
  out = {}
  host = jax.tree.map(np.asarray, params)  # one device->host copy per leaf
  for key, (path, index, transpose) in hf_key_map(config).items():
    arr = np.asarray(_leaf(host, path)[index], dtype=np.float32)
    out[key] = np.ascontiguousarray(arr.T if transpose else arr)
  return out


def _ordinary_permissions(path: pathlib.Path) -> None:
  """Gives `path` the 0666 & ~umask mode open() gives (safetensors'
  save_file creates 0600 files, which other users and services cannot
  read)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_hf(base: BaseModel, folder: str | os.PathLike,
            max_shard_bytes: int | None = None) -> None:
  """Writes `base` as a Hugging Face folder (config.json + safetensors).

  Args:
    base: the model to export.
    folder: output folder (created; existing model files are overwritten).
    max_shard_bytes: if set, tensors are split over several
      model-0000k-of-0000n.safetensors files of at most about this size and
      an index json is written, as transformers does.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = to_hf_tensors(base.config, base.params)
  hf = base.config.to_hf_config()
  hf["torch_dtype"] = "float32"
  if base.tokenizer is not None:
    hf["eos_token_id"] = base.tokenizer.eos_id
    hf["bos_token_id"] = base.tokenizer.bos_id
    hf["pad_token_id"] = base.tokenizer.pad_id
  (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if base.tokenizer is not None and len(base.tokenizer.eos_ids) > 1:
    # transformers stops on generation_config's list; config.json keeps one.
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(base.tokenizer.eos_ids),
         "bos_token_id": base.tokenizer.bos_id}, indent=2) + "\n")
  meta = {"format": "pt", "mintjax_fingerprint": base.fingerprint}
  if not max_shard_bytes:
    safetensors.numpy.save_file(tensors, str(folder / SINGLE_FILE),
                                metadata=meta)
    _ordinary_permissions(folder / SINGLE_FILE)
  else:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
      nbytes = tensors[key].nbytes
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][key] = tensors[key]
      size += nbytes
    weight_map = {}
    n = len(shards)
    for k, shard in enumerate(shards, 1):
      name = f"model-{k:05d}-of-{n:05d}.safetensors"
      safetensors.numpy.save_file(shard, str(folder / name), metadata=meta)
      _ordinary_permissions(folder / name)
      weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in
                                            tensors.values())},
             "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  if base.tokenizer is not None:
    base.tokenizer.backend.save(str(folder / "tokenizer.json"))
    if base.tokenizer.chat_template:
      (folder / "tokenizer_config.json").write_text(json.dumps(
          {"chat_template": base.tokenizer.chat_template}, indent=2) + "\n")
