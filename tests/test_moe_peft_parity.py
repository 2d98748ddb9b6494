"""PEFT adapters on MoE bases, incl. `target_parameters` on fused experts.

Fixtures (tests/fixtures/parity/{qwen3_moe,deepseek_v3}_peft, written by
tools/make_parity_fixtures.py with PEFT 0.21 + transformers 5): two LoRA
adapters per tiny base, on attention modules (MLA's q_a/q_b/kv_a/kv_b/o
for DeepSeek-V3) plus `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`,
and transformers' logits of each row with only that row's adapter active
(PEFT refuses mixed batches on target_parameters). mintjax imports the
folders and must reproduce those rows in ONE mixed batch (f32, 1e-4; `moe`
marker, `make test-moe`), then export them back losslessly. No torch here.
"""

import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterWeights, BankSpec
from mintjax.model import hf, llama
from mintjax.store import peft_io
from mintjax.store.errors import InvalidAdapterError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
ARCHS = ["qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
  name = request.param
  base = hf.load_hf(FIXTURES / name)
  folder = FIXTURES / f"{name}_peft"
  expected = dict(np.load(folder / "expected.npz"))
  adapters = {n: peft_io.read_peft(str(folder / n), config=base.config)
              for n in ("a1", "a2")}
  return name, base, folder, expected, adapters


@pytest.mark.moe  # compiles two models (~20 s each on a loaded machine)
def test_mixed_batch_matches_peft_per_row(case):
  name, base, _, expected, adapters = case
  assert {"experts_gate_up", "experts_down"} <= set(
      adapters["a1"].info.targets), name
  if name == "deepseek_v3":
    assert {"q_a", "q_b", "kv_a", "kv_b", "o"} <= set(
        adapters["a1"].info.targets)
  ws = {1: adapters["a1"].weights, 2: adapters["a2"].weights}
  targets = sorted({t for w in ws.values() for t in w.targets})
  spec = BankSpec(targets=targets, max_rank=4, num_slots=3)
  bank = bank_lib.bank_from_weights(base.config, spec, ws)
  slot = {"a1": 1, "__base__": 0, "a2": 2}
  idx = np.asarray([slot[str(n)] for n in expected["adapter_names"]],
                   np.int32)
  got = np.asarray(llama.jit_forward(base.params, bank, idx,
                                     expected["tokens"], config=base.config))
  np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)
  print(f"{name}: max |mintjax - PEFT| = "
        f"{np.abs(got - expected['logits']).max():.2e}")
  plain = np.asarray(llama.jit_forward(base.params, None, None,
                                       expected["tokens"],
                                       config=base.config))
  # The adapters change every adapted row by far more than the tolerance.
  for row in (0, 2):
    assert np.abs(plain[row] - expected["logits"][row]).max() > 1e-2


def test_export_round_trip_is_lossless(case, tmp_path):
  _, base, folder, _, adapters = case
  for n, (info, _, meta) in adapters.items():
    raw_info, raw, raw_meta = peft_io.read_peft_raw(str(folder / n),
                                                    config=base.config)
    peft_io.write_peft(str(tmp_path / n), raw_info, raw.lora_a, raw.lora_b,
                       raw_meta)
    again = peft_io.read_peft(str(tmp_path / n), config=base.config)
    assert again.info == info
    for t in info.targets:
      np.testing.assert_array_equal(again.weights.lora_a[t],
                                    adapters[n].weights.lora_a[t])
      np.testing.assert_array_equal(again.weights.lora_b[t],
                                    adapters[n].weights.lora_b[t])
    # PEFT's own tensors, key for key (both fixtures nest the two expert
    # wrappers, gate_up_proj innermost).
    want = safetensors.numpy.load_file(folder / n / peft_io.WEIGHTS_FILE)
    got = safetensors.numpy.load_file(tmp_path / n / peft_io.WEIGHTS_FILE)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_fresh_expert_adapter_exports_as_target_parameters(case, tmp_path):
  _, base, _, _, _ = case
  cfg = base.config
  attn = "kv_b" if cfg.uses_mla else "q"
  w = AdapterWeights.random(cfg, (attn, "experts_gate_up", "experts_down"),
                            3, seed=5)
  for t in ("experts_gate_up", "experts_down"):  # as training leaves them:
    for i in range(cfg.num_layers):  # dense layers' expert rows get no grad
      if not cfg.is_moe_layer(i):
        w.lora_b[t][i] = 0  # (PEFT has no row there: A comes back zero)
        w.lora_a[t][i] = 0
  info = peft_io.AdapterInfo(w.targets, 3, 3.0)
  peft_io.write_peft(str(tmp_path), info, w.lora_a, w.lora_b)
  written = json.loads((tmp_path / peft_io.CONFIG_FILE).read_text())
  assert written["target_parameters"] == ["mlp.experts.gate_up_proj",
                                          "mlp.experts.down_proj"]
  back = peft_io.read_peft(str(tmp_path), config=cfg)
  for t in w.targets:
    np.testing.assert_array_equal(back.weights.lora_a[t], w.lora_a[t])
    np.testing.assert_array_equal(back.weights.lora_b[t], w.lora_b[t])


def test_unportable_or_misplaced_expert_lora_is_refused(case, tmp_path):
  _, base, folder, _, _ = case
  cfg = base.config
  if cfg.n_shared_experts:
    w = AdapterWeights.random(cfg, ("o", "shared_gate"), 2)
    with pytest.raises(InvalidAdapterError, match="re-targets gate_proj"):
      peft_io.write_peft(str(tmp_path / "x"), peft_io.AdapterInfo(
          w.targets, 2, 2.0), w.lora_a, w.lora_b)
  with pytest.raises(InvalidAdapterError, match="pass the base's config"):
    peft_io.read_peft(str(folder / "a1"))
  # Move layer 0's expert LoRA to a dense layer: refused, naming it.
  dense = next(i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i))
  moe = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
  tensors = safetensors.numpy.load_file(folder / "a1" / peft_io.WEIGHTS_FILE)
  moved = {k.replace(f"layers.{moe}.mlp.experts", f"layers.{dense}.mlp."
                     "experts") if f"layers.{moe}.mlp.experts" in k else k: v
           for k, v in tensors.items()
           if f"layers.{dense}.mlp.experts" not in k}
  bad = tmp_path / "bad"
  bad.mkdir()
  safetensors.numpy.save_file(moved, bad / peft_io.WEIGHTS_FILE)
  (bad / peft_io.CONFIG_FILE).write_text(
      (folder / "a1" / peft_io.CONFIG_FILE).read_text())
  with pytest.raises(InvalidAdapterError, match=f"layer {dense}, which is "
                     "a dense layer"):
    peft_io.read_peft(str(bad), config=cfg)
