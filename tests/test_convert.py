"""Base checkpoints (Orbax) and tools/convert.py.

Covers save -> load onto an 8-device mesh (identical params, fingerprint,
shardings from the logical axis rules), dtype casting on restore, the
convert CLI end to end, and the errors for missing or damaged checkpoints.
"""

import gc
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mintjax import sharding
from mintjax.model import hf, llama
from mintjax.model.base import random_base
from mintjax.config import ModelConfig
from mintjax.model import checkpoint as bc
from tools import convert

# When one array read fails, Orbax abandons its other pending per-array read
# coroutines; Python reports them whenever they are garbage collected, in
# whichever later test that happens. They are harmless, so they are ignored
# here (and only here).
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "parity"


def _assert_same_params(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def qwen():
  return hf.load_hf(FIXTURES / "qwen2_bias_tied")


@pytest.fixture
def saved(qwen, tmp_path):
  return bc.save_base(tmp_path / "ckpt", qwen)


def test_save_writes_the_documented_files(saved, qwen):
  names = {p.name for p in saved.iterdir()}
  assert {bc.META_FILE, bc.PARAMS_DIR} <= names
  meta = json.loads((saved / bc.META_FILE).read_text())
  assert meta["fingerprint"] == qwen.fingerprint
  assert meta["format_version"] == bc.FORMAT_VERSION
  assert ModelConfig.from_dict(meta["config"]) == qwen.config


def test_load_onto_mesh_is_identical(saved, qwen):
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  loaded = bc.load_base(saved, mesh=mesh, verify=True)
  assert loaded.fingerprint == qwen.fingerprint
  assert loaded.config == qwen.config
  _assert_same_params(loaded.params, qwen.params)
  want = sharding.logical_sharding(llama.param_logical_axes(qwen.config),
                                   llama.param_shapes(qwen.config), mesh)
  for arr, sh in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
    assert arr.sharding == sh
  # Really sharded: q is split over fsdp (embed) and tensor (heads).
  q = loaded.params["layers"]["q"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 16, 16)


def test_load_with_custom_rules_and_no_mesh(saved, qwen):
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  rules = dict(sharding.DEFAULT_RULES, embed=None, vocab="fsdp")
  loaded = bc.load_base(saved, mesh=mesh, rules=rules)
  assert loaded.params["embed"].sharding.spec == \
      jax.sharding.PartitionSpec("fsdp", None)
  single = bc.load_base(saved)
  _assert_same_params(single.params, qwen.params)
  assert single.params["embed"].sharding.device_set == {jax.devices()[0]}


def test_dtype_cast_on_restore(saved, qwen):
  loaded = bc.load_base(saved, dtype="bfloat16")
  assert loaded.config.dtype == "bfloat16"
  assert all(a.dtype == np.dtype("bfloat16")
             for a in jax.tree.leaves(loaded.params))
  np.testing.assert_allclose(
      np.asarray(loaded.params["embed"], np.float32),
      np.asarray(qwen.params["embed"]), rtol=1e-2)
  assert loaded.fingerprint == qwen.fingerprint  # identity of saved weights
  with pytest.raises(ValueError, match="verify=True needs the saved dtype"):
    bc.load_base(saved, dtype="bfloat16", verify=True)


def test_tokenizer_round_trip(tmp_path):
  cfg = ModelConfig("llama", vocab_size=259, hidden_size=16,
                    intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=8)
  base = random_base(cfg, seed=1)
  bc.save_base(tmp_path, base)
  loaded = bc.load_base(tmp_path)
  assert loaded.tokenizer.encode("ünï") == base.tokenizer.encode("ünï")
  assert loaded.tokenizer.eos_id == base.tokenizer.eos_id


# --- errors --------------------------------------------------------------


def test_missing_directory_and_marker(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    bc.load_base(tmp_path / "absent")
  with pytest.raises(hf.CheckpointError, match="no mintjax_base.json"):
    bc.load_base(tmp_path)


def test_corrupt_metadata(saved):
  meta_path = saved / bc.META_FILE
  good = meta_path.read_text()
  meta_path.write_text("{truncated")
  with pytest.raises(hf.CheckpointError, match="corrupt"):
    bc.load_base(saved)
  meta = json.loads(good)
  del meta["fingerprint"]
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(hf.CheckpointError, match="fingerprint"):
    bc.load_base(saved)
  meta = json.loads(good)
  meta["format_version"] = 99
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(hf.CheckpointError, match="format_version 99"):
    bc.load_base(saved)


def test_tampered_fingerprint_is_detected_by_verify(saved):
  meta_path = saved / bc.META_FILE
  meta = json.loads(meta_path.read_text())
  meta["fingerprint"] = "sha256:" + "0" * 64
  meta_path.write_text(json.dumps(meta))
  bc.load_base(saved)  # without verify the stored identity is trusted
  with pytest.raises(hf.CheckpointError, match="hash to"):
    bc.load_base(saved, verify=True)


def test_missing_or_damaged_params(saved):
  shutil.rmtree(saved / bc.PARAMS_DIR)
  with pytest.raises(hf.CheckpointError, match="no params/ folder"):
    bc.load_base(saved)


def test_damaged_param_files(saved):
  # Truncate the array data Orbax wrote (its tree metadata stays intact).
  data = [p for p in (saved / bc.PARAMS_DIR).rglob("ocdbt.process_*/d/*")]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[:7])
  with pytest.raises(hf.CheckpointError, match="cannot restore parameters"):
    bc.load_base(saved)
  gc.collect()


def test_config_mismatch_is_reported(saved):
  meta_path = saved / bc.META_FILE
  meta = json.loads(meta_path.read_text())
  meta["config"]["hidden_size"] = 64
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(hf.CheckpointError,
                     match=r"\['embed'\] is stored with shape \(96, 32\).*"
                     r"expects \(96, 64\)"):
    bc.load_base(saved)


def test_refuses_to_overwrite(saved, qwen, tmp_path):
  before = (saved / bc.META_FILE).read_text()
  with pytest.raises(hf.CheckpointError, match="not empty"):
    bc.save_base(saved, qwen)
  assert (saved / bc.META_FILE).read_text() == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(hf.CheckpointError, match="not a mintjax base"):
    bc.save_base(other, qwen, overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"
  bc.save_base(saved, qwen, overwrite=True)
  assert bc.load_base(saved, verify=True).fingerprint == qwen.fingerprint


# --- tools/convert.py ----------------------------------------------------


def test_convert_hf_to_mintjax_and_back(tmp_path, qwen):
  summary = convert.convert(str(FIXTURES / "qwen2_bias_tied"), None,
                            str(tmp_path / "mj"), "float32")
  assert summary["fingerprint"] == qwen.fingerprint
  assert summary["param_count"] == qwen.config.num_params()
  _assert_same_params(bc.load_base(tmp_path / "mj").params, qwen.params)
  convert.convert(str(FIXTURES / "qwen2_bias_tied"), None,
                  str(tmp_path / "hf"), "float32", fmt="hf")
  assert hf.load_hf(tmp_path / "hf").fingerprint == qwen.fingerprint


def test_convert_cli(tmp_path):
  out = tmp_path / "mj"
  proc = subprocess.run(
      [sys.executable, "-m", "tools.convert",
       f"--hf={FIXTURES / 'mistral'}", f"--out={out}", "--dtype=bfloat16"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "fingerprint  sha256:" in proc.stdout
  assert "params       22,688" in proc.stdout
  loaded = bc.load_base(out)
  assert loaded.config.dtype == "bfloat16"
  assert loaded.config.architecture == "mistral"
