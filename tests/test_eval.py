"""Tests of batched multi-adapter evaluation and regression-gated promotion."""

import numpy as np
import pytest

from mintjax.adapters.bank import bank_from_weights
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.eval import evaluate
from mintjax.eval.personal_data import make_personal_data, write_personal_data
from mintjax.model.base import random_base
from mintjax.store.errors import BaseMismatchError
from mintjax.store.registry import Registry
from mintjax.train import data
from mintjax.train.loop import RANDOM_VARIANTS

CFG = RANDOM_VARIANTS["tiny"]


def test_personal_data_is_seeded_and_split():
  tr, ho, truth = make_personal_data(4, seed=2)
  tr2, _, truth2 = make_personal_data(4, seed=2)
  assert tr == tr2 and truth == truth2
  assert make_personal_data(4, seed=3)[2] != truth
  assert {r["prompt"] for r in ho}.isdisjoint({r["prompt"] for r in tr})
  assert all(r["completion"] == " " + truth[r["user"]]["cat"]
             for r in tr if "cat" in r["prompt"])


def test_mixed_batch_eval_matches_one_adapter_at_a_time():
  base = random_base(CFG, seed=0)
  spec = AdapterSpec(targets=("q", "v"), max_rank=4, num_slots=3)
  ws = {s: AdapterWeights.random(CFG, ("q", "v"), 4, seed=s, std=0.5)
        for s in (1, 2)}
  bank = bank_from_weights(CFG, spec, ws)
  _, ho, _ = make_personal_data(2, seed=0)
  ex = [data.tokenize_record(r, base.tokenizer, 64) for r in ho]
  jobs = [("a", 1, ex[:3]), ("b", 2, ex[3:]), ("base", 0, ex)]
  mixed = evaluate.evaluate_jobs(base, bank, jobs, batch_size=4,
                                 lora_impl="gather")
  for key, slot, exs in jobs:
    alone = evaluate.evaluate_jobs(base, bank, [(key, slot, exs)],
                                   batch_size=2, lora_impl="reference")
    np.testing.assert_allclose(mixed[key].loss, alone[key].loss, rtol=1e-4)
    assert mixed[key].num_examples == len(exs)
  assert mixed["a"].loss != mixed["base"].loss


def test_promote_moves_tag_only_without_regression(tmp_path):
  base = random_base(CFG, seed=0)
  reg = Registry.open(str(tmp_path / "reg"))
  paths = write_personal_data(str(tmp_path / "d"), 2, seed=0)
  good_w = AdapterWeights({t: np.zeros((2, 64, 2), np.float32) for t in "qv"},
                          {t: np.zeros((2, 2, 64 if t == "q" else 32),
                                       np.float32) for t in "qv"}, 2, 4.0)
  bad_w = AdapterWeights.random(CFG, ("q", "v"), 2, alpha=4.0, seed=1,
                                std=3.0)
  for u in ("user0000", "user0001"):
    reg.create_adapter(u, spec=dict(targets=["q", "v"], rank=2, alpha=4.0),
                       base_fingerprint=base.fingerprint, config=CFG)
    reg.publish(u, good_w, {"note": "zero adapter == base"})
  reg.publish("user0001", bad_w, {"note": "noisy"})
  out = evaluate.evaluate_and_promote(base, reg, paths["heldout"],
                                      promote_tag="prod", lora_impl="gather")
  assert out["promoted"] == ["user0000@1"]
  assert "user0001@2" in out["held_back"]
  assert "parent" in out["held_back"]["user0001@2"]
  assert reg.resolve("user0000:prod").revision == 1
  assert "prod" not in reg.tags("user0001")
  assert {e["metric"] for e in reg.evals("user0001@2")} == {
      "heldout_loss", "exact_match"}
  assert "| user0001@2 |" in out["table"]


def test_eval_refuses_other_base(tmp_path):
  base = random_base(CFG, seed=0)
  other = random_base(CFG, seed=9)
  reg = Registry.open(str(tmp_path / "reg"))
  reg.create_adapter("user0000", spec=dict(targets=["q"], rank=2, alpha=2.0),
                     base_fingerprint=base.fingerprint, config=CFG)
  reg.publish("user0000", AdapterWeights.random(CFG, ("q",), 2, alpha=2.0),
              {})
  _, ho, _ = make_personal_data(1, seed=0)
  with pytest.raises(BaseMismatchError, match="trained on base"):
    evaluate.evaluate_revisions(other, reg, ["user0000"],
                                {"user0000": ho}, record=False)
  assert reg.evals("user0000") == []
