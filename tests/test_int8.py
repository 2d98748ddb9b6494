"""The int8 weight-only base: quantization, the model on it, train, serve, disk.

The model on an int8 tree must compute exactly what it computes on the
dequantized float tree (the per-layer dequantization is the only change), for
a dense and an MoE base; LoRA trains on top with the int8 base untouched;
the Engine serves it; the safetensors round trip is bit-identical and
refuses damaged or foreign files.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import int8_base, llama, quant
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.sampling import SamplingParams
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step

DENSE = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
MOE = ModelConfig(architecture="qwen3_moe", vocab_size=259, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qk_norm=True, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16,
                  norm_topk_prob=True, moe_layers=(1,))


@pytest.fixture(scope="module")
def dense():
  base = random_base(DENSE, seed=0, std=0.3)
  return base, int8_base.quantize_base(base)


def _tokens(seed=0, b=2, t=12):
  return np.random.default_rng(seed).integers(3, 259, (b, t)).astype(np.int32)


def test_quantize_is_per_channel_absmax():
  w = np.random.default_rng(0).normal(size=(3, 40, 24)).astype(np.float32)
  w[:, :, 5] = 0.0                     # an all-zero channel
  w[1, 7, 9] = 50.0                    # one outlier: only its channel coarsens
  qw = quant.quantize(jnp.asarray(w), axis=-2)
  assert qw.q.dtype == jnp.int8 and qw.scale.shape == (3, 1, 24)
  back = np.asarray(quant.dequantize(qw))
  err = np.abs(back - w)
  assert (err <= np.asarray(qw.scale) / 2 + 1e-7).all()
  assert not back[:, :, 5].any()
  assert np.abs(np.asarray(qw.q)).max() == 127
  # The outlier's channel has a 50/127 step, every other one stays fine.
  others = np.delete(err[1], 9, axis=1)
  assert others.max() < 0.05 and err[1, :, 9].max() > 0.05


def test_quantized_tree_layout_and_memory(dense):
  base, q = dense
  p = q.params
  assert isinstance(p["embed"], quant.Int8Weight)
  assert p["embed"].scale.shape == (DENSE.vocab_size, 1)  # per row = tied head
  assert isinstance(p["layers"]["q"], quant.Int8Weight)
  assert p["layers"]["q"].scale.shape == (2, 1, DENSE.q_dim)
  assert not isinstance(p["layers"]["attn_norm"], quant.Int8Weight)
  assert q.fingerprint != base.fingerprint
  ratio = quant.nbytes(p) / quant.nbytes(base.params)
  assert 0.25 < ratio < 0.30, ratio    # f32 -> int8 plus scales and norms
  # The int8 config's parameter shapes are the quantized tree's, so loaders,
  # checkpoints, shardings and AOT compiles see the int8 layout.
  assert q.config == DENSE.replace(weight_format="int8")
  shapes = llama.param_shapes(q.config)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
      lambda a: (a.shape, a.dtype), p)


def test_int8_tree_shards_by_its_logical_axes(dense):
  _, q = dense
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  axes = llama.param_logical_axes(q.config)
  assert axes["layers"]["q"] == quant.Int8Weight(
      ("layers", "embed", "q_heads"), ("layers", None, "q_heads"))
  placed = sharding.shard_tree(q.params, axes, mesh)
  w = placed["layers"]["q"]
  assert w.q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                         "tensor")
  assert w.scale.sharding.spec == jax.sharding.PartitionSpec(None, None,
                                                             "tensor")
  with pytest.raises(Exception):
    # A float config's axes do not fit an int8 tree (what the config
    # field is for).
    sharding.shard_tree(q.params, llama.param_logical_axes(DENSE), mesh)


# The MoE twin, training and serving compile more programs (~1 min on 2
# busy cores): `make test-moe`.
@pytest.mark.parametrize("config", [
    DENSE, pytest.param(MOE, marks=pytest.mark.moe)], ids=["dense", "moe"])
def test_model_on_int8_equals_model_on_dequantized_weights(config):
  base = random_base(config, seed=1)  # std 0.02, a trained model's scale
  q = int8_base.quantize_base(base).params
  deq = quant.dequantize(q)
  tokens = _tokens(1)
  fwd = jax.jit(lambda p, t: llama.forward(p, None, None, t, config=config)[0])
  got, want, flt = fwd(q, tokens), fwd(deq, tokens), fwd(base.params, tokens)
  np.testing.assert_array_equal(got, want)
  # and int8 is a small perturbation of the float model (~0.6% here)
  rel = np.abs(np.asarray(got - flt)).max() / np.abs(np.asarray(flt)).max()
  assert 0 < rel < 0.02, rel
  if config.num_moe_layers:
    assert not isinstance(q["moe"]["router"], quant.Int8Weight)
    assert isinstance(q["moe"]["gate"], quant.Int8Weight)


@pytest.mark.moe
def test_lora_trains_on_an_int8_base_which_stays_untouched(dense):
  _, q = dense
  spec = AdapterSpec(targets=("q", "v", "down"), max_rank=4, num_slots=3)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  step = make_train_step(q.config, spec, opt_lib.OptimizerConfig(
      learning_rate=3e-2), mesh, StepConfig(lora_impl="gather"))
  bank = bank_lib.bank_from_weights(DENSE, spec, {1: AdapterWeights.random(
      DENSE, spec.targets, rank=4, seed=0)})
  opt = opt_lib.init_opt_state(bank)
  before = jax.tree.map(np.array, q.params)
  rows = np.tile(_tokens(2, b=1, t=17), (4, 1))
  losses = []
  for _ in range(12):
    bank, opt, m = step(q.params, bank, opt,
                        Batch.from_token_rows(rows, [1, 1, 1, 1]))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.array, q.params))


@pytest.mark.moe
def test_engine_serves_an_int8_base_like_its_dequantized_twin(dense):
  _, q = dense
  twin = dataclasses.replace(q, config=q.config.replace(weight_format="float"),
                             params=quant.dequantize(q.params))
  cfg = EngineConfig(num_slots=2, max_batch=2, max_len=32, steps_per_call=4,
                     prefill_batch=2, min_bucket=16, max_rank=4)
  reqs = [GenerationRequest(prompt=tuple(int(t) for t in row),
                            sampling=SamplingParams(max_new_tokens=6,
                                                    ignore_eos=True))
          for row in _tokens(3, b=2, t=7)]
  got = Engine(q, None, cfg).generate(reqs)
  want = Engine(twin, None, cfg).generate(reqs)
  assert [r.tokens for r in got] == [r.tokens for r in want]
  assert all(len(r.tokens) == 6 for r in got)


def test_save_load_round_trip_and_refusals(dense, tmp_path):
  base, q = dense
  d = int8_base.save_int8(tmp_path / "int8", q)
  back = int8_base.load_int8(d)
  assert back.fingerprint == q.fingerprint and back.config == q.config
  jax.tree.map(np.testing.assert_array_equal, back.params, q.params)
  with pytest.raises(ValueError, match="needs an int8 base"):
    int8_base.save_int8(tmp_path / "f", base)
  with pytest.raises(ValueError, match="not an int8 base folder"):
    int8_base.load_int8(tmp_path / "nothing")
  # A flipped value: the fingerprint in the header no longer matches.
  from safetensors.numpy import load_file, save_file
  arrays = load_file(str(d / "int8.safetensors"))
  arrays["layers/q/q"][0, 0, 0] ^= 1
  save_file(arrays, str(d / "int8.safetensors"))
  with pytest.raises(ValueError, match="damaged"):
    int8_base.load_int8(d)
  meta = json.loads((d / "int8.json").read_text())
  meta["format"] = "other"
  (d / "int8.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="has format 'other'"):
    int8_base.load_int8(d)


def test_quantize_cli_writes_a_loadable_int8_base(tmp_path, capsys):
  from mintjax.model.sources import load_base_source
  from tools import quantize as quantize_cli
  assert quantize_cli.main(["--base=random:tiny",
                            f"--out={tmp_path / 'q'}"]) == 0
  assert "int8 in" in capsys.readouterr().out
  back = int8_base.load_int8(tmp_path / "q")
  want = int8_base.quantize_base(load_base_source("random:tiny"))
  assert back.fingerprint == want.fingerprint
  assert quantize_cli.main(["--base=random:nope",
                            f"--out={tmp_path / 'x'}"]) == 2
  assert "unknown random base variant" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
