"""Hugging Face PEFT LoRA folders <-> registry revisions, exactly.

Owns reading and writing PEFT LoRA folders (`adapter_config.json` +
`adapter_model.safetensors`, keys like
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]`
and `...lora_B.weight [out, r]`) and `import_peft` / `export_peft`, which
turn such a folder into a registry revision and back. numpy + safetensors
only: no torch, transformers or peft.

Per-module ranks and alphas. PEFT's `rank_pattern` / `alpha_pattern` (and
`layers_to_transform`) let one adapter have a different rank r_m and alpha
a_m per module, while `AdapterWeights` has one rank and one alpha. We store:

  * rank R = max_m r_m; every module's A is zero-padded to [L, d_in, R] and
    B to [L, R, d_out] (padded columns of A meet padded rows of B: exact);
    a module PEFT did not adapt (e.g. a layer outside `layers_to_transform`)
    is all zeros with r_m = 0;
  * alpha = the config's `lora_alpha`, so the adapter scale is
    S = lora_alpha / R (or / sqrt(R) with `use_rslora`);
  * the stored row holds PEFT's factors *unchanged* (only transposed and
    padded), and the revision's `meta['b_scale'][t][l] = s_m / S` records the
    per-module scale ratio (s_m = a_m / r_m or a_m / sqrt(r_m)).
    `Registry.load` multiplies B by that ratio (in float64, then back to the
    stored dtype), so `S * A @ B_loaded == s_m * A_m @ B_m` up to one
    rounding of B. Modules without a pattern have ratio exactly 1 and load
    bit-exact.
  * `meta['peft']` keeps the original `adapter_config.json` and per-module
    ranks/alphas, so `export_peft` reads the raw row, slices every module
    back to r_m and rewrites the original config: the round trip is
    bit-exact for the tensors and equal for the config.

Unsupported PEFT features raise `InvalidAdapterError` naming the feature:
DoRA, `modules_to_save`, embedding / lm_head LoRA, LoRA bias,
`fan_in_fan_out`, non-LoRA PEFT types and a few rarer options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Mapping

import ml_dtypes  # noqa: F401  (bfloat16 with numpy / safetensors)
import numpy as np
import safetensors.numpy

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights, lora_scale
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.registry import AdapterInfo, Registry, Revision, parse_ref
from mintjax.store.weights import RowLayout

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_BY_HF = {m.split(".")[1]: t for t, m in HF_MODULES.items()}
_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(\w+)\.lora_([AB])\.weight$")
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
           np.dtype(ml_dtypes.bfloat16): "bfloat16"}
# Config options that change the math in ways a plain LoRA row cannot hold.
_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora=true)"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style transposed weights)"),
    ("lora_bias", "LoRA bias (lora_bias=true)"),
    ("layer_replication", "layer_replication"),
    ("trainable_token_indices", "trainable_token_indices"),
    ("target_parameters", "target_parameters (LoRA on nn.Parameter)"),
    ("use_qalora", "QA-LoRA (use_qalora=true)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("use_bdlora", "BD-LoRA (use_bdlora)"),
)


def _pattern_key(patterns: Mapping, module_name: str):
  """PEFT's `get_pattern_key`: first pattern matching the name's suffix."""
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", module_name):
      return key
  return None


def _check_config(cfg: Mapping, folder: str) -> None:
  if cfg.get("peft_type", "LORA") != "LORA":
    raise InvalidAdapterError(
        f"{folder}: peft_type {cfg.get('peft_type')!r} is not supported; "
        "mintjax imports LoRA adapters only")
  for key, feature in _UNSUPPORTED:
    if cfg.get(key):
      raise InvalidAdapterError(
          f"{folder}: PEFT feature {feature} is not supported by mintjax "
          f"({key}={cfg[key]!r}); retrain without it or merge it into the "
          "base model")
  if cfg.get("bias", "none") != "none":
    raise InvalidAdapterError(
        f"{folder}: PEFT feature LoRA bias (bias={cfg['bias']!r}) is not "
        "supported; use bias='none'")
  targets = cfg.get("target_modules")
  if isinstance(targets, (list, tuple)):
    bad = [m for m in targets if m.split(".")[-1] not in _BY_HF]
    if bad:
      raise InvalidAdapterError(
          f"{folder}: target_modules {bad} are not supported; mintjax adapts "
          f"only {sorted(_BY_HF)} (embedding / lm_head LoRA is unsupported)")
  for key in ("r", "lora_alpha"):
    if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
      raise InvalidAdapterError(
          f"{folder}: adapter_config.json needs a positive {key!r}, found "
          f"{cfg.get(key)!r}")


def read_peft(folder: str, num_layers: int | None = None
              ) -> tuple[AdapterInfo, AdapterWeights, dict]:
  """Reads a PEFT LoRA folder into (info, raw padded weights, meta).

  Args:
    folder: folder with adapter_config.json and adapter_model.safetensors.
    num_layers: the base's layer count (default: highest layer seen + 1).

  Returns:
    info: targets, rank R (max module rank), alpha (lora_alpha), rsLoRA.
    weights: A [L, d_in, R], B [L, R, d_out], PEFT's values unscaled.
    meta: {'b_scale': per-layer s_m / S, 'peft': config + module ranks}.
  """
  cfg_path, w_path = (os.path.join(folder, CONFIG_FILE),
                      os.path.join(folder, WEIGHTS_FILE))
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise InvalidAdapterError(
          f"{p} not found; a PEFT LoRA folder holds {CONFIG_FILE} and "
          f"{WEIGHTS_FILE} (what save_pretrained writes)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  _check_config(cfg, folder)
  tensors = safetensors.numpy.load_file(w_path)
  mods: dict[tuple[str, int], dict[str, np.ndarray]] = {}
  for key, arr in tensors.items():
    m = _KEY_RE.match(key)
    if not m or m.group(3) not in _BY_HF:
      feature = ("embedding LoRA" if "embed" in key or "lora_embedding" in key
                 else "LoRA bias" if "bias" in key
                 else "DoRA" if "magnitude" in key
                 else "lm_head LoRA" if "lm_head" in key
                 else "a tensor mintjax does not know")
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} is {feature}, which mintjax does not "
          f"support; expected only q/k/v/o/gate/up/down_proj lora_A/lora_B")
    t = _BY_HF[m.group(3)]
    mods.setdefault((t, int(m.group(1))), {})[m.group(4)] = arr
  if not mods:
    raise InvalidAdapterError(f"{w_path} holds no LoRA tensors")
  dtypes = {a.dtype for d in mods.values() for a in d.values()}
  if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
    raise InvalidAdapterError(
        f"{w_path}: tensors have dtypes {sorted(map(str, dtypes))}; expected "
        "one of float32, bfloat16, float16 throughout")
  dtype = next(iter(dtypes))
  layers = max(i for _, i in mods) + 1
  if num_layers is not None:
    if layers > num_layers:
      raise InvalidAdapterError(
          f"{w_path} adapts layer {layers - 1}, the base has {num_layers}")
    layers = num_layers
  targets = tuple(t for t in ALL_TARGETS if any(k[0] == t for k in mods))
  rslora = bool(cfg.get("use_rslora", False))
  alpha = float(cfg["lora_alpha"])
  ranks = {t: [0] * layers for t in targets}
  alphas = {t: [0.0] * layers for t in targets}
  dims: dict[str, tuple[int, int]] = {}
  for (t, i), pair in sorted(mods.items()):
    name = f"model.layers.{i}.{HF_MODULES[t]}"
    if set(pair) != {"A", "B"}:
      raise InvalidAdapterError(f"{w_path}: {name} lacks lora_A or lora_B")
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise InvalidAdapterError(
          f"{w_path}: {name} lora_A {a.shape} / lora_B {b.shape} are not "
          "[r, in] / [out, r]")
    if dims.setdefault(t, (a.shape[1], b.shape[0])) != (a.shape[1],
                                                        b.shape[0]):
      raise InvalidAdapterError(f"{w_path}: {name} shapes differ by layer")
    rank_key = _pattern_key(cfg.get("rank_pattern") or {}, name)
    want_r = (cfg["rank_pattern"][rank_key] if rank_key is not None
              else cfg["r"])
    if a.shape[0] != want_r:
      raise InvalidAdapterError(
          f"{w_path}: {name} has rank {a.shape[0]}, adapter_config.json "
          f"(r / rank_pattern) says {want_r}")
    alpha_key = _pattern_key(cfg.get("alpha_pattern") or {}, name)
    ranks[t][i] = int(a.shape[0])
    alphas[t][i] = float(cfg["alpha_pattern"][alpha_key] if alpha_key
                         is not None else alpha)
  big_r = max(max(r) for r in ranks.values())
  scale = lora_scale(big_r, alpha, rslora)
  lora_a, lora_b, b_scale = {}, {}, {}
  for t in targets:
    d_in, d_out = dims[t]
    lora_a[t] = np.zeros((layers, d_in, big_r), dtype)
    lora_b[t] = np.zeros((layers, big_r, d_out), dtype)
    b_scale[t] = [1.0] * layers
    for i in range(layers):
      r = ranks[t][i]
      if r:
        pair = mods[(t, i)]
        lora_a[t][i, :, :r] = pair["A"].T
        lora_b[t][i, :r, :] = pair["B"].T
        b_scale[t][i] = lora_scale(r, alphas[t][i], rslora) / scale
  info = AdapterInfo(targets, big_r, alpha, rslora, "lora", _DTYPES[dtype])
  meta = {"b_scale": b_scale,
          "peft": {"config": cfg, "module_ranks": ranks,
                   "module_alphas": alphas}}
  return info, AdapterWeights(lora_a, lora_b, big_r, alpha, rslora), meta


def write_peft(folder: str, info: AdapterInfo, lora_a: Mapping,
               lora_b: Mapping, meta: Mapping | None = None) -> None:
  """Writes raw (unfolded) factors as a PEFT LoRA folder.

  With `meta['peft']` (an imported adapter) the original config and
  per-module ranks are restored; otherwise a plain config with r = rank and
  lora_alpha = alpha on the adapter's targets is written.
  """
  peft = (meta or {}).get("peft")
  layers = next(iter(lora_a.values())).shape[0]
  if peft:
    cfg, ranks = dict(peft["config"]), peft["module_ranks"]
  else:
    ranks = {t: [info.rank] * layers for t in info.targets}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
           "r": info.rank, "lora_alpha": info.alpha,
           "use_rslora": info.use_rslora, "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False,
           "target_modules": [HF_MODULES[t].split(".")[1]
                              for t in info.targets],
           "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": None, "inference_mode": True}
  tensors = {}
  for t in info.targets:
    for i in range(layers):
      r = ranks[t][i]
      if not r:
        continue
      stem = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
      tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(
          lora_a[t][i, :, :r].T)
      tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(
          lora_b[t][i, :r, :].T)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(tensors, os.path.join(folder, WEIGHTS_FILE),
                              metadata={"format": "pt"})


def _files_sha256(folder: str) -> dict[str, str]:
  out = {}
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
  return out


def import_peft(reg: Registry, folder: str, adapter_id: str, *,
                base_fingerprint: str, owner: str = "",
                num_layers: int | None = None,
                provenance: Mapping | None = None) -> Revision:
  """Imports a PEFT LoRA folder as a new revision of `adapter_id`.

  The adapter is created if missing (its spec comes from the folder); if it
  exists, the folder must match its spec. Provenance records the source
  folder and the sha256 of its files.
  """
  info, weights, meta = read_peft(folder, num_layers)
  prov = dict(provenance or {})
  prov.setdefault("source", {"format": "peft", "path": os.path.abspath(
      folder), "files": _files_sha256(folder),
                             "peft_version": meta["peft"]["config"].get(
                                 "peft_version")})
  reg.create_adapter(adapter_id, spec=info, base_fingerprint=base_fingerprint,
                     owner=owner, exist_ok=True)
  return reg.publish(adapter_id, weights, prov, meta=meta)


def export_peft(reg: Registry, ref: str, folder: str) -> Revision:
  """Writes revision `ref` as a PEFT LoRA folder that `PeftModel` loads.

  A VeRA adapter is written as its materialised (equivalent) LoRA factors.
  """
  rec = reg.adapter(parse_ref(ref)[0])
  info = AdapterInfo.from_any(rec["spec"])
  if info.variant == "vera":
    rev, w = reg.load(ref)
    w = w.to_lora(RowLayout.from_dict(rec["layout"]))
    info = AdapterInfo(info.targets, info.rank, info.alpha, dtype=info.dtype)
    write_peft(folder, info, w.lora_a, w.lora_b, rev.meta)
    return rev
  rev, lora_a, lora_b = reg.read_raw(ref)
  write_peft(folder, info, lora_a, lora_b, rev.meta)
  return rev


def effective_scales(meta: Mapping, info: AdapterInfo) -> dict[str, list]:
  """Per-module PEFT scales s_m (for reports): b_scale * S."""
  s = lora_scale(info.rank, info.alpha, info.use_rslora)
  return {t: [f * s for f in fs] for t, fs in (meta.get("b_scale") or {
      t: [1.0] for t in info.targets}).items()}


__all__ = ["read_peft", "write_peft", "import_peft", "export_peft",
           "effective_scales"]
