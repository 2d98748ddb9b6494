"""Tests of batched multi-adapter evaluation and promotion.

Promotion tests run on adapters trained by `train_workflow.train_and_publish`
on the tiny random base with chat-formatted prompts (the format the issue
found evaluated as raw): two healthy users, one trained to answer nothing
(eos) and one trained to answer 'zzz...'. Held-out records are the training
questions, so a healthy adapter scores exact match 1.0 in its own format.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import smollm2_personal
from mintjax.adapters.bank import bank_from_weights
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.apps import train_workflow
from mintjax.apps.personal_data import make_personal_data, write_jsonl
from mintjax.eval import evaluate
from mintjax.eval import prompt_format as pf
from mintjax.model.base import random_base
from mintjax.model.sources import RANDOM_VARIANTS
from mintjax.model.tokenizer import CHATML_TEMPLATE
from mintjax.store.errors import BaseMismatchError
from mintjax.store.registry import Registry
from mintjax.train import data

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


# --- promotion on really trained adapters ----------------------------------

USERS = ("user0000", "user0001", "user0002", "user0003")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A registry of four chat-trained adapters (trained once per module)."""
  tmp = tmp_path_factory.mktemp("trained")
  train, _, _ = make_personal_data(4, seed=0, facts=("cat",))

  def collapse(r):  # user0002 learns to answer nothing, user0003 'zzz...'
    if r["user"] == "user0002":
      return dict(r, completion="<eos>")
    if r["user"] == "user0003":
      return dict(r, completion=" " + "z" * 16)
    return r

  write_jsonl([collapse(r) for r in train], str(tmp / "train" / "p.jsonl"))
  heldout = write_jsonl(train, str(tmp / "heldout" / "p.jsonl"))
  c = smollm2_personal.get_config("tiny")
  c.train_data, c.heldout_data = str(tmp / "train"), str(tmp / "heldout")
  c.registry = str(tmp / "registry")
  c.prompt_style = "chat"
  c.num_slots, c.batch_size, c.steps_per_cohort = 5, 8, 30
  c.checkpoint_every = c.log_every = 30
  c.max_length, c.buckets = 96, (96,)
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora_impl = "gather"
  train_workflow.train_and_publish(c, str(tmp / "work"))
  return dict(registry=c.registry, heldout=heldout,
              base=random_base(CFG, seed=0))


@pytest.fixture
def reg(trained, tmp_path):
  """A private copy of the trained registry (tests record and tag)."""
  path = str(tmp_path / "registry")
  shutil.copytree(trained["registry"], path)
  r = Registry.open(path)
  yield r
  r.close()


def _metrics(reg, ref):
  return [(e["metric"], e["value"]) for e in reg.evals(ref)]


def test_publish_records_prompt_format_and_eval_reads_it(trained, reg):
  prov = reg.resolve("user0000").provenance
  assert prov["prompt_format"] == dict(
      style="chat", chat_template=CHATML_TEMPLATE,
      chat_template_sha256=pf.template_sha256(CHATML_TEMPLATE))
  out = evaluate.evaluate_and_promote(
      trained["base"], reg, trained["heldout"], ["user0000", "user0001"],
      promote_tag="prod", lora_impl="gather")
  # The healthy evaluation promotes both, in the trained chat format, and
  # reproduces the exact match training measured at publish.
  assert out["promoted"] == ["user0000@1", "user0001@1"]
  assert out["held_back"] == {}
  for row in out["report"]:
    assert (row["prompt_style"], row["format_source"]) == ("chat",
                                                          "provenance")
    assert row["exact_match"] == 1.0 > row["base_exact_match"]
    train_ev = reg.resolve(row["ref"]).provenance["evaluation"]
    assert row["exact_match"] == train_ev["exact_match"]
    np.testing.assert_allclose(row["loss"], train_ev["heldout_loss"],
                               rtol=1e-5)
    # Recorded under the names training uses: same format, same metric.
    assert _metrics(reg, row["ref"])[-2:] == [
        ("heldout_loss", row["loss"]), ("exact_match", 1.0)]
    assert reg.resolve(f"{row['adapter_id']}:prod").revision == 1
  assert "| user0000@1 | chat " in out["table"]
  assert "(provenance)" in out["table"]


def test_raw_override_is_recorded_apart_and_refused(trained, reg):
  before = _metrics(reg, "user0000@1")
  out = evaluate.evaluate_and_promote(
      trained["base"], reg, trained["heldout"], ["user0000", "user0001"],
      promote_tag="prod", prompt_style="raw", lora_impl="gather")
  assert out["promoted"] == []
  for ref in ("user0000@1", "user0001@1"):
    assert out["held_back"][ref].startswith("format_mismatch: evaluated "
                                            "with prompt style 'raw'")
    after = _metrics(reg, ref)
    names = [m for m, _ in after]
    # The raw numbers never read as the adapter's exact match.
    assert names.count("exact_match") == 1
    assert "exact_match[prompt_style=raw,override]" in names
    assert ("promotion_refused:format_mismatch", 1.0) in after
    assert reg.tags(ref.split("@")[0]) == {}
  assert _metrics(reg, "user0000@1")[:len(before)] == before
  assert "held back user0000@1: format_mismatch" in out["table"]
  # An explicit style equal to the trained one is the trained format.
  same = evaluate.evaluate_revisions(trained["base"], reg, ["user0000"], {
      "user0000": data.read_records(trained["heldout"])["user0000"]},
                                     prompt_style="chat", lora_impl="gather")
  assert same[0]["exact_match"] == 1.0
  assert "exact_match[prompt_style=chat,override]" in [
      m for m, _ in _metrics(reg, "user0000@1")]


def test_collapsed_adapters_are_refused(trained, reg):
  out = evaluate.evaluate_and_promote(
      trained["base"], reg, trained["heldout"], ["user0002", "user0003"],
      promote_tag="prod", lora_impl="gather")
  held = out["held_back"]
  assert held["user0002@1"].startswith("empty_outputs: ")
  assert held["user0003@1"].startswith("constant_outputs: ")
  # Their loss alone would have passed the regression gate.
  for row in out["report"]:
    assert row["loss"] < row["base_loss"]
  assert out["promoted"] == []
  assert ("promotion_refused:empty_outputs", 1.0) in _metrics(
      reg, "user0002@1")


def test_unknown_format_falls_back_with_warning_and_zero_signal_refuses(
    trained, reg, tmp_path):
  # user0000's chat-trained weights published without a recorded format
  # (as an import would be): evaluated raw by fallback, nobody scores.
  _, w = reg.load("user0000@1")
  spec = dict(targets=list(w.targets), rank=w.rank, alpha=w.alpha)
  reg.create_adapter("imported", spec=spec,
                     base_fingerprint=trained["base"].fingerprint, config=CFG)
  reg.publish("imported", w, {"note": "imported, format unknown"})
  reg.publish("imported", w, {"note": "same weights again"})
  records = data.read_records(trained["heldout"])["user0000"]
  ho = write_jsonl([dict(r, user="imported") for r in records],
                   str(tmp_path / "imported.jsonl"))
  out = evaluate.evaluate_and_promote(
      trained["base"], reg, ho, ["imported@1", "imported@2"],
      promote_tag="prod", lora_impl="gather")
  first, second = out["report"]
  assert first["format_source"] == "fallback" and first["prompt_style"] == \
      "raw"
  assert "records no prompt format" in first["warning"]
  assert "warning imported@1: its provenance records no prompt format" in \
      out["table"]
  assert first["exact_match"] == 0 == first["base_exact_match"]
  assert out["held_back"]["imported@1"].startswith(
      "no_exact_match: exact match is 0 for the revision and its base")
  assert out["held_back"]["imported@2"].startswith(
      "no_exact_match: exact match is 0 for the revision and its parent")
  assert second["parent_exact_match"] == 0
  assert "exact_match[prompt_style=raw,fallback]" in [
      m for m, _ in _metrics(reg, "imported@2")]
  assert reg.tags("imported") == {}


def test_older_revision_uses_its_training_config_style(trained, reg):
  # Published before prompt_format existed: only the run's config says
  # 'chat'. It is scored in chat (with the base's template, warned) and its
  # metrics keep their plain names.
  _, w = reg.load("user0000@1")
  reg.publish("user0000", w, {"training_config": {"prompt_style": "chat"}})
  records = data.read_records(trained["heldout"])["user0000"]
  row, = evaluate.evaluate_revisions(trained["base"], reg, ["user0000@2"],
                                     {"user0000": records},
                                     lora_impl="gather")
  assert (row["prompt_style"], row["format_source"]) == ("chat",
                                                        "training_config")
  assert "not the chat template" in row["warning"]
  assert row["exact_match"] == 1.0
  assert [m for m, _ in _metrics(reg, "user0000@2")] == [
      "heldout_loss", "exact_match"]


def test_regression_still_refused(trained, reg):
  # user0001's adapter published as user0000's next revision: it answers
  # with the wrong user's cat, a plain regression against its parent.
  _, w = reg.load("user0001@1")
  prov = reg.resolve("user0000@1").provenance
  reg.publish("user0000", w, {"prompt_format": prov["prompt_format"]})
  out = evaluate.evaluate_and_promote(
      trained["base"], reg, trained["heldout"], ["user0000@2"],
      promote_tag="prod", lora_impl="gather")
  assert out["held_back"]["user0000@2"].startswith(
      "regression: exact-match 0.000 is below the parent's 1.000")


def test_recorded_chat_template_is_the_one_rendered(trained, reg):
  custom = "Q: {{ messages[0]['content'] }}\nA:"
  _, w = reg.load("user0000@1")
  spec = dict(targets=list(w.targets), rank=w.rank, alpha=w.alpha)
  reg.create_adapter("custom", spec=spec,
                     base_fingerprint=trained["base"].fingerprint, config=CFG)
  fmt = pf.PromptFormat("chat", custom)
  reg.publish("custom", w, {"prompt_format": fmt.to_provenance()})
  records = [dict(r, user="custom") for r in
             data.read_records(trained["heldout"])["user0000"]]
  row, = evaluate.evaluate_revisions(trained["base"], reg, ["custom"],
                                     {"custom": records}, record=False,
                                     lora_impl="gather")
  assert row["template_sha256"] == pf.template_sha256(custom)
  base = trained["base"]
  bank = bank_from_weights(CFG, AdapterSpec(targets=w.targets,
                                            max_rank=w.rank, num_slots=2),
                           {1: w})
  want = {}
  for name, tok in (("custom", fmt.tokenizer_for(base.tokenizer)),
                    ("chatml", base.tokenizer)):
    exs = [data.tokenize_record(r, tok, 256, "truncate", "chat")
           for r in records]
    want[name] = evaluate.evaluate_jobs(base, bank, [("k", 1, exs)],
                                        lora_impl="gather")["k"].loss
  np.testing.assert_allclose(row["loss"], want["custom"], rtol=1e-6)
  assert abs(want["custom"] - want["chatml"]) > 1e-3
  # A template that does not match its recorded hash is refused.
  reg.publish("custom", w, {"prompt_format": dict(
      fmt.to_provenance(), chat_template="{{ 'tampered' }}")})
  with pytest.raises(ValueError, match="custom@2: .*does not match its "
                     "chat_template_sha256"):
    evaluate.evaluate_revisions(base, reg, ["custom@2"], {"custom": records},
                                record=False)


def test_launcher_defaults_to_the_trained_format(trained, tmp_path):
  registry = str(tmp_path / "registry")
  shutil.copytree(trained["registry"], registry)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.eval", "--base=random:tiny",
       f"--registry={registry}", f"--heldout={trained['heldout']}",
       "--refs=user0000,user0002", "--promote=prod"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| user0000@1 | chat " in proc.stdout
  assert "held back user0002@1: empty_outputs" in proc.stdout
  assert "promoted to 'prod': ['user0000@1']" in proc.stdout
