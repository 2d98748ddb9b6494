"""Model presets: published Hugging Face `config.json` values, as data.

Owns `PRESETS` (name -> the architecture-relevant keys of that model's
published `config.json`, copied value for value; the source URL is the
comment above each entry), `PUBLISHED_PARAMS` (the parameter count each
model card publishes, used by tests to check the preset) and `get_config`,
which builds a `ModelConfig` through the same parser an HF `config.json`
goes through (`ModelConfig.from_hf_config`), so a preset and the real file
give the same config.

The presets carry no weights: they exist so shapes of real models can be
laid out, compiled ahead of time and costed (`mintjax.aot`) without a hub.
Keys the parser ignores (token ids, dropout, torch_dtype, ...) are left out.
Values were cross-checked against copies of each config.json found in public
repositories (the hub itself is not reachable from this machine).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from mintjax.config import ConfigError, ModelConfig

_LLAMA3_ROPE_8K = {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = dict(_LLAMA3_ROPE_8K, factor=32.0)


def _llama(**kw) -> dict[str, Any]:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "attention_bias": False, **kw}


def _qwen2(**kw) -> dict[str, Any]:
  return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, **kw}


def _qwen3_moe(**kw) -> dict[str, Any]:
  # Every layer is MoE (decoder_sparse_step 1, no mlp_only_layers), top-8 of
  # 128 experts with renormalised weights.
  return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
          "head_dim": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
          "decoder_sparse_step": 1, "mlp_only_layers": [],
          "vocab_size": 151936, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "tie_word_embeddings": False,
          "attention_bias": False, **kw}


def _deepseek_v3(**kw) -> dict[str, Any]:
  # Shared by DeepSeek-V3 and Kimi-K2: multi-head latent attention, one
  # shared expert, sigmoid router with correction bias, top-8.
  return {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
          "intermediate_size": 18432, "moe_intermediate_size": 2048,
          "num_hidden_layers": 61, "q_lora_rank": 1536, "kv_lora_rank": 512,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
          "n_shared_experts": 1, "num_experts_per_tok": 8,
          "norm_topk_prob": True, "scoring_func": "sigmoid",
          "topk_method": "noaux_tc", "moe_layer_freq": 1,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "attention_bias": False, **kw}


PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    "smollm2-135m": _llama(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json
    "smollm2-360m": _llama(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json
    "smollm2-1.7b": _llama(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
        rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True,
        max_position_embeddings=8192),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen2.5-0.5b": _qwen2(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=32768),
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json
    "qwen2.5-1.5b": _qwen2(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=131072),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    "qwen2.5-7b": _qwen2(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        tie_word_embeddings=False, max_position_embeddings=131072),
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    "qwen2.5-72b": _qwen2(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
        tie_word_embeddings=False, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama-3.2-1b": _llama(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
        max_position_embeddings=131072),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    "llama-3.2-3b": _llama(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
        max_position_embeddings=131072),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": _llama(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8K,
        tie_word_embeddings=False, max_position_embeddings=131072),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama-3.1-70b": _llama(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8K,
        tie_word_embeddings=False, max_position_embeddings=131072),
    # https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json
    "llama-3.1-405b": _llama(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8K,
        tie_word_embeddings=False, max_position_embeddings=131072),
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json
    # (v0.3: 32768-token vocabulary, rope_theta 1e6, no sliding window; v0.1's
    # 4096-token sliding window is not modelled by mintjax's attention.)
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "max_position_embeddings": 32768},
    # --- mixture-of-experts bases (issue 15: the trillion-parameter rows) ---
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
    "qwen3-30b-a3b": _qwen3_moe(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        num_experts=128, max_position_embeddings=40960),
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
    "qwen3-235b-a22b": _qwen3_moe(
        hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
        num_experts=128, max_position_embeddings=40960),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    # (the main model; the checkpoint's extra multi-token-prediction layer,
    # num_nextn_predict_layers=1, is not part of the decoder).
    "deepseek-v3-671b": _deepseek_v3(
        model_type="deepseek_v3", num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
        vocab_size=129280, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40.0, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096}),
    # https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json
    # (DeepSeek-V3's architecture: 384 experts, 64 heads, one dense layer).
    "kimi-k2-1t": _deepseek_v3(
        model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64,
        n_routed_experts=384, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, first_k_dense_replace=1,
        vocab_size=163840, rope_theta=50000.0, max_position_embeddings=131072,
        rope_scaling={"type": "yarn", "factor": 32.0, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096}),
}

# Parameter counts as the model cards state them (tests check the presets
# reproduce them within a few percent; rounding on the cards is coarse).
PUBLISHED_PARAMS: dict[str, float] = {
    "smollm2-135m": 135e6, "smollm2-360m": 360e6, "smollm2-1.7b": 1.7e9,
    "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.61e9,
    "qwen2.5-72b": 72.7e9, "llama-3.2-1b": 1.23e9, "llama-3.2-3b": 3.21e9,
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9, "mistral-7b": 7.25e9,
    "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9,
    "deepseek-v3-671b": 671e9, "kimi-k2-1t": 1.04e12,
}
# Parameters active per token (model cards), for the MoE presets.
PUBLISHED_ACTIVE_PARAMS: dict[str, float] = {
    "qwen3-30b-a3b": 3.3e9, "qwen3-235b-a22b": 22e9,
    "deepseek-v3-671b": 37e9, "kimi-k2-1t": 32e9,
}


def names() -> tuple[str, ...]:
  return tuple(PRESETS)


def hf_config(name: str) -> dict[str, Any]:
  """The preset's `config.json` dictionary (a copy).

  Raises:
    ConfigError: unknown preset name, listing the known ones.
  """
  try:
    return json.loads(json.dumps(PRESETS[name.lower()]))
  except KeyError:
    raise ConfigError(
        f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} "
        "or pass the path of an HF config.json") from None


def get_config(name_or_path: str, dtype: str = "bfloat16") -> ModelConfig:
  """A `ModelConfig` from a preset name or a path to an HF `config.json`.

  Args:
    name_or_path: a key of `PRESETS` (case-insensitive) or a file path.
    dtype: parameter and compute dtype.
  """
  path = pathlib.Path(name_or_path)
  if name_or_path.lower() not in PRESETS and (
      path.suffix == ".json" or path.is_file()):
    if not path.is_file():
      raise ConfigError(f"config file {str(path)!r} does not exist")
    hf: Mapping[str, Any] = json.loads(path.read_text())
  else:
    hf = hf_config(name_or_path)
  return ModelConfig.from_hf_config(hf, dtype=dtype)
