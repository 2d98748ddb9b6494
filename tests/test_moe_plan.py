"""The trillion-parameter rows (mintjax.aot.moe_plan): exact shard bytes, fits."""

from __future__ import annotations

import pytest

from mintjax.aot import moe_plan
from mintjax.model import presets


@pytest.fixture(scope="module")
def rows():
  return {(r["preset"], r["weight_format"]): r for r in moe_plan.all_rows()}


def test_expert_weights_split_over_expert_and_tensor(rows):
  r = rows[("kimi-k2-1t", "float")]
  c = presets.get_config("kimi-k2-1t")
  whole = c.num_moe_layers * c.num_experts * 3 * c.hidden_size * (
      c.moe_intermediate_size) * 2
  assert r["mesh"]["expert"] * r["mesh"]["tensor"] == 128
  assert r["expert_bytes"] == whole // 128
  # Non-expert weights are replicated over `expert`, never less than a share.
  assert r["params_bytes"] * r["devices"] >= c.num_params() * 2


def test_int8_base_halves_the_weights_per_chip(rows):
  for name in moe_plan.PLAN:
    f, q = rows[(name, "float")], rows[(name, "int8")]
    assert 0.49 < q["params_bytes"] / f["params_bytes"] < 0.53, name
    assert q["decode"]["est_step_s"] < f["decode"]["est_step_s"]


def test_every_planned_row_fits_and_is_bound_where_expected(rows):
  moe_plan._check_plan()  # pylint: disable=protected-access
  for r in rows.values():
    for step in ("train", "decode"):
      s = r[step]
      assert s["fits"] and s["total_bytes"] < r["hbm"], (r["preset"], step)
      assert s["est_step_s"] > 0
    assert r["decode"]["bound"] == "memory"
    assert r["train"]["bound"] == "compute"
  assert rows[("kimi-k2-1t", "float")]["slots"] == 1024


def test_too_small_a_slice_does_not_fit():
  small = moe_plan.Placement("v5p:2x2x2", "v5p-16 (8 chips)", 1, 1, 8, 1)
  r = moe_plan.plan_row("deepseek-v3-671b", placement=small)
  assert r["params_bytes"] > r["hbm"]
  assert not r["train"]["fits"] and not r["decode"]["fits"]


@pytest.mark.moe  # one model compile (~7 s of CPU): `make test-moe`
def test_aot_compiles_an_expert_parallel_step_on_a_4_axis_mesh(tmp_path):
  # The AOT tool takes (data, fsdp, expert, tensor) meshes; a tiny Qwen3-MoE
  # decode step compiled for 8 CPU devices splits its experts 4 ways.
  from mintjax import aot
  cfg = dict(presets.hf_config("qwen3-30b-a3b"), hidden_size=64,
             intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2, vocab_size=512)
  path = tmp_path / "config.json"
  path.write_text(__import__("json").dumps(cfg))
  req = aot.AotRequest(model=str(path), topology="cpu:8", mesh=(1, 1, 4, 2),
                       step="decode", slots=4, rank=4,
                       targets=("q", "k", "v", "o"), batch=8, cache_len=32,
                       lora_impl="gather", dtype="float32")
  out = aot.compile_step(req)
  assert "error" not in out, out.get("error")
  assert out["mesh"] == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
  c = aot.presets.get_config(str(path), dtype="float32")
  experts = 2 * c.num_experts * 3 * 64 * 32 * 4  # f32 [L, E, D, F] x 3
  # Expert weights are a quarter (expert) of a half (tensor) per device.
  assert out["resident_bytes"]["params"] < (
      c.num_params() * 4 - experts + experts // 8) * 1.01
  with pytest.raises(aot.AotError, match="mesh must be"):
    aot.AotRequest(mesh=(1, 2))
