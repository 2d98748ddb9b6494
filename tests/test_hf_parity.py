"""Hugging Face loading: logits parity with transformers, round trips, errors.

The expected logits were computed by transformers (see
tests/fixtures/parity/README.md); nothing here imports torch.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from mintjax.config import ConfigError, ModelConfig
from mintjax.model import hf, llama
from mintjax.model.base import compute_fingerprint, random_base

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
MODELS = ["llama_gqa_llama3rope", "qwen2_bias_tied", "mistral"]


def _logits(base, tokens):
  return np.asarray(llama.jit_forward(base.params, None, None, tokens,
                                      config=base.config))


def _copy(name, tmp_path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
  base = hf.load_hf(FIXTURES / name)
  expected = np.load(FIXTURES / name / "expected.npz")
  got = _logits(base, expected["tokens"])
  assert got.shape == expected["logits"].shape
  np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)
  # The fixtures' logits are O(1), so 1e-4 is a meaningful bound.
  assert np.abs(expected["logits"]).max() > 0.5


def test_fixture_features_are_what_they_claim():
  llama_base = hf.load_hf(FIXTURES / "llama_gqa_llama3rope")
  assert llama_base.config.rope_scaling.rope_type == "llama3"
  assert llama_base.config.num_kv_heads < llama_base.config.num_heads
  qwen = hf.load_hf(FIXTURES / "qwen2_bias_tied")
  assert qwen.config.attention_bias and qwen.config.tie_word_embeddings
  assert "lm_head" not in qwen.params
  assert np.abs(np.asarray(qwen.params["layers"]["q_bias"])).max() > 0.01
  assert (FIXTURES / "mistral" / hf.INDEX_FILE).exists()
  assert not (FIXTURES / "mistral" / hf.SINGLE_FILE).exists()


def test_llama3_scaling_matters():
  """Dropping the llama3 rope scaling must break parity (not vacuous)."""
  base = hf.load_hf(FIXTURES / "llama_gqa_llama3rope")
  expected = np.load(FIXTURES / "llama_gqa_llama3rope" / "expected.npz")
  plain = base.config.replace(rope_scaling=None)
  got = np.asarray(llama.jit_forward(base.params, None, None,
                                     expected["tokens"], config=plain))
  assert np.abs(got - expected["logits"]).max() > 1e-3


def test_transformers4_config_style(tmp_path):
  folder = _copy("llama_gqa_llama3rope", tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  params = cfg.pop("rope_parameters")
  cfg["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")  # oldest spelling
  cfg["rope_scaling"] = params
  (folder / "config.json").write_text(json.dumps(cfg))
  base = hf.load_hf(folder)
  ref = hf.load_hf(FIXTURES / "llama_gqa_llama3rope")
  assert base.config == ref.config
  assert base.fingerprint == ref.fingerprint


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
@pytest.mark.parametrize("name", MODELS)
def test_export_load_round_trip_is_exact(name, shard_bytes, tmp_path):
  base = hf.load_hf(FIXTURES / name)
  hf.save_hf(base, tmp_path / "out", max_shard_bytes=shard_bytes)
  assert (tmp_path / "out" / hf.INDEX_FILE).exists() == bool(shard_bytes)
  again = hf.load_hf(tmp_path / "out")
  assert again.config == base.config
  assert again.fingerprint == base.fingerprint
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(base.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_matches_hf_tensors_bit_for_bit(tmp_path):
  base = hf.load_hf(FIXTURES / "qwen2_bias_tied")
  hf.save_hf(base, tmp_path)
  ours = safetensors.numpy.load_file(str(tmp_path / hf.SINGLE_FILE))
  theirs = safetensors.numpy.load_file(
      str(FIXTURES / "qwen2_bias_tied" / hf.SINGLE_FILE))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_random_base_round_trip_with_tokenizer(tmp_path):
  cfg = ModelConfig("llama", vocab_size=259, hidden_size=16,
                    intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8)
  base = random_base(cfg, seed=3)
  hf.save_hf(base, tmp_path)
  again = hf.load_hf(tmp_path)
  assert again.fingerprint == base.fingerprint
  assert again.tokenizer.encode("héllo") == base.tokenizer.encode("héllo")
  assert again.tokenizer.eos_id == base.tokenizer.eos_id


def test_bfloat16_load():
  base = hf.load_hf(FIXTURES / "mistral", dtype="bfloat16")
  assert base.params["layers"]["q"].dtype == np.dtype("bfloat16")
  ref = hf.load_hf(FIXTURES / "mistral")
  # The fingerprint is of float32 values: bf16 rounding changes it.
  assert base.fingerprint != ref.fingerprint
  assert base.fingerprint == compute_fingerprint(base.config, base.params)


# --- errors ------------------------------------------------------------------


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load_hf(tmp_path / "nope")
  folder = _copy("qwen2_bias_tied", tmp_path)
  (folder / "config.json").unlink()
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load_hf(folder)


def test_unsupported_architecture_lists_supported(tmp_path):
  folder = _copy("qwen2_bias_tied", tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["architectures"] = ["GPTNeoXForCausalLM"]
  cfg["model_type"] = "gpt_neox"
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="GPTNeoXForCausalLM.*supported.*"
                     "LlamaForCausalLM"):
    hf.load_hf(folder)


def test_missing_tensor_is_named(tmp_path):
  folder = _copy("qwen2_bias_tied", tmp_path)
  tensors = safetensors.numpy.load_file(str(folder / hf.SINGLE_FILE))
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  safetensors.numpy.save_file(tensors, str(folder / hf.SINGLE_FILE))
  with pytest.raises(hf.CheckpointError,
                     match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
    hf.load_hf(folder)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  folder = _copy("llama_gqa_llama3rope", tmp_path)
  tensors = safetensors.numpy.load_file(str(folder / hf.SINGLE_FILE))
  key = "model.layers.0.mlp.up_proj.weight"
  tensors[key] = tensors[key][:100]
  safetensors.numpy.save_file(tensors, str(folder / hf.SINGLE_FILE))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_hf(folder)
  msg = str(e.value)
  assert key in msg and "(100, 64)" in msg and "(128, 64)" in msg


def test_corrupt_file(tmp_path):
  folder = _copy("qwen2_bias_tied", tmp_path)
  path = folder / hf.SINGLE_FILE
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(hf.CheckpointError, match="cannot read"):
    hf.load_hf(folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match="not valid JSON"):
    hf.load_hf(folder)


def test_sharded_index_errors(tmp_path):
  folder = _copy("mistral", tmp_path)
  (folder / "model-00003-of-00006.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match="missing"):
    hf.load_hf(folder)
  (folder / hf.INDEX_FILE).write_text("[]")
  with pytest.raises(hf.CheckpointError, match="weight_map"):
    hf.load_hf(folder)


def test_no_weights(tmp_path):
  folder = tmp_path / "m"
  folder.mkdir()
  shutil.copy(FIXTURES / "mistral" / "config.json", folder)
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load_hf(folder)
