"""Base-model checkpoints: Orbax parameters + config, fingerprint, tokenizer.

Owns the on-disk format of a converted base model, written once by
`tools/convert.py` and read by every train/serve/eval launch (through
`mintjax.model.sources.load_base_source`):

  <directory>/
    params/             Orbax (StandardCheckpointer) parameter tree
    mintjax_base.json   {"format_version", "config", "fingerprint",
                         "param_count", "created"}; written last, so its
                        presence marks a complete checkpoint
    tokenizer.json      `Tokenizer.to_json()` (absent if the base has none)

`load_base` restores the parameters straight onto their mesh shardings
(each host reads only its shards), so a large base never has to fit on one
device first.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax
from jax.sharding import Mesh, SingleDeviceSharding

from mintjax import sharding
from mintjax.config import ConfigError, ModelConfig
from mintjax.model import llama
from mintjax.model.base import BaseModel, compute_fingerprint
from mintjax.model.hf import CheckpointError
from mintjax.model.tokenizer import Tokenizer

FORMAT_VERSION = 1
META_FILE = "mintjax_base.json"
TOKENIZER_FILE = "tokenizer.json"
PARAMS_DIR = "params"


def save_base(directory: str | os.PathLike, base: BaseModel,
              overwrite: bool = False) -> pathlib.Path:
  """Writes `base` as a mintjax base checkpoint.

  Args:
    directory: output directory; created if missing.
    base: the model (params may be sharded; Orbax writes each shard).
    overwrite: replace an existing checkpoint in `directory`.

  Returns:
    The absolute checkpoint directory.

  Raises:
    CheckpointError: `directory` already holds a checkpoint and
      `overwrite` is False (nothing is changed).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).resolve()
  if directory.exists() and any(directory.iterdir()):
    if not overwrite:
      raise CheckpointError(
          f"{str(directory)!r} is not empty; choose a new directory or pass "
          "overwrite=True (--overwrite in tools/convert.py) to replace it")
    if not (directory / META_FILE).exists() and not (
        directory / PARAMS_DIR).exists():
      raise CheckpointError(
          f"refusing to overwrite {str(directory)!r}: it is not a mintjax "
          f"base checkpoint (no {META_FILE}); pick an empty directory")
    # Remove the marker first: an interrupted overwrite then reads as
    # incomplete instead of as the old checkpoint with new weights.
    (directory / META_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory / PARAMS_DIR, ignore_errors=True)
    (directory / TOKENIZER_FILE).unlink(missing_ok=True)
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / PARAMS_DIR, base.params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    if base.tokenizer is not None:
      (directory / TOKENIZER_FILE).write_text(base.tokenizer.to_json())
    meta = dict(format_version=FORMAT_VERSION, config=base.config.to_dict(),
                fingerprint=base.fingerprint,
                param_count=base.config.num_params(),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / META_FILE)  # atomic: the checkpoint is complete
  return directory


def read_base_meta(directory: str | os.PathLike) -> dict:
  """The parsed `mintjax_base.json` of a checkpoint, validated."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(
        f"base checkpoint directory {str(directory)!r} does not exist; "
        "create one with `python -m tools.convert --out=DIR`")
  path = directory / META_FILE
  if not path.exists():
    raise CheckpointError(
        f"{str(directory)!r} has no {META_FILE}: it is not a mintjax base "
        "checkpoint, or writing it was interrupted; re-run "
        "`python -m tools.convert --out=DIR --overwrite`")
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(
        f"{str(path)!r} is corrupt (not JSON: {e}); re-run the conversion"
    ) from None
  missing = [k for k in ("format_version", "config", "fingerprint")
             if k not in meta]
  if missing:
    raise CheckpointError(
        f"{str(path)!r} lacks {missing}; expected keys format_version, "
        "config, fingerprint; re-run the conversion")
  if meta["format_version"] != FORMAT_VERSION:
    raise CheckpointError(
        f"{str(path)!r} has format_version {meta['format_version']}, this "
        f"mintjax reads version {FORMAT_VERSION}; re-run the conversion")
  fp = meta["fingerprint"]
  if not (isinstance(fp, str) and fp.startswith("sha256:") and len(fp) == 71):
    raise CheckpointError(
        f"{str(path)!r} has an invalid fingerprint {fp!r}; expected "
        "'sha256:' + 64 hex digits; re-run the conversion")
  return meta


def abstract_params(config: ModelConfig, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None) -> dict:
  """`jax.ShapeDtypeStruct` leaves carrying each parameter's sharding.

  With a mesh, shardings follow `param_logical_axes` through the logical
  axis rules; without one, every parameter goes to the first device.
  """
  shapes = llama.param_shapes(config)
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = sharding.logical_sharding(
        llama.param_logical_axes(config), shapes, mesh, rules)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def load_base(directory: str | os.PathLike, mesh: Mesh | None = None,
              rules: Mapping[str, Any] | None = None,
              dtype: str | None = None, verify: bool = False) -> BaseModel:
  """Restores a base checkpoint, directly onto `mesh` if given.

  Args:
    directory: a directory written by `save_base`.
    mesh: target mesh (parameters are restored sharded by the logical axis
      rules); None restores onto the first device.
    rules: logical axis rules (default `sharding.DEFAULT_RULES`).
    dtype: cast parameters to this dtype while restoring (default: the
      saved one). The fingerprint stays that of the saved weights.
    verify: recompute the fingerprint from the restored parameters and
      compare it to the stored one (reads every byte; off by default).

  Raises:
    CheckpointError: missing or corrupt checkpoint, or (with verify) a
      fingerprint mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).resolve()
  meta = read_base_meta(directory)
  try:
    config = ModelConfig.from_dict(meta["config"])
  except (ConfigError, TypeError) as e:
    raise CheckpointError(
        f"{str(directory / META_FILE)!r} holds an invalid config: {e}"
    ) from None
  saved_config = config
  if verify and dtype not in (None, config.dtype):
    raise ValueError(
        f"verify=True needs the saved dtype ({config.dtype}); the fingerprint "
        f"of weights cast to {dtype} differs. Verify first, then cast")
  if dtype is not None:
    config = config.replace(dtype=dtype)
  params_dir = directory / PARAMS_DIR
  if not params_dir.is_dir():
    raise CheckpointError(
        f"{str(directory)!r} has {META_FILE} but no {PARAMS_DIR}/ folder; "
        "the checkpoint is incomplete, re-run the conversion")
  abstract = abstract_params(config, mesh, rules)
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      _check_stored_shapes(ckptr.metadata(params_dir), abstract, params_dir)
      params = ckptr.restore(params_dir,
                             args=ocp.args.StandardRestore(abstract))
  except CheckpointError:
    raise
  except Exception as e:  # Orbax/tensorstore raise many types on bad data
    raise CheckpointError(
        f"cannot restore parameters from {str(params_dir)!r} "
        f"({type(e).__name__}: {str(e)[:300]}); the checkpoint is corrupt or "
        "was written for a different config, re-run the conversion") from None
  tokenizer = None
  tok_path = directory / TOKENIZER_FILE
  if tok_path.exists():
    try:
      tokenizer = Tokenizer.from_json(tok_path.read_text())
    except Exception as e:  # tokenizers raises its own exception type
      raise CheckpointError(
          f"{str(tok_path)!r} is corrupt ({e}); re-run the conversion"
      ) from None
  if verify:
    found = compute_fingerprint(saved_config, params)
    if found != meta["fingerprint"]:
      raise CheckpointError(
          f"{str(directory)!r}: restored parameters hash to {found[:19]}…, "
          f"the checkpoint records {meta['fingerprint'][:19]}…; the files "
          "were modified or damaged, re-run the conversion")
  return BaseModel(config, params, meta["fingerprint"], tokenizer)


def _check_stored_shapes(metadata, abstract: dict, params_dir) -> None:
  """Compares stored array shapes with the config's before reading data.

  Orbax would otherwise fail deep inside tensorstore (and leave pending
  reads behind); checking the metadata first names the parameter.
  """
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  stored = {jax.tree_util.keystr(path): tuple(m.shape)
            for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(m, "shape")}
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = jax.tree_util.keystr(path)
    if name not in stored:
      raise CheckpointError(
          f"{str(params_dir)!r} has no parameter {name} required by the "
          "config in mintjax_base.json; the checkpoint is incomplete or its "
          "metadata was edited, re-run the conversion")
    if stored[name] != tuple(want.shape):
      raise CheckpointError(
          f"{str(params_dir)!r}: parameter {name} is stored with shape "
          f"{stored[name]}, the config in mintjax_base.json expects "
          f"{tuple(want.shape)}; the metadata does not match the weights, "
          "re-run the conversion")
