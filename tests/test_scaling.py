"""Tests of the scaling study: the `--quick` runner end to end on random:tiny,
its report rebuild, flag errors, and the sweep's training and bookkeeping."""

import json
import os

import pytest

from mintjax.adapters.spec import ALL_TARGETS
from mintjax.apps.scaling import adapters as sa
from mintjax.model.sources import load_base_source
from tools import scaling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("scaling") / "scaling"
  results = scaling.main(["--quick", f"--out_dir={out}"])
  return out, results


def test_quick_run_writes_every_axis(quick_run):
  out, results = quick_run
  assert set(results) == {"down", "up", "out"}
  for axis in ("down", "up", "out"):
    with open(out / f"{axis}.json", encoding="utf-8") as f:
      data = json.load(f)
    assert data["machine"]["nproc"] == os.cpu_count()
    assert "--quick" in data["machine"]["command"]
    assert data["base"] == "random:tiny"
  for png in ("scale_down.png", "scale_up.png", "scale_out.png"):
    with open(out / png, "rb") as f:
      assert f.read(8) == PNG_MAGIC


def test_quick_down_and_up_rows(quick_run):
  _, results = quick_run
  down = results["down"]
  names = [r["arm"] for r in down["rows"]]
  assert {"r2-qv", "r2-all7"} <= set(names)
  assert down["reference"] == "r2-all7"
  for r in down["rows"]:
    steps = [p["step"] for p in r["curve"]]
    assert steps == [0, 2, 4]  # eval_every 2 over 4 steps, plus step 0
    assert 0.0 <= r["heldout_em"] <= 1.0
  by = {r["arm"]: r for r in down["rows"]}
  # All-seven LoRA stores more than q,v at the same rank.
  assert by["r2-all7"]["adapter_bytes"] > by["r2-qv"]["adapter_bytes"]
  up = results["up"]
  assert sorted(r["base"] for r in up["rows"]) == ["pretrained", "random"]
  assert up["twin_fingerprint"] != up["base_fingerprint"]
  # The pretrained row of Scale Up is the Scale Down run of the same arm.
  pre = next(r for r in up["rows"] if r["base"] == "pretrained")
  assert pre["curve"] == by["r2-qv"]["curve"]


def test_quick_out_rows(quick_run):
  _, results = quick_run
  out = results["out"]
  assert [r["distinct"] for r in out["decode"]] == [0, 1, 2, 4]
  assert all(r["decode_tok_s"] > 0 for r in out["decode"])
  assert [r["adapters"] for r in out["registry"]] == [100, 1000]
  for r in out["registry"]:
    assert 0 < r["resolve_p50_ms"] <= r["resolve_p99_ms"]
  assert [r["users"] for r in out["train"]] == [1, 2, 4]
  assert out["train"][0]["ratio_vs_one_user"] == 1.0


def test_report_rebuilds_doc_from_json(quick_run):
  out, _ = quick_run
  doc = out.parent / "SCALING.md"
  os.remove(out / "scale_up.png")
  os.remove(doc)
  scaling.main(["--report", f"--out_dir={out}"])
  text = doc.read_text(encoding="utf-8")
  for heading in ("## Scale Down", "## Scale Up", "## Scale Out"):
    assert heading in text
  assert "nproc" in text and "jax" in text and "--quick" in text
  assert "(scaling/scale_down.png)" in text
  assert (out / "scale_up.png").is_file()


@pytest.mark.parametrize("argv", [["--only=sideways", "--out_dir=/tmp/x"],
                                  ["--quick"]])
def test_bad_flags_are_refused(argv, capsys):
  with pytest.raises(SystemExit):
    scaling.main(argv)
  assert "--" in capsys.readouterr().err


def test_train_arm_learns_on_tiny():
  base = load_base_source("random:tiny")
  workload = sa.make_workload(base.tokenizer, 2, facts=("cat",))
  r = sa.train_arm(base, sa.Arm(4, ALL_TARGETS), workload, steps=60,
                   batch_size=4, eval_every=30, learning_rate=5e-2)
  first, last = r["curve"][0], r["curve"][-1]
  assert [p["step"] for p in r["curve"]] == [0, 30, 60]
  # B starts at zero, so step 0 is the base (loss ~ln(259) on this random
  # model); 60 steps measured a drop of ~0.35 nats, an untrained bank none.
  assert first["train_loss"] == pytest.approx(first["heldout_loss"], abs=0.1)
  assert last["train_loss"] < first["train_loss"] - 0.2


def test_steps_to_and_smallest_reaching():
  curve = [dict(step=0, em=0.0), dict(step=10, em=0.4),
           dict(step=20, em=0.8)]
  assert sa.steps_to(curve, "em", 0.4) == 10
  assert sa.steps_to(curve, "em", 0.9) is None
  rows = [dict(arm="big", adapter_bytes=100, heldout_em=0.80),
          dict(arm="mid", adapter_bytes=10, heldout_em=0.77),
          dict(arm="tiny", adapter_bytes=1, heldout_em=0.50)]
  assert sa.smallest_reaching(rows, rows[0])["arm"] == "mid"
  assert sa.smallest_reaching(rows[2:], rows[0]) is None


def test_arm_names_and_bytes():
  base_cfg = load_base_source("random:tiny").config
  assert sa.Arm(1).name == "r1-qv"
  assert sa.Arm(16, ALL_TARGETS).name == "r16-all7"
  # rank r on q,v of L layers: L * r * (d_in + d_out) float32 numbers.
  d_q = base_cfg.projection_shape("q")
  d_v = base_cfg.projection_shape("v")
  want = base_cfg.num_layers * 2 * (sum(d_q) + sum(d_v)) * 4
  assert sa.Arm(2).adapter_bytes(base_cfg) == want
