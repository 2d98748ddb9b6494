"""PEFT LoRA import/export: parity with PEFT's mixed-batch logits on the
committed fixtures, bit-exact round trips, and refusal of unsupported
features. Reads fixtures with numpy/safetensors only (no torch/peft)."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from mintjax.adapters.bank import bank_from_weights
from mintjax.adapters.spec import ALL_TARGETS, AdapterSpec, AdapterWeights
from mintjax.model import llama
from mintjax.model.hf import load_hf
from mintjax.store import peft_io
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.registry import Registry

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
PEFT = os.path.join(FIX, "peft_llama")
BASE_DIR = os.path.join(FIX, "llama_gqa_llama3rope")


@pytest.fixture(scope="module")
def base():
  return load_hf(BASE_DIR)


@pytest.fixture
def reg(tmp_path):
  r = Registry.open(str(tmp_path / "reg"))
  yield r
  r.close()


def test_imported_adapters_match_peft_mixed_batch_logits(base, reg):
  expected = np.load(os.path.join(PEFT, "expected.npz"))
  names = [str(n) for n in expected["adapter_names"]]
  assert names == ["__base__", "a1", "a2"]
  for name in ("a1", "a2"):
    rev = peft_io.import_peft_folder(reg, os.path.join(PEFT, name), name,
                                     base_fingerprint=base.fingerprint,
                                     num_layers=base.config.num_layers)
    assert rev.provenance["source"]["format"] == "peft"
  loaded = reg.load_many(["a1", "a2"], expect_base=base.fingerprint)
  spec = AdapterSpec(targets=ALL_TARGETS, max_rank=8, num_slots=3)
  bank = bank_from_weights(base.config, spec,
                           {1: loaded[0][1], 2: loaded[1][1]})
  logits = llama.jit_forward(base.params, bank, jnp.array([0, 1, 2]),
                             jnp.asarray(expected["tokens"]),
                             config=base.config)
  np.testing.assert_allclose(np.asarray(logits), expected["logits"],
                             atol=1e-4, rtol=0)
  # Each adapter changes its row: the comparison is not vacuous.
  plain = llama.jit_forward(base.params, None, jnp.zeros(3, jnp.int32),
                            jnp.asarray(expected["tokens"]),
                            config=base.config)
  assert np.abs(np.asarray(plain)[1:] - expected["logits"][1:]).max() > 1e-2


def test_rank_and_alpha_patterns_are_recorded(reg):
  rev = peft_io.import_peft_folder(reg, os.path.join(PEFT, "a2"), "a2",
                                   base_fingerprint="sha256:x")
  peft = rev.meta["peft"]
  assert peft["module_ranks"]["down"] == [8, 2]
  assert peft["module_alphas"]["k"] == [4.0, 16.0]
  assert rev.meta["b_scale"]["q"] == [1.0, 1.0]
  assert rev.meta["b_scale"]["k"][0] == pytest.approx(0.25)
  assert rev.meta["b_scale"]["down"][1] == pytest.approx(2.0)
  _, w = reg.load("a2")
  assert w.rank == 8 and w.use_rslora and w.alpha == 16.0
  assert not np.any(w.lora_a["down"][1, :, 2:])  # padded columns stay zero


@pytest.mark.parametrize("name", ["a1", "a2"])
def test_export_round_trip_is_exact(reg, tmp_path, name):
  src = os.path.join(PEFT, name)
  peft_io.import_peft_folder(reg, src, name, base_fingerprint="sha256:x")
  out = str(tmp_path / "out")
  peft_io.export_peft(reg, name, out)
  want = safetensors.numpy.load_file(os.path.join(src, peft_io.WEIGHTS_FILE))
  got = safetensors.numpy.load_file(os.path.join(out, peft_io.WEIGHTS_FILE))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
  with open(os.path.join(src, peft_io.CONFIG_FILE)) as f:
    want_cfg = json.load(f)
  with open(os.path.join(out, peft_io.CONFIG_FILE)) as f:
    assert json.load(f) == want_cfg
  # And the export imports again to the same stored row.
  again = peft_io.import_peft_folder(reg, out, name,
                                     base_fingerprint="sha256:x")
  assert again.revision == 2 and again.sha256 == reg.resolve(
      f"{name}@1").sha256


def test_native_adapter_exports_as_plain_peft(reg, tmp_path, base):
  w = AdapterWeights.random(base.config, ("q", "down"), 3, alpha=6.0, seed=4)
  reg.create_adapter("n", spec=dict(targets=("q", "down"), rank=3, alpha=6.0,
                                    use_rslora=False),
                     base_fingerprint=base.fingerprint)
  reg.publish("n", w)
  out = str(tmp_path / "n")
  peft_io.export_peft(reg, "n", out)
  with open(os.path.join(out, peft_io.CONFIG_FILE)) as f:
    cfg = json.load(f)
  assert cfg["r"] == 3 and cfg["lora_alpha"] == 6.0
  assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj"]
  info, back, meta = peft_io.read_peft(out)
  assert meta["b_scale"] == {"q": [1.0, 1.0], "down": [1.0, 1.0]}
  for t in ("q", "down"):
    assert np.array_equal(back.lora_a[t], w.lora_a[t])
    assert np.array_equal(back.lora_b[t], w.lora_b[t])


def _variant(tmp_path, config_changes=None, extra_tensors=None):
  out = str(tmp_path / "variant")
  shutil.copytree(os.path.join(PEFT, "a1"), out)
  cfg_path = os.path.join(out, peft_io.CONFIG_FILE)
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(config_changes or {})
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  if extra_tensors:
    path = os.path.join(out, peft_io.WEIGHTS_FILE)
    t = safetensors.numpy.load_file(path)
    t.update(extra_tensors)
    safetensors.numpy.save_file(t, path)
  return out


@pytest.mark.parametrize("changes,extra,feature", [
    ({"use_dora": True}, None, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, None, "embedding"),
    ({"bias": "lora_only"}, None, "LoRA bias"),
    ({"lora_bias": True}, None, "LoRA bias"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, None, "IA3"),
    ({}, {"base_model.model.model.embed_tokens.lora_embedding_A":
          np.zeros((4, 128), np.float32)}, "embedding LoRA"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias":
          np.zeros((64,), np.float32)}, "LoRA bias"),
    ({"r": 8}, None, "rank 4"),
])
def test_unsupported_features_are_named(reg, tmp_path, changes, extra,
                                        feature):
  folder = _variant(tmp_path, changes, extra)
  before = reg.catalog.counts()
  with pytest.raises(InvalidAdapterError, match=feature):
    peft_io.import_peft_folder(reg, folder, "x", base_fingerprint="sha256:x")
  assert reg.catalog.counts() == before
