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
    `fold_b_scale` (which the loader applies, so `Registry.load` returns
    weights ready to use) multiplies B by that ratio (in float64, then back
    to the stored dtype), so `S * A @ B_loaded == s_m * A_m @ B_m` up to one
    rounding of B. Modules without a pattern have ratio exactly 1 and load
    bit-exact.
  * `meta['peft']` keeps the original `adapter_config.json` and per-module
    ranks/alphas, so `export_peft` reads the raw row, slices every module
    back to r_m and rewrites the original config: the round trip is
    bit-exact for the tensors and equal for the config.

Unsupported PEFT features raise `InvalidAdapterError` naming the feature:
DoRA, `modules_to_save`, embedding / lm_head LoRA, LoRA bias,
`fan_in_fan_out`, non-LoRA PEFT types and a few rarer options.

PEFT folders are untrusted input. Everything read is checked before anything
is stored: the JSON and safetensors parse, every factor is finite and, when
the base's config is given, every factor's shape and layer index fit the
base. `rank_pattern` / `alpha_pattern` keys are regexes in PEFT; here they
are matched as PEFT does (the key must match a dotted suffix of the module
name) but only after `check_pattern` bounds how much backtracking a key can
cause, so no adapter_config.json can hang the importer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import ml_dtypes  # noqa: F401  (bfloat16 with numpy / safetensors)
import numpy as np
import safetensors.numpy

from mintjax.adapters.spec import (EXPERT_TARGETS, KNOWN_TARGETS,
                                   SHARED_EXPERT_TARGETS, AdapterError,
                                   AdapterWeights, lora_scale, target_shape)
from mintjax.config import ModelConfig
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.identity import (AdapterInfo, check_name, parse_info,
                                    parse_ref)
from mintjax.store.peft_patterns import (CONFIG_FILE, checked_patterns,
                                        pattern_key)
from mintjax.store.revision import Revision
from mintjax.store.weights import RowLayout

if TYPE_CHECKING:  # Annotations only: the loader imports this module.
  from mintjax.model.base import BaseModel
  from mintjax.store.registry import Registry

WEIGHTS_FILE = "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj",
              # Multi-head latent attention (DeepSeek-V3, Kimi-K2).
              "q_a": "self_attn.q_a_proj", "q_b": "self_attn.q_b_proj",
              "kv_a": "self_attn.kv_a_proj_with_mqa",
              "kv_b": "self_attn.kv_b_proj",
              "shared_gate": "mlp.shared_experts.gate_proj",
              "shared_up": "mlp.shared_experts.up_proj",
              "shared_down": "mlp.shared_experts.down_proj"}
_BY_HF = {m.split(".")[-1]: t for t, m in HF_MODULES.items()
          if t not in SHARED_EXPERT_TARGETS}
_BY_MODULE = {m: t for t, m in HF_MODULES.items()}
_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.([0-9]{1,9})\.(self_attn|mlp)\."
    r"([a-z_]+(?:\.[a-z_]+)?)\.lora_([AB])\.weight\Z")
# PEFT `target_parameters` LoRA on transformers 5's fused expert weights
# (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]):
# one ParamWrapper per parameter, nested on the experts module, so the
# second one's keys gain `.base_layer`. lora_A is [r * E, d_in] (expert e's
# rows e*r .. e*r+r-1), lora_B is [d_out, r * E] (expert e's columns
# e, E + e, ...). Which parameter a key holds is read off its d_in.
_EXPERT_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.([0-9]{1,9})\.mlp\.experts"
    r"((?:\.base_layer){0,2})\.lora_([AB])\.weight\Z")
EXPERT_PARAMS = {"experts_gate_up": "mlp.experts.gate_up_proj",
                 "experts_down": "mlp.experts.down_proj"}
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
    ("use_qalora", "QA-LoRA (use_qalora=true)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("use_bdlora", "BD-LoRA (use_bdlora)"),
)


def _check_config(cfg: Mapping, folder: str) -> None:
  if not isinstance(cfg, dict):
    raise InvalidAdapterError(
        f"{folder}/{CONFIG_FILE} must hold a JSON object, found "
        f"{type(cfg).__name__}; write it with PeftModel.save_pretrained")
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
  params = cfg.get("target_parameters") or []
  if not isinstance(params, list) or any(
      not isinstance(p, str) or not any(
          p == e or e.endswith("." + p) for e in EXPERT_PARAMS.values())
      for p in params):
    raise InvalidAdapterError(
        f"{folder}: target_parameters {params!r} are not supported; mintjax "
        f"adapts only the fused expert weights {sorted(EXPERT_PARAMS.values())}")
  targets = cfg.get("target_modules")
  if targets is not None and not isinstance(targets, (str, list)):
    raise InvalidAdapterError(
        f"{folder}: target_modules must be a list of module names or a "
        f"regex string, found {type(targets).__name__}")
  if isinstance(targets, list):
    bad = [m for m in targets
           if not isinstance(m, str) or m.split(".")[-1] not in _BY_HF]
    if bad:
      raise InvalidAdapterError(
          f"{folder}: target_modules {bad} are not supported; mintjax adapts "
          f"only {sorted(_BY_HF)} (embedding / lm_head LoRA is unsupported)")
  for key, kind in (("r", int), ("lora_alpha", (int, float))):
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, kind) or not v > 0:
      raise InvalidAdapterError(
          f"{folder}: adapter_config.json needs a positive "
          f"{'integer' if kind is int else 'number'} {key!r}, found {v!r}")
  if not isinstance(cfg.get("use_rslora", False), bool):
    raise InvalidAdapterError(
        f"{folder}: use_rslora must be true or false, found "
        f"{cfg['use_rslora']!r}")


def _load_files(folder: str) -> tuple[dict, dict, str]:
  """(config dict, {key: array}, weights path), or a one-line error."""
  if not isinstance(folder, str) or not os.path.isdir(folder):
    raise InvalidAdapterError(
        f"{folder!r} is not a folder; pass a PEFT LoRA folder holding "
        f"{CONFIG_FILE} and {WEIGHTS_FILE} (what save_pretrained writes)")
  cfg_path, w_path = (os.path.join(folder, CONFIG_FILE),
                      os.path.join(folder, WEIGHTS_FILE))
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise InvalidAdapterError(
          f"{p} not found; a PEFT LoRA folder holds {CONFIG_FILE} and "
          f"{WEIGHTS_FILE} (what save_pretrained writes)")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError included
    raise InvalidAdapterError(
        f"{cfg_path} is not valid JSON ({str(e).splitlines()[0]}); rewrite "
        "it with PeftModel.save_pretrained") from None
  _check_config(cfg, folder)
  try:
    tensors = safetensors.numpy.load_file(w_path)
  except Exception as e:  # pylint: disable=broad-except  # any parse error
    raise InvalidAdapterError(
        f"{w_path} is not a readable safetensors file "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        "the file is truncated or corrupt, save the adapter again") from None
  return cfg, tensors, w_path


def _base_shape(w_path: str, config: ModelConfig, t: str) -> tuple:
  try:
    return target_shape(config, t)
  except AdapterError as e:
    raise InvalidAdapterError(
        f"{w_path}: adapts {HF_MODULES.get(t) or EXPERT_PARAMS[t]}, but {e}"
    ) from None


def _check_against_base(w_path: str, key_of, mods, config: ModelConfig
                        ) -> None:
  """Every factor's layer index and [r, d_in] / [d_out, r] fit the base."""
  for (t, i), pair in sorted(mods.items()):
    if i >= config.num_layers:
      raise InvalidAdapterError(
          f"{w_path}: key {key_of[(t, i, 'A' if 'A' in pair else 'B')]!r} "
          f"adapts layer {i}, but the base has {config.num_layers} layers "
          f"(0..{config.num_layers - 1}); import it for the base it was "
          "trained on")
    *_, d_in, d_out = _base_shape(w_path, config, t)
    for side, arr in sorted(pair.items()):
      r = arr.shape[0] if side == "A" else arr.shape[-1]
      want = (r, d_in) if side == "A" else (d_out, r)
      if arr.ndim != 2 or tuple(arr.shape) != want:
        raise InvalidAdapterError(
            f"{w_path}: key {key_of[(t, i, side)]!r} has shape "
            f"{tuple(arr.shape)}, but the base's {HF_MODULES[t]} needs "
            f"{want} (lora_{side} is "
            f"{'[r, d_in]' if side == 'A' else '[d_out, r]'}, d_in={d_in}, "
            f"d_out={d_out}); import it for the base it was trained on")


def _resolve_expert_keys(w_path: str, expert_keys, mods, key_of,
                         config: ModelConfig | None) -> None:
  """Adds the `target_parameters` factors ({(layer, nesting): {A|B: (key,
  array)}}) to `mods` as experts_gate_up / experts_down, told apart by
  their d_in (the hidden size or the expert width)."""
  if not expert_keys:
    return
  first = next(iter(expert_keys.values()))
  key = next(iter(first.values()))[0]
  if config is None:
    raise InvalidAdapterError(
        f"{w_path}: key {key!r} is target_parameters LoRA on fused expert "
        "weights; pass the base's config (config=, or import_peft with the "
        "base) so its experts can be matched")
  shapes = {t: _base_shape(w_path, config, t) for t in EXPERT_TARGETS}
  for (i, _), pair in sorted(expert_keys.items()):
    key = next(iter(pair.values()))[0]
    if set(pair) != {"A", "B"}:
      raise InvalidAdapterError(f"{w_path}: {key!r} lacks its lora_A or "
                                "lora_B")
    a, b = pair["A"][1], pair["B"][1]
    t = next((t for t, s in shapes.items() if a.ndim == b.ndim == 2 and
              a.shape[1] == s[-2] and b.shape[0] == s[-1]), None)
    e = config.num_experts
    if t is None or a.shape[0] % e or a.shape[0] != b.shape[1]:
      want = {t: f"[r * {e}, {s[-2]}] / [{s[-1]}, r * {e}]"
              for t, s in shapes.items()}
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} has lora_A {a.shape} / lora_B {b.shape}, "
          f"but the base's fused experts need {want}; import it for the base "
          "it was trained on")
    if i < config.num_layers and not config.is_moe_layer(i):
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} adapts the experts of layer {i}, which is "
          "a dense layer of this base; import it for the base it was trained "
          "on")
    if (t, i) in mods:
      raise InvalidAdapterError(
          f"{w_path}: layer {i} holds two {EXPERT_PARAMS[t]} LoRAs")
    mods[(t, i)] = {"A": a, "B": b}
    key_of.update({(t, i, "A"): pair["A"][0], (t, i, "B"): pair["B"][0]})


def _experts_from_peft(pair, num_experts: int, r: int):
  """PEFT's [r * E, d_in] / [d_out, r * E] -> A [E, d_in, r], B [E, r, d_out]
  (ParamWrapper: A.reshape(E, r, d_in), B.reshape(d_out, r, E))."""
  a, b = pair["A"], pair["B"]
  a_erd = a.reshape(num_experts, r, a.shape[1])
  b_ore = b.reshape(b.shape[0], r, num_experts)
  return a_erd.transpose(0, 2, 1), b_ore.transpose(2, 1, 0)


def _experts_to_peft(a_edr, b_ero):
  """Inverse of `_experts_from_peft`: A [E, d_in, r], B [E, r, d_out] ->
  PEFT's lora_A [r * E, d_in] and lora_B [d_out, r * E]."""
  e, d_in, r = a_edr.shape
  a = a_edr.transpose(0, 2, 1).reshape(e * r, d_in)
  b = b_ero.transpose(2, 1, 0).reshape(b_ero.shape[2], r * e)
  return np.ascontiguousarray(a), np.ascontiguousarray(b)


class PeftAdapter(NamedTuple):
  """A PEFT folder as read: `.info`, `.weights` and `.meta`.

  A tuple, so `info, weights, meta = read_peft(folder)` unpacks it.
  """

  info: AdapterInfo
  weights: AdapterWeights
  meta: dict


def read_peft(folder: str, *, config: ModelConfig | None = None,
              num_layers: int | None = None) -> PeftAdapter:
  """Reads a PEFT LoRA folder into weights ready to use.

  Per-module `rank_pattern` / `alpha_pattern` scales are folded into B
  (`fold_b_scale`), so `lora_scale(info) * A @ B` is what PEFT computes for
  every module. `read_peft_raw` gives PEFT's factors unscaled.

  Args:
    folder: folder with adapter_config.json and adapter_model.safetensors.
    config: the base's model config; when given, every factor's shape and
      layer index are checked against it.
    num_layers: the base's layer count when no config is given.

  Returns:
    PeftAdapter(info, weights [A [L, d_in, R], B [L, R, d_out]], meta).
  """
  info, raw, meta = read_peft_raw(folder, num_layers, config=config)
  weights = AdapterWeights(raw.lora_a, fold_b_scale(raw.lora_b, meta),
                           raw.rank, raw.alpha, raw.use_rslora)
  return PeftAdapter(info, weights, meta)


def read_peft_raw(folder: str, num_layers: int | None = None, *,
                  config: ModelConfig | None = None
                  ) -> tuple[AdapterInfo, AdapterWeights, dict]:
  """Reads a PEFT LoRA folder into (info, RAW padded weights, meta).

  The weights are PEFT's factors unscaled: modules with their own
  `rank_pattern` / `alpha_pattern` entry need `meta['b_scale']` folded in
  (`fold_b_scale`) before use. This is what the registry stores (so export
  is bit-exact); `read_peft` returns weights ready to use.

  Args:
    folder: folder with adapter_config.json and adapter_model.safetensors.
    num_layers: the base's layer count (default: highest layer seen + 1).
    config: the base's model config; when given, every factor's shape and
      layer index are checked against it (and `num_layers` defaults to it).

  Returns:
    info: targets, rank R (max module rank), alpha (lora_alpha), rsLoRA.
    weights: A [L, d_in, R], B [L, R, d_out], PEFT's values unscaled.
    meta: {'b_scale': per-layer s_m / S, 'peft': config + module ranks}.
  """
  cfg, tensors, w_path = _load_files(folder)
  if config is not None:
    if num_layers is not None and num_layers != config.num_layers:
      raise InvalidAdapterError(
          f"num_layers={num_layers} disagrees with the base config's "
          f"{config.num_layers} layers; pass one of them")
    num_layers = config.num_layers
  rank_patterns = checked_patterns(cfg, "rank_pattern", int, folder)
  alpha_patterns = checked_patterns(cfg, "alpha_pattern", (int, float),
                                     folder)
  mods: dict[tuple[str, int], dict[str, np.ndarray]] = {}
  key_of: dict[tuple[str, int, str], str] = {}
  expert_keys: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
  for key, arr in tensors.items():
    if not np.all(np.isfinite(np.asarray(arr, np.float32))):
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} holds NaN or Inf values; retrain or "
          "re-save the adapter")
    em = _EXPERT_KEY_RE.match(key)
    if em:  # target_parameters: resolved against the base below
      expert_keys.setdefault((int(em.group(1)), em.group(2)), {})[
          em.group(3)] = (key, arr)
      continue
    m = _KEY_RE.match(key)
    module = m and f"{m.group(2)}.{m.group(3)}"
    if not m or (module not in _BY_MODULE and m.group(3) not in _BY_HF):
      feature = ("embedding LoRA" if "embed" in key or "lora_embedding" in key
                 else "LoRA bias" if "bias" in key
                 else "DoRA" if "magnitude" in key
                 else "lm_head LoRA" if "lm_head" in key
                 else "a tensor mintjax does not know")
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} is {feature}, which mintjax does not "
          f"support; expected only q/k/v/o/gate/up/down_proj (and MLA, "
          f"shared-expert, fused-expert) lora_A/lora_B")
    if module not in _BY_MODULE:
      t = _BY_HF[m.group(3)]
      raise InvalidAdapterError(
          f"{w_path}: key {key!r} puts {m.group(3)} under {m.group(2)}; "
          f"expected {HF_MODULES[t]}")
    t, i = _BY_MODULE[module], int(m.group(1))
    mods.setdefault((t, i), {})[m.group(4)] = arr
    key_of[(t, i, m.group(4))] = key
  _resolve_expert_keys(w_path, expert_keys, mods, key_of, config)
  if not mods:
    raise InvalidAdapterError(f"{w_path} holds no LoRA tensors")
  if config is not None:
    _check_against_base(w_path, key_of, mods, config)
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
          f"{w_path} adapts layer {layers - 1}, but the base has "
          f"{num_layers} layers; import it for the base it was trained on")
  elif layers > 4096:
    raise InvalidAdapterError(
        f"{w_path} adapts layer {layers - 1}; pass the base (--base or "
        "config=) so the layer count can be checked")
    layers = num_layers
  if num_layers is not None:
    layers = num_layers
  targets = tuple(t for t in KNOWN_TARGETS if any(k[0] == t for k in mods))
  rslora = bool(cfg.get("use_rslora", False))
  alpha = float(cfg["lora_alpha"])
  ranks = {t: [0] * layers for t in targets}
  alphas = {t: [0.0] * layers for t in targets}
  dims: dict[str, tuple[int, int]] = {}
  for (t, i), pair in sorted(mods.items()):
    name = f"model.layers.{i}.{HF_MODULES.get(t) or EXPERT_PARAMS[t]}"
    if set(pair) != {"A", "B"}:
      raise InvalidAdapterError(f"{w_path}: {name} lacks lora_A or lora_B")
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise InvalidAdapterError(
          f"{w_path}: {name} lora_A {a.shape} / lora_B {b.shape} are not "
          "[r, in] / [out, r]")
    if dims.setdefault(t, (a.shape[1], b.shape[0])) != (a.shape[1],
                                                        b.shape[0]):
      raise InvalidAdapterError(
          f"{w_path}: {name} has lora_A {a.shape} / lora_B {b.shape}, but "
          f"other layers' {t} factors have d_in, d_out = {dims[t]}; every "
          "layer must share one shape (pass the base's config to check "
          "each against the base)")
    rank_key = pattern_key(rank_patterns, name)
    want_r = (rank_patterns[rank_key][1] if rank_key is not None
              else cfg["r"])
    experts = config.num_experts if t in EXPERT_TARGETS else 1
    if a.shape[0] != want_r * experts:
      raise InvalidAdapterError(
          f"{w_path}: {name} has rank {a.shape[0] // experts}, "
          f"adapter_config.json (r / rank_pattern) says {want_r}")
    alpha_key = pattern_key(alpha_patterns, name)
    ranks[t][i] = int(a.shape[0]) // experts
    alphas[t][i] = float(alpha_patterns[alpha_key][1] if alpha_key
                         is not None else alpha)
  big_r = max(max(r) for r in ranks.values())
  scale = lora_scale(big_r, alpha, rslora)
  lora_a, lora_b, b_scale = {}, {}, {}
  for t in targets:
    d_in, d_out = dims[t]
    lead = (layers, config.num_experts) if t in EXPERT_TARGETS else (layers,)
    lora_a[t] = np.zeros((*lead, d_in, big_r), dtype)
    lora_b[t] = np.zeros((*lead, big_r, d_out), dtype)
    b_scale[t] = [1.0] * layers
    for i in range(layers):
      r = ranks[t][i]
      if r and t in EXPERT_TARGETS:
        a, b = _experts_from_peft(mods[(t, i)], lead[1], r)
        lora_a[t][i, ..., :r] = a
        lora_b[t][i, :, :r, :] = b
        b_scale[t][i] = lora_scale(r, alphas[t][i], rslora) / scale
      elif r:
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
  experts = [t for t in info.targets if t in EXPERT_TARGETS]
  if peft:
    cfg, ranks = dict(peft["config"]), peft["module_ranks"]
  else:
    _check_peft_expressible(info.targets)
    ranks = {t: [info.rank] * layers for t in info.targets}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
           "r": info.rank, "lora_alpha": info.alpha,
           "use_rslora": info.use_rslora, "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False,
           "target_modules": [HF_MODULES[t].split(".")[-1]
                              for t in info.targets if t in HF_MODULES],
           "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": None, "inference_mode": True}
    if experts:
      cfg["target_parameters"] = [EXPERT_PARAMS[t] for t in experts]
  tensors = {}
  for t in info.targets:
    for i in range(layers):
      r = ranks[t][i]
      if not r:
        continue
      if t in EXPERT_TARGETS and not np.any(lora_b[t][i]):
        continue  # a dense layer's (or an untrained) expert row: no delta
      if t in EXPERT_TARGETS:
        # PEFT nests one ParamWrapper per parameter on the experts module,
        # gate_up_proj innermost (it is defined first): its keys gain
        # `.base_layer` when down_proj is wrapped around it.
        nested = t == "experts_gate_up" and all(
            ranks[x][i] for x in EXPERT_TARGETS if x in ranks) and len(
                experts) == 2
        stem = (f"base_model.model.model.layers.{i}.mlp.experts"
                f"{'.base_layer' if nested else ''}")
        a, b = _experts_to_peft(lora_a[t][i, ..., :r], lora_b[t][i, :, :r])
        tensors[f"{stem}.lora_A.weight"] = a
        tensors[f"{stem}.lora_B.weight"] = b
        continue
      stem = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
      tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(
          lora_a[t][i, :, :r].T)
      tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(
          lora_b[t][i, :r, :].T)
  os.makedirs(folder, exist_ok=True)
  # Weights first, each file renamed into place whole: an interrupted
  # export leaves no config pointing at missing or half-written weights.
  w_path, cfg_path = (os.path.join(folder, WEIGHTS_FILE),
                      os.path.join(folder, CONFIG_FILE))
  # Written through open() so the file gets the ordinary 0666 & ~umask
  # mode (safetensors' save_file creates 0600 files, which other users and
  # services cannot read).
  with open(w_path + ".tmp", "wb") as f:
    f.write(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  os.replace(w_path + ".tmp", w_path)
  with open(cfg_path + ".tmp", "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  os.replace(cfg_path + ".tmp", cfg_path)


def _check_peft_expressible(targets) -> None:
  """Refuses targets a PEFT folder cannot carry to transformers 5.

  PEFT (0.21) re-targets `gate_proj` / `up_proj` / `down_proj` entries of
  `target_modules` on Qwen3-MoE / DeepSeek-V3 bases to the fused experts'
  `gate_up_proj` / `down_proj` when it loads a folder, so shared-expert
  LoRA (and dense-layer MLP LoRA next to expert LoRA) would be silently
  re-applied to the routed experts.
  """
  if "router" in targets:
    raise InvalidAdapterError(
        "target 'router' cannot be exported as a PEFT folder (mintjax-only: "
        "PEFT on transformers 5 maps router targets to 'gate.weight'); "
        "export an adapter without it")
  shared = [t for t in targets if t in SHARED_EXPERT_TARGETS]
  dense_mlp = [t for t in targets if t in ("gate", "up", "down")]
  if shared or (dense_mlp and any(t in EXPERT_TARGETS for t in targets)):
    raise InvalidAdapterError(
        f"targets {shared or dense_mlp} cannot be exported as a PEFT folder: "
        "PEFT on transformers 5 re-targets gate_proj/up_proj/down_proj of "
        "MoE bases to the fused experts; export an adapter without them")


def _files_sha256(folder: str) -> dict[str, str]:
  out = {}
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
  return out


def import_peft(reg: Registry, base: BaseModel, *folders: str,
                ids: Sequence[str] | None = None, owner: str = "",
                provenance: Mapping | None = None, **legacy
                ) -> list[Revision]:
  """Imports PEFT LoRA folders as new revisions, against one loaded base.

  Every folder is read and checked against the base (shapes, layer count,
  finite values) and every id against the registry before anything is
  stored: one bad folder imports none. Each adapter is created if missing
  (its spec comes from its folder); an existing one must have the same
  spec and base.

  Example:
    >>> base = load_hf("SmolLM2-135M")            # loaded once
    >>> revs = import_peft(reg, base, "peft/alice", "peft/bob")
    >>> [r.ref for r in revs]                      # ['alice@1', 'bob@1']

  Args:
    reg: the registry.
    base: the loaded base model (`mintjax.model.base.BaseModel`).
    *folders: PEFT LoRA folders.
    ids: adapter ids, one per folder (default: each folder's name).
    owner: owner recorded for adapters created here.
    provenance: extra provenance keys for every revision.

  Returns:
    The new revisions, in folder order.

  Raises:
    InvalidAdapterError: a bad folder, id or spec (nothing was stored).
  """
  if isinstance(base, (str, os.PathLike)):
    # The pre-issue-13 form import_peft(reg, folder, adapter_id, *,
    # base_fingerprint=...) still works for callers not yet moved over.
    return import_peft_folder(reg, base, *folders, owner=owner,
                              provenance=provenance, **legacy)
  if legacy:
    raise TypeError(f"import_peft got unexpected arguments {sorted(legacy)}; "
                    "it takes (registry, base, *folders, ids=, owner=, "
                    "provenance=)")
  if not folders:
    raise InvalidAdapterError("import_peft got no folders; pass one or more "
                              "PEFT LoRA folders")
  names = list(ids) if ids is not None else [
      os.path.basename(os.path.normpath(f)) for f in folders]
  if len(names) != len(folders):
    raise InvalidAdapterError(
        f"import_peft got {len(folders)} folders but {len(names)} ids; "
        "pass one id per folder")
  if len(set(names)) != len(names):
    raise InvalidAdapterError(
        f"adapter ids {names} repeat; pass distinct ids= (folder names are "
        "the default)")
  for f, name in zip(folders, names):
    try:
      check_name(name)
    except ValueError as e:
      raise InvalidAdapterError(
          f"{f}: {e}; pass ids= to name the adapter") from None
  read = [(f, name, read_peft_raw(f, config=base.config))
          for f, name in zip(folders, names)]
  for f, name, (info, _, _) in read:
    rec = reg.catalog.adapter(name)
    if rec is not None and (rec["base_fingerprint"] != base.fingerprint or
                            parse_info(rec["spec"]) != info):
      raise InvalidAdapterError(
          f"{f}: adapter {name!r} already exists with another spec or base "
          f"({rec['spec']}); pass ids= with a new id (nothing was stored)")
  items = []
  for f, name, (info, weights, meta) in read:
    reg.create_adapter(name, spec=info, base_fingerprint=base.fingerprint,
                       owner=owner, exist_ok=True)
    items.append((name, weights, _source_provenance(f, meta, provenance),
                  None, meta))
  return reg.publish_many(items)


def _source_provenance(folder: str, meta: Mapping,
                       provenance: Mapping | None) -> dict:
  """Provenance of an imported folder: its path and files' sha256."""
  prov = dict(provenance or {})
  prov.setdefault("source", {"format": "peft", "path": os.path.abspath(
      folder), "files": _files_sha256(folder),
                             "peft_version": meta["peft"]["config"].get(
                                 "peft_version")})
  return prov


def import_peft_folder(reg: Registry, folder: str, adapter_id: str, *,
                       base_fingerprint: str, owner: str = "",
                       num_layers: int | None = None,
                       provenance: Mapping | None = None,
                       config: ModelConfig | None = None) -> Revision:
  """Imports one PEFT LoRA folder given the base's fingerprint and config.

  For callers without a loaded base; `import_peft` takes the base. The
  adapter is created if missing (its spec comes from the folder); if it
  exists, the folder must match its spec. Provenance records the source
  folder and the sha256 of its files. Pass the base's `config` so every
  factor's shape and layer index are checked against the base; the folder
  is read and checked before anything is stored.
  """
  info, weights, meta = read_peft_raw(folder, num_layers, config=config)
  prov = _source_provenance(folder, meta, provenance)
  reg.create_adapter(adapter_id, spec=info, base_fingerprint=base_fingerprint,
                     owner=owner, exist_ok=True)
  return reg.publish(adapter_id, weights, prov, meta=meta)


def _check_export_target(folder: str) -> None:
  """Refuses to overwrite: `folder` must be absent or hold no adapter."""
  if not isinstance(folder, str) or not folder:
    raise InvalidAdapterError(
        f"export folder {folder!r} must be a non-empty path")
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise InvalidAdapterError(
        f"export target {folder} exists and is not a folder; pass a new or "
        "empty folder")
  taken = [n for n in (CONFIG_FILE, WEIGHTS_FILE)
           if os.path.lexists(os.path.join(folder, n))]
  if taken:
    raise InvalidAdapterError(
        f"{folder} already holds {', '.join(taken)}; export into a new "
        "folder or delete those files first (nothing was written)")


def export_peft(reg: Registry, ref: str, folder: str) -> Revision:
  """Writes revision `ref` as a PEFT LoRA folder that `PeftModel` loads.

  Each family maps itself to LoRA factors (`AdapterFamily.peft_factors`): a
  VeRA adapter is written as its materialised (equivalent) LoRA factors.
  The folder must be new or hold no adapter files: an export never
  overwrites one.
  """
  _check_export_target(folder)
  rec = reg.adapter(parse_ref(ref)[0])
  info = parse_info(rec["spec"])
  rev, first, second = reg.read_raw(ref)
  # The family maps its stored tensors to LoRA factors (LoRA: as stored,
  # per-layer B factors staying in meta; VeRA: materialised).
  lora_info, lora_a, lora_b = info.family.peft_factors(
      info, first, second, RowLayout.from_dict(rec["layout"]).shapes)
  write_peft(folder, lora_info, lora_a, lora_b, rev.meta)
  return rev


def fold_b_scale(lora_b: Mapping[str, np.ndarray], meta: Mapping
                 ) -> dict[str, np.ndarray]:
  """B factors ready to use: PEFT's per-module scale ratios folded in.

  Args:
    lora_b: target -> stored B factor [L, r, d_out].
    meta: the revision's meta; `meta['b_scale'][t]` holds per-layer ratios
      s_m / S (see the module docstring). Absent or all 1: B unchanged.

  Returns:
    target -> B [L, r, d_out] with B[l] * b_scale[t][l] (computed in
    float64, stored dtype kept), so `S * A @ B == s_m * A_m @ B_m`.
  """
  out = dict(lora_b)
  for t, f in (meta.get("b_scale") or {}).items():
    f = np.asarray(f, np.float64)
    if not np.all(f == 1.0):
      b = out[t]  # [L, (E,) r, d_out]
      f = f.reshape(-1, *(1,) * (b.ndim - 1))
      out[t] = (b.astype(np.float64) * f).astype(b.dtype)
  return out


def effective_scales(meta: Mapping, info: AdapterInfo) -> dict[str, list]:
  """Per-module PEFT scales s_m (for reports): b_scale * S."""
  s = lora_scale(info.rank, info.alpha, info.use_rslora)
  return {t: [f * s for f in fs] for t, fs in (meta.get("b_scale") or {
      t: [1.0] for t in info.targets}).items()}


__all__ = ["PeftAdapter", "read_peft", "read_peft_raw", "write_peft",
           "import_peft", "import_peft_folder", "export_peft",
           "fold_b_scale", "effective_scales"]
