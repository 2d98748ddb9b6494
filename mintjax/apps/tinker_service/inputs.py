"""What a Tinker request carries, checked: datums, Adam parameters, paths.

Owns `UserError` (a request the service refuses, with a message saying what
to change), `datum_rows` (the SDK's decoded datums -> per-row host arrays of
the compiled forward-backward, refusing bad input before anything runs),
`adam_payload` (AdamParams JSON -> per-slot optimizer fields) and the
checkpoint path helpers ('tinker://<model_id>/weights/<name>' <-> registry
refs and tags).
"""

from __future__ import annotations

import numpy as np

from mintjax.train import losses


class UserError(ValueError):
  """A request the service refuses; the message says what to change."""


def parse_tinker_path(path: str) -> tuple[str, str, str]:
  """'tinker://<id>/weights/<name>' -> (id, 'state' | 'sampler', name)."""
  if not isinstance(path, str) or not path.startswith("tinker://"):
    raise UserError(f"checkpoint path {path!r} must look like "
                    "'tinker://<model_id>/weights/<name>'")
  parts = path[len("tinker://"):].split("/")
  kinds = {"weights": "state", "sampler_weights": "sampler"}
  if len(parts) != 3 or parts[1] not in kinds or not parts[2]:
    raise UserError(f"checkpoint path {path!r} must look like "
                    "'tinker://<model_id>/weights/<name>' or "
                    "'tinker://<model_id>/sampler_weights/<name>'")
  return parts[0], kinds[parts[1]], parts[2]


def tag_of(kind: str, name: str) -> str:
  return f"{kind}-{name}"


def adapter_id_of(model_id: str) -> str:
  """Tinker model id ('<session>:train:<n>') -> registry adapter id."""
  return model_id.replace(":", ".")


def registry_ref(path: str) -> str:
  """A tinker:// checkpoint path -> the registry ref of its revision."""
  model_id, kind, name = parse_tinker_path(path)
  return f"{adapter_id_of(model_id)}:{tag_of(kind, name)}"


def adam_payload(params: dict) -> dict:
  """The SDK's AdamParams JSON -> the per-slot fields `_do_optim` sets."""
  names = {"learning_rate": "learning_rate", "beta1": "beta1",
           "beta2": "beta2", "eps": "eps", "weight_decay": "weight_decay",
           "grad_clip_norm": "grad_clip_norm"}
  out = {}
  for k, v in params.items():
    if k == "type":
      if v not in ("adam", "adamw"):
        raise UserError(f"optimizer {v!r} is not supported; use AdamParams")
      continue
    if k not in names:
      raise UserError(f"unknown Adam parameter {k!r}; known: {sorted(names)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
      raise UserError(f"Adam parameter {k} must be a finite number, got {v!r}")
    out[names[k]] = float(v)
  if out.get("learning_rate", 0.0) < 0:
    raise UserError("learning_rate must be >= 0")
  for k in ("beta1", "beta2"):
    if k in out and not 0 <= out[k] < 1:
      raise UserError(f"{k} must be in [0, 1), got {out[k]}")
  return out


def datum_rows(data, loss_fn: str, config: dict, *, vocab: int, max_len: int,
               forward_only: bool) -> list[dict]:
  """Decoded datums -> per-row host arrays; refuses bad input (UserError)."""
  try:
    kind = losses.loss_code(loss_fn)
  except ValueError as e:
    raise UserError(f"{e} (custom losses run client-side through "
                    "forward_backward_custom)") from None
  lo_default = config.get("clip_low_threshold", losses.PPO_CLIP_DEFAULT[0])
  hi_default = config.get("clip_high_threshold", losses.PPO_CLIP_DEFAULT[1])
  unknown = set(config) - {"clip_low_threshold", "clip_high_threshold"}
  if unknown:
    raise UserError(f"unknown loss_fn_config keys {sorted(unknown)}; known: "
                    "clip_low_threshold, clip_high_threshold")
  if not data:
    raise UserError("forward_backward got no data; send at least one Datum")
  rows = []
  for i, d in enumerate(data):
    tokens = np.asarray(d.tokens).astype(np.int64)
    m = len(tokens)
    if not 0 < m <= max_len:
      raise UserError(f"datum {i} has {m} input tokens; this service takes "
                      f"1..{max_len} (--config.trainer.max_len)")
    if tokens.min() < 0 or tokens.max() >= vocab:
      raise UserError(f"datum {i} has token ids outside [0, {vocab})")
    inp = d.inputs

    def get(name, default=None, _i=i, _inp=inp, _m=m):
      x = _inp.get(name)
      if x is None:
        if default is None:
          raise UserError(f"datum {_i}: loss_fn {loss_fn!r} needs "
                          f"loss_fn_inputs[{name!r}]")
        return np.full(_m, default, np.float32)
      x = np.asarray(x).reshape(-1)
      if len(x) != _m:
        raise UserError(f"datum {_i}: loss_fn_inputs[{name!r}] has {len(x)} "
                        f"entries but model_input has {_m} tokens; give one "
                        "per input token")
      return x
    targets = get("target_tokens")
    if targets.min() < 0 or targets.max() >= vocab:
      raise UserError(f"datum {i}: target_tokens outside [0, {vocab})")
    known = {"target_tokens", "weights", "advantages", "logprobs",
             "clip_low_threshold", "clip_high_threshold", "mask"}
    extra = set(inp) - known
    if extra:
      raise UserError(f"datum {i}: unknown loss_fn_inputs {sorted(extra)}; "
                      f"known: {sorted(known)}")
    rl = kind != 0
    rows.append(dict(
        tokens=tokens.astype(np.int32), targets=targets.astype(np.int32),
        weights=get("weights", 1.0).astype(np.float32),
        advantages=(get("advantages") if rl else get("advantages", 0.0)
                    ).astype(np.float32),
        sampling_logprobs=(get("logprobs") if rl else get("logprobs", 0.0)
                           ).astype(np.float32),
        clip_low=get("clip_low_threshold", lo_default).astype(np.float32),
        clip_high=get("clip_high_threshold", hi_default).astype(np.float32),
        kind=kind, forward_only=forward_only))
  return rows
