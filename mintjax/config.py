"""Model configuration: one frozen dataclass for every supported base model.

Owns `ModelConfig` (the shape and numerics of a Llama-family decoder) and
`RopeScaling`, their validation, and their conversion from a Hugging Face
`config.json` (transformers 4 `rope_theta`/`rope_scaling` and transformers 5
`rope_parameters` styles). Adapter shapes live in `mintjax.adapters.spec`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A model configuration is invalid or unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (transformers' `rope_type` families).

  Attributes:
    rope_type: 'default', 'linear' or 'llama3'.
    factor: frequency division factor ('linear' and 'llama3').
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only.
  """

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("default", "linear", "llama3"):
      raise ConfigError(
          f"unsupported rope_type {self.rope_type!r}; supported: 'default', "
          "'linear', 'llama3'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder (Llama 2/3, Mistral, Qwen2).

  Attributes:
    architecture: one of SUPPORTED_ARCHITECTURES.
    vocab_size: V.
    hidden_size: D, the residual width.
    intermediate_size: F, the SwiGLU hidden width.
    num_layers: L.
    num_heads: H query heads.
    num_kv_heads: K key/value heads (H % K == 0; K == H is MHA, K == 1 MQA).
    head_dim: per-head width (usually D // H).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: optional RoPE scaling.
    tie_word_embeddings: the LM head reuses the embedding matrix.
    attention_bias: q/k/v projections carry biases (Qwen2).
    max_position_embeddings: longest supported context.
    dtype: compute and parameter dtype ('float32' or 'bfloat16').
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 4096
  dtype: str = "float32"

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(
          f"unsupported architecture {self.architecture!r}; supported: "
          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in _DTYPES:
      raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")

  # Derived widths used by adapters and sharding.
  @property
  def q_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_kv_heads * self.head_dim

  def projection_shape(self, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection named q, k, v, o, gate, up or down."""
    shapes = {
        "q": (self.hidden_size, self.q_dim),
        "k": (self.hidden_size, self.kv_dim),
        "v": (self.hidden_size, self.kv_dim),
        "o": (self.q_dim, self.hidden_size),
        "gate": (self.hidden_size, self.intermediate_size),
        "up": (self.hidden_size, self.intermediate_size),
        "down": (self.intermediate_size, self.hidden_size),
    }
    if target not in shapes:
      raise ConfigError(
          f"unknown projection {target!r}; expected one of {tuple(shapes)}")
    return shapes[target]

  def num_params(self) -> int:
    per_layer = sum(a * b for a, b in (self.projection_shape(t) for t in (
        "q", "k", "v", "o", "gate", "up", "down")))
    per_layer += 2 * self.hidden_size
    if self.attention_bias:
      per_layer += self.q_dim + 2 * self.kv_dim
    total = self.num_layers * per_layer + self.vocab_size * self.hidden_size
    total += self.hidden_size
    if not self.tie_word_embeddings:
      total += self.vocab_size * self.hidden_size
    return total

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # --- serialisation -------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ConfigError(f"unknown ModelConfig keys: {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], dtype: str = "float32"
                     ) -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dictionary."""
    architecture = _hf_architecture(hf)
    try:
      hidden = int(hf["hidden_size"])
      heads = int(hf["num_attention_heads"])
      cfg = dict(
          architecture=architecture,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or heads),
          head_dim=int(hf.get("head_dim") or hidden // heads),
      )
    except KeyError as e:
      raise ConfigError(
          f"config.json is missing required key {e.args[0]!r}") from None
    rope_theta, rope_scaling = _hf_rope(hf)
    default_bias = architecture == "qwen2"
    return cls(
        **cfg,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", default_bias)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        dtype=dtype,
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The Hugging Face `config.json` (transformers 4 style) for this model."""
    arch = {v: k for k, v in _HF_ARCHITECTURES.items()}[self.architecture]
    out = dict(
        architectures=[arch], model_type=self.architecture,
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings,
        hidden_act="silu",
    )
    if self.architecture == "llama":
      out["attention_bias"] = self.attention_bias
    if self.rope_scaling is not None:
      out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
    return out


def _hf_architecture(hf: Mapping[str, Any]) -> str:
  names = list(hf.get("architectures") or [])
  for name in names:
    if name in _HF_ARCHITECTURES:
      return _HF_ARCHITECTURES[name]
  model_type = hf.get("model_type")
  if model_type in SUPPORTED_ARCHITECTURES:
    return model_type
  raise ConfigError(
      f"unsupported architecture (architectures={names}, "
      f"model_type={model_type!r}); supported: "
      f"{', '.join(sorted(_HF_ARCHITECTURES))}")


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads RoPE settings from either transformers config style."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:
    params = params["full_attention"]
  scaling = None
  if isinstance(params, Mapping):  # transformers >= 5
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params
  else:  # transformers 4
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
  if not scaling:
    return theta, None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type not in ("linear", "llama3"):
    raise ConfigError(
        f"unsupported RoPE scaling {rope_type!r}; supported: linear, llama3")
  kwargs = dict(rope_type=rope_type, factor=float(scaling.get("factor", 1.0)))
  if rope_type == "llama3":
    kwargs.update(
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)))
  return theta, RopeScaling(**kwargs)
