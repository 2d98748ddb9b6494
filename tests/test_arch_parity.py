"""Qwen3, Qwen3-MoE, Mixtral and DeepSeek-V3 against transformers 5.

The fixtures (tests/fixtures/parity/<arch>/) were written by
tools/make_parity_fixtures.py with torch 2.13.0 CPU and transformers 5:
tiny random f32 models saved with `save_pretrained`, transformers' logits on
random tokens and its greedy `generate` output (its own KV cache). Nothing
here imports torch. Logits must agree to 1e-4 and greedy tokens exactly,
the greedy run going through mintjax's KV cache (prefill, then one token a
step), so MLA's latent cache is exercised too.

Logits, export and config checks run by default; greedy decoding and the
"each feature matters" checks compile more and carry the `moe` marker
(`make test-moe`).
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from mintjax.config import ConfigError, ModelConfig
from mintjax.model import hf, llama, mla
from mintjax.model.kv_cache import init_cache

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
ARCHS = ["qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "deepseek_v3_qfull"]


@functools.lru_cache(maxsize=None)
def _base(name):
  return hf.load_hf(FIXTURES / name)


def _expected(name):
  return np.load(FIXTURES / name / "expected.npz")


@functools.partial(jax.jit, static_argnames=("config",))
def _step(params, cache, tokens_bt, positions_bt, *, config):
  logits, cache = llama.forward(params, None, None, tokens_bt, positions_bt,
                                config=config, cache=cache)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _greedy(base, prompts_bp, new_tokens):
  """Greedy decoding through the KV cache: prefill, then one token a step."""
  c = base.config
  b, p = prompts_bp.shape
  cache = init_cache(c, b, p + new_tokens)
  pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  tok, cache = _step(base.params, cache, jnp.asarray(prompts_bp), pos,
                     config=c)
  out = [tok]
  for i in range(new_tokens - 1):
    pos = jnp.full((b, 1), p + i, jnp.int32)
    tok, cache = _step(base.params, cache, tok[:, None], pos, config=c)
    out.append(tok)
  return np.stack([np.asarray(t) for t in out], axis=1)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(name):
  base, expected = _base(name), _expected(name)
  got = np.asarray(llama.jit_forward(base.params, None, None,
                                     expected["tokens"], config=base.config))
  np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)
  assert np.abs(expected["logits"]).max() > 0.5  # O(1): 1e-4 is meaningful


@pytest.mark.moe
@pytest.mark.parametrize("name", ARCHS)
def test_greedy_matches_transformers(name):
  base, expected = _base(name), _expected(name)
  gen = _greedy(base, expected["prompt_ids"],
                expected["generated_ids"].shape[1])
  np.testing.assert_array_equal(gen, expected["generated_ids"])


def test_fixtures_have_the_features_they_claim():
  q3 = _base("qwen3").config
  assert q3.qk_norm and q3.head_dim * q3.num_heads != q3.hidden_size
  qm = _base("qwen3_moe").config
  assert qm.moe_layers == (0, 2) and qm.norm_topk_prob  # mlp_only_layers=[1]
  assert "dense_mlp" in _base("qwen3_moe").params
  mx = _base("mixtral").config
  assert (mx.num_experts, mx.num_experts_per_tok) == (4, 2)
  ds = _base("deepseek_v3")
  c = ds.config
  assert c.uses_mla and c.q_lora_rank and c.rope_interleave
  assert c.rope_scaling.rope_type == "yarn" and c.moe_layers == (1, 2)
  assert (c.n_group, c.topk_group, c.n_shared_experts) == (4, 2, 1)
  assert c.router_scoring == "sigmoid" and c.routed_scaling_factor == 2.5
  assert np.abs(np.asarray(ds.params["moe"]["router_bias"])).max() > 0.1
  assert not _base("deepseek_v3_qfull").config.q_lora_rank


@pytest.mark.moe
@pytest.mark.parametrize("change", [
    dict(rope_interleave=False), dict(routed_scaling_factor=1.0),
    dict(n_group=1, topk_group=1), dict(norm_topk_prob=False)])
def test_deepseek_features_matter(change):
  """Each DeepSeek-V3 feature changes the logits (parity is not vacuous)."""
  base, expected = _base("deepseek_v3"), _expected("deepseek_v3")
  got = np.asarray(llama.jit_forward(
      base.params, None, None, expected["tokens"],
      config=base.config.replace(**change)))
  assert np.abs(got - expected["logits"]).max() > 1e-3


@pytest.mark.moe
def test_router_bias_steers_choice():
  base, expected = _base("deepseek_v3"), _expected("deepseek_v3")
  params = dict(base.params)
  params["moe"] = dict(params["moe"], router_bias=jnp.zeros_like(
      params["moe"]["router_bias"]))
  got = np.asarray(llama.jit_forward(params, None, None, expected["tokens"],
                                     config=base.config))
  assert np.abs(got - expected["logits"]).max() > 1e-3


@pytest.mark.parametrize("name", ARCHS)
def test_export_is_the_transformers_checkpoint(name, tmp_path):
  """save_hf writes the same tensor names and values transformers wrote,
  and config.json reloads to the same config."""
  base = _base(name)
  hf.save_hf(base, tmp_path)
  ours = safetensors.numpy.load_file(str(tmp_path / hf.SINGLE_FILE))
  theirs = safetensors.numpy.load_file(str(FIXTURES / name / hf.SINGLE_FILE))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  again = hf.load_hf(tmp_path)
  assert again.config == base.config
  assert again.fingerprint == base.fingerprint


def test_kimi_k2_model_type_is_deepseek_v3():
  cfg = json.loads((FIXTURES / "deepseek_v3" / "config.json").read_text())
  cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2")
  assert ModelConfig.from_hf_config(cfg) == _base("deepseek_v3").config
  cfg.pop("architectures")
  assert ModelConfig.from_hf_config(cfg) == _base("deepseek_v3").config


@pytest.mark.parametrize("edit, match", [
    (dict(n_group=3), "n_group dividing num_experts"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(scoring_func="softmax"), "scoring_func 'softmax'"),
    (dict(qk_rope_head_dim=None), "qk_rope_head_dim"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_bad_moe_config_is_refused(edit, match):
  cfg = json.loads((FIXTURES / "deepseek_v3" / "config.json").read_text())
  cfg.update(edit)
  cfg = {k: v for k, v in cfg.items() if v is not None}
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_hf_config(cfg)


def test_moe_checkpoint_missing_expert_is_named(tmp_path):
  base = _base("qwen3_moe")
  hf.save_hf(base, tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / hf.SINGLE_FILE))
  key = "model.layers.2.mlp.experts.5.up_proj.weight"
  del tensors[key]
  safetensors.numpy.save_file(tensors, str(tmp_path / hf.SINGLE_FILE))
  with pytest.raises(hf.CheckpointError, match=key.replace(".", r"\.")):
    hf.load_hf(tmp_path)


def test_qwen3_moe_sparse_step_and_mlp_only_layers():
  cfg = json.loads((FIXTURES / "qwen3_moe" / "config.json").read_text())
  cfg.update(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
  parsed = ModelConfig.from_hf_config(cfg)
  assert parsed.moe_layers == (1, 5)  # (i + 1) % 2 == 0, minus layer 3
  assert ModelConfig.from_hf_config(parsed.to_hf_config()) == parsed
  shapes = llama.param_shapes(parsed)
  assert shapes["moe"]["gate"].shape[:2] == (2, 8)
  assert shapes["dense_mlp"]["gate"].shape[0] == 4


def test_mla_absorbed_form_matches_transformers(monkeypatch):
  """Through a KV cache longer than the prompt, MLA attends to the latents
  directly (kv_b absorbed into q and o; what decode steps use) and still
  gives transformers' logits. (The expanded form is what the cache-free
  `test_logits_match_transformers` runs.)"""
  monkeypatch.setattr(mla, "_absorb_pays", lambda t, s, c: True)
  base, expected = _base("deepseek_v3"), _expected("deepseek_v3")
  tokens = expected["tokens"]
  cache = init_cache(base.config, tokens.shape[0], 16)
  # A fresh jit per form: the monkeypatched choice is read at trace time.
  run = jax.jit(lambda p, cache, tok: llama.forward(
      p, None, None, tok, config=base.config, cache=cache)[0])
  got = np.asarray(run(base.params, cache, tokens))
  np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)


def test_qwen3_sliding_window_is_refused():
  cfg = json.loads((FIXTURES / "qwen3" / "config.json").read_text())
  cfg.update(use_sliding_window=True, sliding_window=8)
  with pytest.raises(ConfigError, match="use_sliding_window"):
    ModelConfig.from_hf_config(cfg)
