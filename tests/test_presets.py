"""Model presets: each parses through the HF config path and has its size."""

import json

import pytest

from mintjax.config import ConfigError, ModelConfig
from mintjax.model import presets


@pytest.mark.parametrize("name", presets.names())
def test_preset_parses_and_matches_published_size(name):
  cfg = presets.get_config(name)
  published = presets.PUBLISHED_PARAMS[name]
  assert abs(cfg.num_params() / published - 1) < 0.02, (
      name, cfg.num_params(), published)
  assert cfg.dtype == "bfloat16"
  # The preset is a config.json: writing it out and reading it back through
  # the same parser gives the same config.
  again = ModelConfig.from_hf_config(cfg.to_hf_config(), dtype="bfloat16")
  assert again == cfg


def test_shape_details_that_param_counts_do_not_pin():
  c8 = presets.get_config("llama-3.1-8b")
  assert (c8.num_kv_heads, c8.head_dim, c8.rope_scaling.factor) == (8, 128, 8)
  c1 = presets.get_config("llama-3.2-1b")
  assert (c1.head_dim, c1.tie_word_embeddings) == (64, True)
  q = presets.get_config("qwen2.5-0.5b")
  assert q.attention_bias and q.tie_word_embeddings and q.num_kv_heads == 2
  assert presets.get_config("smollm2-135m").hidden_size == 576


def test_config_json_path_and_errors(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(presets.hf_config("mistral-7b")))
  assert presets.get_config(str(path)) == presets.get_config("Mistral-7B")
  with pytest.raises(ConfigError, match="unknown model preset 'llama-9b'"):
    presets.get_config("llama-9b")
  with pytest.raises(ConfigError, match="does not exist"):
    presets.get_config(str(tmp_path / "missing.json"))
