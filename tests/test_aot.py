"""The AOT compile tool: report fields, fits logic, cost model, TPU compiles.

The default-suite tests compile for this host's 8 fake CPU devices; the
`tpu`-marked ones run the real TPU compiler deviceless (`make test-tpu`,
libtpu from `make tpu-venv`).
"""

import json

import jax
import pytest

from mintjax import aot
from mintjax.adapters.spec import AdapterSpec
from mintjax.model import presets
from tools import aot as aot_cli

TINY = dict(model="smollm2-135m", topology="cpu:8", mesh=(1, 2, 4),
            slots=8, rank=4, targets=("q", "v"), batch=8, seq_len=16,
            cache_len=32, lora_impl="gather")


def _need8():
  if len(jax.devices("cpu")) < 8:
    pytest.skip("needs 8 CPU devices (tests/conftest.py sets XLA_FLAGS)")


def test_decode_report_fields_bytes_and_overhead():
  _need8()
  rep = aot.compile_report(aot.AotRequest(step="decode", **TINY))
  lora, base = rep["lora"], rep["base"]
  cfg = presets.get_config("smollm2-135m")
  spec = AdapterSpec(targets=("q", "v"), max_rank=4, num_slots=8,
                     dtype="bfloat16")
  # Params are sharded 8 ways except the replicated norms; the bank follows
  # the default rules (slots replicated, factor widths sharded).
  params_total = cfg.num_params() * 2
  assert params_total / 8 <= lora["resident_bytes"]["params"] < (
      params_total / 8 * 1.05)
  bank_total = spec.params_per_adapter(cfg) * 8 * 2 + 8 * 8
  assert bank_total / 8 < lora["resident_bytes"]["bank"] < bank_total
  assert base["resident_bytes"]["bank"] == 0
  assert lora["resident_bytes"]["kv_cache"] == base["resident_bytes"][
      "kv_cache"] == 2 * 30 * 8 * 32 * 3 * 64 * 2 // 2
  # (rows split over fsdp = 2; 3 kv heads do not divide tensor = 4)
  for s in (lora, base):
    assert s["fits"] and s["devices"] == 8 and s["platform"] == "cpu"
    assert s["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
    assert s["compile_s"] > 0 and s["est_step_s"] > 0
    assert s["total_per_device"] >= sum(
        v for k, v in s["resident_bytes"].items() if k != "temporaries")
  assert rep["lora_overhead"] == pytest.approx(
      lora["est_step_s"] / base["est_step_s"] - 1)
  assert rep["lora_overhead"] > 0
  text = aot.format_report(rep)
  assert "fits" in text and "LoRA overhead" in text


def test_train_step_compiles_with_optimizer_state_and_slot_sharded_rules():
  _need8()
  req = aot.AotRequest(step="train", rule_set="slot_sharded", **TINY)
  out = aot.compile_step(req)
  res = out["resident_bytes"]
  # f32 bank; Adam moments are twice the factors; slot axis split 8 ways.
  assert res["optimizer"] == pytest.approx(2 * res["bank"], rel=0.01)
  cfg = presets.get_config("smollm2-135m")
  spec = AdapterSpec(targets=("q", "v"), max_rank=4, num_slots=8)
  assert res["bank"] == pytest.approx(
      spec.params_per_adapter(cfg) * 8 * 4 / 8, rel=0.01)
  assert out["fits"] and out["tokens_per_step"] == 8 * 16


def test_analytic_flops_match_xla_on_a_one_layer_model(tmp_path):
  # With one layer there is no scan trip count to correct for, so XLA's own
  # count must agree with the analytic model the roofline uses.
  _need8()
  hf = presets.hf_config("smollm2-135m")
  hf["num_hidden_layers"] = 1
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf))
  req = aot.AotRequest(**dict(TINY, model=str(path), topology="cpu:1",
                              mesh=(1, 1, 1), batch=4, seq_len=64,
                              cache_len=64,
                              targets=("q", "k", "v", "o", "gate", "up",
                                       "down"), rank=16), step="prefill")
  out = aot.compile_step(req)
  assert "error" not in out, out.get("error")
  assert out["xla_flops_raw"] == pytest.approx(out["step_flops"], rel=0.1)


def test_bad_requests_fail_with_one_line_errors():
  with pytest.raises(aot.AotError, match="step must be one of"):
    aot.AotRequest(step="serve")
  with pytest.raises(aot.AotError, match="unknown chip 'v9'"):
    aot.AotRequest(topology="v9:2x2").chip()
  with pytest.raises(aot.AotError, match="needs 64 CPU devices"):
    aot.topology_devices("cpu:64")
  with pytest.raises(aot.AotError, match="unknown mesh axes"):
    aot.parse_rules("slot=model")
  with pytest.raises(aot.AotError, match="unknown rule set"):
    aot.AotRequest(rule_set="fast").rules_dict()
  assert aot.parse_rules("slot=fsdp+tensor,lora_rank=") == (
      ("slot", ("fsdp", "tensor")), ("lora_rank", None))


def test_cli_writes_json(tmp_path, capsys):
  _need8()
  out = tmp_path / "r.json"
  rc = aot_cli.main([
      "--model=smollm2-135m", "--topology=cpu:8", "--mesh=1,2,4",
      "--step=decode", "--slots=8", "--rank=4", "--targets=q,v",
      "--batch=8", "--cache_len=32", "--lora_impl=gather",
      "--mixed_ranks=1,2,4", "--hbm_gib=0.01", f"--json={out}"])
  assert rc == 0
  rep = json.loads(out.read_text())
  # A 10 MiB chip cannot hold the step: the fits logic says so.
  assert rep["lora"]["total_per_device"] > 0.01 * aot.GIB
  assert rep["lora"]["fits"] is False and rep["base"]["fits"] is False
  # 7 distinct rows (slot 0 is not an adapter) cycling 1, 2, 4.
  assert rep["mixed_ranks"]["mean_rank"] == pytest.approx(15 / 7)
  assert "LoRA overhead" in capsys.readouterr().out
  assert aot_cli.main(["--topology=v9:1", "--step=decode"]) == 2


@pytest.mark.tpu
@pytest.mark.parametrize("step", ["train", "decode"])
def test_tpu_deviceless_compile_small_model_with_kernel(step):
  """A real TPU compile (v5e:2x2) of SmolLM2-135M's step, kernel path."""
  try:
    aot.topology_devices("v5e:2x2")
  except aot.AotError as e:
    pytest.skip(str(e))
  req = aot.AotRequest(model="smollm2-135m", topology="v5e:2x2",
                       mesh=(1, 1, 4), step=step, slots=16, rank=16,
                       batch=8, seq_len=128, cache_len=256,
                       lora_impl="auto")
  out = aot.compile_step(req)
  assert out["platform"] == "tpu" and out["lora_impl"].startswith("pallas")
  assert "error" not in out, out.get("error")
  assert out["fits"] and out["est_step_s"] > 0

