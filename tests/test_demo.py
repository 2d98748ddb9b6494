"""The end-to-end demo on the random tiny base: train, publish, serve, summary."""

import json
import os

import pytest

from configs import smollm2_personal
from mintjax.apps import demo
from mintjax.store.registry import Registry

USERS = 4
RECIPE = smollm2_personal.get_config("demo_tiny")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  lines = []
  out = demo.run_demo(workdir, num_users=USERS, base_source="random:tiny",
                      recipe=RECIPE, device_slots=2, log=lines.append)
  out["_lines"] = lines
  return out


def test_summary_has_every_section(summary):
  for key in ("heldout_accuracy", "served_accuracy", "adapter_bytes",
              "base_bytes", "adapter_fraction_of_base", "train_tokens_per_s",
              "decode_tokens_per_s", "residency_hit_rates", "registry",
              "base_checkpoint", "train_workdir", "stage_seconds",
              "foundation"):
    assert key in summary, key
  acc = summary["heldout_accuracy"]
  assert set(acc) >= {"base_mean", "adapted_mean", "adapted_worst",
                      "worst_user"}
  assert 0 < summary["adapter_bytes"] < summary["base_bytes"]
  assert summary["train_tokens_per_s"] > 0
  assert summary["decode_tokens_per_s"] > 0
  assert set(summary["residency_hit_rates"]) == {"device", "host", "store"}
  assert list(summary["stage_seconds"]) == ["base", "foundation", "workload",
                                            "train", "serve"]
  with open(os.path.join(summary["workdir"], "summary.json")) as f:
    assert json.load(f)["num_users"] == USERS
  printed = "\n".join(summary["_lines"])
  assert "=== mintjax demo summary ===" in printed
  assert "held-out exact match" in printed


def test_foundation_mixed_batch(summary):
  f = summary["foundation"]
  assert f["base_row_equals_plain"] and f["rows_differ"]
  assert [r["slot"] for r in f["mixed_batch"]] == [0, 1, 2]
  assert len(f["completions"]) == len(demo.FOUNDATION_PROMPTS)


def test_registry_has_one_evaluated_revision_per_user(summary):
  reg = Registry.open(summary["registry"])
  try:
    users = sorted(a["id"] for a in reg.list_adapters())
    assert users == sorted(summary["published"]) and len(users) == USERS
    for u in users:
      history = reg.history(u)
      assert len(history) == 1
      rev = history[0]
      assert rev.provenance["base_fingerprint"] == summary["base_fingerprint"]
      metrics = {e["metric"] for e in reg.evals(f"{u}@{rev.revision}")}
      assert metrics == {"heldout_loss", "exact_match"}
  finally:
    reg.close()


def test_serving_mixed_batch_names_every_user(summary):
  first = [a for a in summary["answers"] if a["round"] == 0]
  adapted = [a for a in first if a["user"] is not None]
  assert sorted(a["user"] for a in adapted) == sorted(summary["published"])
  # Each adapted answer came from that user's published revision.
  for a in adapted:
    assert a["revision"] == summary["published"][a["user"]]
  assert any(a["user"] is None and a["revision"] is None for a in first)
  assert summary["serve_compilations_after_warmup"] == 0


def test_second_run_reuses_the_converted_base(summary):
  progress = demo.Progress(lambda _: None)
  base, ckpt_dir, converted = demo.cached_base(summary["workdir"],
                                               "random:tiny", progress)
  assert not converted and ckpt_dir == summary["base_checkpoint"]
  assert base.fingerprint == summary["base_fingerprint"]


def test_refuses_a_foreign_non_empty_workdir(tmp_path):
  (tmp_path / "precious.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not written by the demo"):
    demo.run_demo(str(tmp_path), num_users=2, base_source="random:tiny",
                  recipe=RECIPE, log=lambda _: None)
  assert (tmp_path / "precious.txt").read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["precious.txt"]
