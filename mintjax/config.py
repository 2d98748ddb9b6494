"""Model configuration: one frozen dataclass for every supported base model.

Owns `ModelConfig` (the shape and numerics of a decoder: Llama family,
Qwen3, and the mixture-of-experts families Qwen3-MoE, Mixtral and
DeepSeek-V3/Kimi-K2 with multi-head latent attention) and `RopeScaling`,
their validation, and their conversion from a Hugging Face `config.json`
(transformers 4 `rope_theta`/`rope_scaling` and transformers 5
`rope_parameters` styles). Adapter shapes live in `mintjax.adapters.spec`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe",
                           "mixtral", "deepseek_v3")
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
# model_type spellings that map to an architecture (Kimi-K2 is DeepSeek-V3).
_MODEL_TYPES = {"kimi_k2": "deepseek_v3"}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A model configuration is invalid or unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (transformers' `rope_type` families).

  Attributes:
    rope_type: 'default', 'linear', 'llama3' or 'yarn'.
    factor: frequency division factor ('linear', 'llama3', 'yarn').
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 and yarn.
    beta_fast, beta_slow: yarn's ramp bounds (in rotations).
    mscale, mscale_all_dim: yarn's attention-factor exponents (DeepSeek).
    attention_factor: yarn's cos/sin scale; 0 derives it from mscale*.
    truncate: yarn rounds the ramp bounds to integers (transformers default).
  """

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  attention_factor: float = 0.0
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in _ROPE_TYPES:
      raise ConfigError(
          f"unsupported rope_type {self.rope_type!r}; supported: "
          f"{', '.join(map(repr, _ROPE_TYPES))}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder (Llama family, Qwen3, MoE families).

  The fields after `dtype` default to a dense Llama-style block; Qwen3 sets
  `qk_norm`, the MoE families set the `num_experts` group, and DeepSeek-V3
  (and Kimi-K2, the same architecture) set the multi-head latent attention
  group (`kv_lora_rank` > 0). With MLA, `head_dim` is the RoPE width
  (`qk_rope_head_dim`) and `num_kv_heads == num_heads`, as in transformers.

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
    qk_norm: RMSNorm over head_dim on every q and k head before RoPE (Qwen3).
    num_experts: E routed experts per MoE layer (0 = dense model).
    num_experts_per_tok: k experts each token is routed to.
    moe_intermediate_size: Fe, each routed expert's SwiGLU hidden width.
    norm_topk_prob: renormalise the k routing weights to sum to 1.
    router_scoring: 'softmax' (Qwen3-MoE, Mixtral) or 'sigmoid' (DeepSeek-V3,
      whose router adds `e_score_correction_bias` for the choice only).
    n_shared_experts: shared experts (always on) of width
      n_shared_experts * Fe (DeepSeek-V3).
    n_group, topk_group: group-limited routing: experts split into n_group
      groups, a token picks among the topk_group best groups.
    routed_scaling_factor: routed weights are multiplied by this.
    moe_layers: indices of the MoE layers (the rest use the dense MLP of
      width F); from HF's first_k_dense_replace, decoder_sparse_step and
      mlp_only_layers.
    q_lora_rank: MLA query low rank (0 = a full q projection).
    kv_lora_rank: MLA key/value latent rank (0 = no MLA).
    qk_nope_head_dim, qk_rope_head_dim: MLA q/k head split (no-RoPE, RoPE).
    v_head_dim: MLA value head width.
    rope_interleave: RoPE pairs interleaved channels (DeepSeek-V3), i.e. the
      rope part is de-interleaved before rotate-half.
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
  qk_norm: bool = False
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  router_scoring: str = "softmax"
  n_shared_experts: int = 0
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  moe_layers: tuple[int, ...] = ()
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = False
  # "float" (kernels in `dtype`) or "int8": weight-only int8 kernels with
  # per-channel scales (mintjax.model.quant), dequantized one layer at a time.
  weight_format: str = "float"

  def __post_init__(self):
    object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
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
    if self.weight_format not in ("float", "int8"):
      raise ConfigError(f"weight_format must be 'float' or 'int8', got "
                        f"{self.weight_format!r}")
    self._check_moe()
    self._check_mla()

  def _check_moe(self):
    if not self.moe_layers:
      return
    bad = [i for i in self.moe_layers
           if not isinstance(i, int) or not 0 <= i < self.num_layers]
    if bad or list(self.moe_layers) != sorted(set(self.moe_layers)):
      raise ConfigError(
          f"moe_layers must be sorted distinct layer indices in "
          f"[0, {self.num_layers}), got {self.moe_layers}")
    e, k = self.num_experts, self.num_experts_per_tok
    if not (e > 0 and 0 < k <= e and self.moe_intermediate_size > 0):
      raise ConfigError(
          f"MoE layers need num_experts > 0, 0 < num_experts_per_tok <= "
          f"num_experts and moe_intermediate_size > 0; got {e}, {k}, "
          f"{self.moe_intermediate_size}")
    if self.router_scoring not in ("softmax", "sigmoid"):
      raise ConfigError(
          f"router_scoring must be 'softmax' or 'sigmoid', got "
          f"{self.router_scoring!r}")
    if (e % self.n_group or not 0 < self.topk_group <= self.n_group
        or k > self.topk_group * (e // self.n_group)):
      raise ConfigError(
          f"group-limited routing needs n_group dividing num_experts ({e}), "
          f"0 < topk_group <= n_group and num_experts_per_tok ({k}) <= "
          f"topk_group * experts per group; got n_group={self.n_group}, "
          f"topk_group={self.topk_group}")

  def _check_mla(self):
    if not self.kv_lora_rank:
      return
    if self.attention_bias:
      raise ConfigError(
          "multi-head latent attention with attention_bias=True is not "
          "supported (DeepSeek-V3 and Kimi-K2 have no attention biases)")
    for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"multi-head latent attention needs {name} > 0")
    if (self.head_dim != self.qk_rope_head_dim
        or self.num_kv_heads != self.num_heads):
      raise ConfigError(
          "with multi-head latent attention head_dim must equal "
          f"qk_rope_head_dim ({self.qk_rope_head_dim}) and num_kv_heads "
          f"num_heads ({self.num_heads}); got head_dim={self.head_dim}, "
          f"num_kv_heads={self.num_kv_heads}")

  # Architecture predicates the decoder branches on (static under jit).
  @property
  def uses_mla(self) -> bool:
    return self.kv_lora_rank > 0

  def is_moe_layer(self, layer: int) -> bool:
    return layer in self.moe_layers

  @property
  def num_moe_layers(self) -> int:
    return len(self.moe_layers)

  @property
  def num_dense_layers(self) -> int:
    return self.num_layers - len(self.moe_layers)

  @property
  def shared_expert_size(self) -> int:
    return self.n_shared_experts * self.moe_intermediate_size

  @property
  def qk_head_dim(self) -> int:
    """Width of one MLA query/key head (no-RoPE part + RoPE part)."""
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  # Derived widths used by adapters and sharding.
  @property
  def q_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_kv_heads * self.head_dim

  def projection_shape(self, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection named q, k, v, o, gate, up or down.

    With MLA the attention projections are q (or q_a, q_b), kv_a, kv_b, o;
    gate/up/down are the dense layers' MLP.
    """
    if self.uses_mla:
      h = self.num_heads
      shapes = {
          "q": (self.hidden_size, h * self.qk_head_dim),
          "q_a": (self.hidden_size, self.q_lora_rank),
          "q_b": (self.q_lora_rank, h * self.qk_head_dim),
          "kv_a": (self.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim),
          "kv_b": (self.kv_lora_rank,
                   h * (self.qk_nope_head_dim + self.v_head_dim)),
          "o": (h * self.v_head_dim, self.hidden_size),
          "gate": (self.hidden_size, self.intermediate_size),
          "up": (self.hidden_size, self.intermediate_size),
          "down": (self.intermediate_size, self.hidden_size),
      }
      if target not in self.projection_names():
        raise ConfigError(
            f"unknown projection {target!r} for multi-head latent attention; "
            f"expected one of {self.projection_names()}")
      return shapes[target]
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

  def projection_names(self) -> tuple[str, ...]:
    """The per-layer projections of this architecture (attention, dense MLP)."""
    if not self.uses_mla:
      return ("q", "k", "v", "o", "gate", "up", "down")
    q = ("q_a", "q_b") if self.q_lora_rank else ("q",)
    return q + ("kv_a", "kv_b", "o", "gate", "up", "down")

  def num_params(self) -> int:
    attn = sum(a * b for a, b in (self.projection_shape(t) for t in
                                  self.projection_names()[:-3]))
    if self.uses_mla:
      attn += self.kv_lora_rank + self.q_lora_rank
    dense = 3 * self.hidden_size * self.intermediate_size
    moe = self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size
    moe += self.hidden_size * self.num_experts
    moe += 3 * self.hidden_size * self.shared_expert_size
    if self.router_scoring == "sigmoid":
      moe += self.num_experts
    per_layer = attn + 2 * self.hidden_size
    if self.attention_bias:
      per_layer += self.q_dim + 2 * self.kv_dim
    if self.qk_norm:
      per_layer += 2 * self.head_dim
    total = self.num_layers * per_layer + self.vocab_size * self.hidden_size
    total += self.num_dense_layers * dense + self.num_moe_layers * moe
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
    if "moe_layers" in d:
      d["moe_layers"] = tuple(d["moe_layers"])
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
    if architecture in ("qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
      raise ConfigError(
          "config.json sets use_sliding_window=true; sliding-window "
          "attention is not supported, set it to false (full attention)")
    cfg.update(_hf_moe(hf, architecture, cfg["num_layers"]))
    if architecture == "deepseek_v3":
      cfg.update(_hf_mla(hf))
    cfg["qk_norm"] = architecture in ("qwen3", "qwen3_moe")
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
    if self.architecture in ("llama", "qwen3", "qwen3_moe", "deepseek_v3"):
      out["attention_bias"] = self.attention_bias
    if self.rope_scaling is not None:
      out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
    out.update(self._hf_moe_mla_keys())
    return out

  def _hf_moe_mla_keys(self) -> dict[str, Any]:
    """The MoE and MLA keys of `to_hf_config` (inverse of `_hf_moe/_hf_mla`)."""
    a, out = self.architecture, {}
    moe = set(self.moe_layers)
    if a == "mixtral":
      out.update(num_local_experts=self.num_experts,
                 num_experts_per_tok=self.num_experts_per_tok)
    elif a == "qwen3_moe":
      out.update(num_experts=self.num_experts,
                 num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                 mlp_only_layers=[i for i in range(self.num_layers)
                                  if i not in moe])
    elif a == "deepseek_v3":
      first = self.num_dense_layers
      out.update(
          n_routed_experts=self.num_experts,
          num_experts_per_tok=self.num_experts_per_tok,
          moe_intermediate_size=self.moe_intermediate_size,
          norm_topk_prob=self.norm_topk_prob,
          n_shared_experts=self.n_shared_experts, n_group=self.n_group,
          topk_group=self.topk_group,
          routed_scaling_factor=self.routed_scaling_factor,
          first_k_dense_replace=first, scoring_func=self.router_scoring,
          topk_method="noaux_tc",
          q_lora_rank=self.q_lora_rank or None,
          kv_lora_rank=self.kv_lora_rank,
          qk_nope_head_dim=self.qk_nope_head_dim,
          qk_rope_head_dim=self.qk_rope_head_dim,
          v_head_dim=self.v_head_dim, rope_interleave=self.rope_interleave)
    return out


def _hf_architecture(hf: Mapping[str, Any]) -> str:
  names = list(hf.get("architectures") or [])
  for name in names:
    if name in _HF_ARCHITECTURES:
      return _HF_ARCHITECTURES[name]
  model_type = hf.get("model_type")
  if model_type in SUPPORTED_ARCHITECTURES:
    return model_type
  if model_type in _MODEL_TYPES:
    return _MODEL_TYPES[model_type]
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
  if rope_type not in _ROPE_TYPES:
    raise ConfigError(
        f"unsupported RoPE scaling {rope_type!r}; supported: linear, llama3, "
        "yarn")
  kwargs = dict(rope_type=rope_type, factor=float(scaling.get("factor", 1.0)))
  if rope_type == "yarn":
    kwargs.update(
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 8192)),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        mscale=float(scaling.get("mscale") or 0.0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        attention_factor=float(scaling.get("attention_factor") or 0.0),
        truncate=bool(scaling.get("truncate", True)))
  if rope_type == "llama3":
    kwargs.update(
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)))
  return theta, RopeScaling(**kwargs)


def _hf_moe(hf: Mapping[str, Any], architecture: str, num_layers: int
            ) -> dict[str, Any]:
  """The MoE fields of a Qwen3-MoE, Mixtral or DeepSeek-V3 `config.json`."""
  if architecture not in ("qwen3_moe", "mixtral", "deepseek_v3"):
    return {}
  get = lambda *names, default=None: next(
      (hf[n] for n in names if hf.get(n) is not None), default)
  experts = int(get("num_experts", "num_local_experts", "n_routed_experts",
                    default=0))
  out = dict(num_experts=experts,
             num_experts_per_tok=int(get("num_experts_per_tok", default=2)))
  layers = range(num_layers)
  if architecture == "mixtral":
    # Every Mixtral layer is MoE; its intermediate_size is the expert width
    # and the top-2 weights are always renormalised.
    out.update(moe_intermediate_size=int(hf["intermediate_size"]),
               norm_topk_prob=True, moe_layers=tuple(layers))
  elif architecture == "qwen3_moe":
    step = int(get("decoder_sparse_step", default=1))
    dense = set(get("mlp_only_layers", default=[]))
    out.update(
        moe_intermediate_size=int(get("moe_intermediate_size",
                                      "intermediate_size")),
        norm_topk_prob=bool(get("norm_topk_prob", default=False)),
        moe_layers=tuple(i for i in layers if i not in dense and experts > 0
                         and (i + 1) % step == 0))
  else:
    scoring = get("scoring_func", default="sigmoid")
    if scoring != "sigmoid":
      raise ConfigError(
          f"DeepSeek scoring_func {scoring!r} is not supported; DeepSeek-V3 "
          "and Kimi-K2 use 'sigmoid'")
    first = int(get("first_k_dense_replace", default=0))
    out.update(
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(get("norm_topk_prob", default=True)),
        router_scoring="sigmoid",
        n_shared_experts=int(get("n_shared_experts", default=0)),
        n_group=int(get("n_group", default=1)),
        topk_group=int(get("topk_group", default=1)),
        routed_scaling_factor=float(get("routed_scaling_factor",
                                        default=1.0)),
        moe_layers=tuple(range(first, num_layers)))
  return out


def _hf_mla(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Multi-head latent attention fields (DeepSeek-V3, Kimi-K2)."""
  try:
    rope = int(hf["qk_rope_head_dim"])
    return dict(
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=rope,
        v_head_dim=int(hf["v_head_dim"]), head_dim=rope,
        num_kv_heads=int(hf["num_attention_heads"]),
        rope_interleave=bool(hf.get("rope_interleave", True)))
  except KeyError as e:
    raise ConfigError(
        f"config.json is missing required key {e.args[0]!r}") from None
