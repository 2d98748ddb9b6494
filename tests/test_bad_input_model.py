"""Bad-input corpus, model and training side: the model's public forward
(`llama.forward`, `llama.jit_forward`), training batch construction
(`Collator`, `make_pipeline`), training data files (`read_jsonl`),
`launch/train.py`'s library call and `launch/eval.py`'s, plus those two
launchers as subprocesses.

The model cases pin the issue's silent failures: adapter index 7 or -1 of a
3-slot bank read slot 2 (another tenant's adapter) and a token id >= vocab
gave NaN logits; both must now be refused.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bad_input_corpus import Case, Reported, check, params
from configs import smollm2_personal
from mintjax.adapters.bank import bank_from_weights
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.eval.evaluate import evaluate_and_promote
from mintjax.model import llama
from mintjax.store.registry import Registry
from mintjax.train import data as data_lib

try:
  from mintjax.apps.train_workflow import train_and_publish
  from mintjax.model.sources import load_base_source
except ImportError:  # tallying a checkout from before these modules moved
  from mintjax.train.loop import load_base_source, train_and_publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(llama.__file__)))
REPO = os.path.dirname(REPO)
GOOD_LINE = '{"user": "alice", "prompt": "hi", "completion": "there"}\n'


class Ctx:
  """A tiny base, a 3-slot bank, a registry with 'alice' on another base."""

  def __init__(self, tmp: str):
    self.tmp = tmp
    self.base = load_base_source("random:tiny")
    self.config = self.base.config
    spec = AdapterSpec(targets=("q", "v"), max_rank=2, num_slots=3)
    self.bank = bank_from_weights(self.config, spec, {
        s: AdapterWeights.random(self.config, ("q", "v"), 2, seed=s)
        for s in (1, 2)})
    self.tokens = np.array([[5, 6, 7]], np.int32)
    self.registry_dir = os.path.join(tmp, "reg")
    reg = Registry.open(self.registry_dir)
    reg.create_adapter("alice", spec=dict(targets=["q", "v"], rank=4),
                       base_fingerprint="sha256:" + "ab" * 32)
    reg.publish("alice", AdapterWeights.random(self.config, ("q", "v"), 4,
                                               seed=3), {})
    reg.close()
    self.data = self.write("good.jsonl", GOOD_LINE * 4)

  def write(self, name: str, text, mode="w") -> str:
    p = os.path.join(self.tmp, name)
    with open(p, mode) as f:
      f.write(text)
    return p

  def train(self, **overrides):
    cfg = smollm2_personal.get_config("tiny")
    cfg.train_data = self.data
    cfg.registry = self.registry_dir
    cfg.steps_per_cohort = 1
    for k, v in overrides.items():
      node = cfg
      *path, leaf = k.split("__")
      for p in path:
        node = node[p]
      node[leaf] = v
    return train_and_publish(cfg, os.path.join(self.tmp, "work"),
                             base=self.base)


def build_context(tmp):
  return Ctx(tmp)


def fwd(idx=(1,), tokens=None, jit=False):
  def fn(c):
    t = c.tokens if tokens is None else tokens
    f = llama.jit_forward if jit else (
        lambda *a, **k: llama.forward(*a, **k)[0])
    logits = f(c.base.params, c.bank, idx if idx is None else np.asarray(idx)
               if not hasattr(idx, "shape") else idx, t, config=c.config)
    if not np.all(np.isfinite(np.asarray(logits))):
      return Reported("NaN logits", traceback=True)
    return Reported(None)
  return fn


def _known(fn_or_cls, kw):
  """kw minus what older code does not take (its tally: no such check)."""
  names = inspect.signature(fn_or_cls).parameters
  return {k: v for k, v in kw.items() if k in names}


def collate(slot_of_user, tokens=(1, 5, 6, 7), **kw):
  def fn(c):
    col = data_lib.Collator(slot_of_user, (8,),
                            **_known(data_lib.Collator, kw))
    ex = data_lib.Example("u", np.asarray(tokens, np.int32), 1, source="x:1")
    col([ex, ex])
    return Reported(None)
  return fn


def jsonl(text, mode="w"):
  def fn(c):
    return data_lib.read_jsonl(c.write(f"d{abs(hash(text))}.jsonl", text,
                                       mode))
  return fn


def sub(*args):
  def fn(c):
    proc = subprocess.run(
        [sys.executable, "-m", *[a.format(tmp=c.tmp, reg=c.registry_dir,
                                          data=c.data) for a in args]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if proc.returncode == 0:
      return Reported(None)
    err = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return Reported(err[-1] if err else "",
                    traceback="Traceback" in proc.stderr)
  return fn


DE = data_lib.DataError
VE = ValueError
CASES = [
    # --- the model's public forward ----------------------------------------
    Case("forward_idx_7_of_3", fwd((7,)), VE, r"adapter_idx \[7\].*\[0, 3\)",
         store=False),
    Case("forward_idx_neg1", fwd((-1,)), VE, r"adapter_idx \[-1\]",
         store=False),
    Case("forward_idx_float", fwd(np.array([1.0])), VE, "integer slots",
         store=False),
    Case("forward_idx_none_with_bank", fwd(None), VE, "adapter_idx is required",
         store=False),
    Case("forward_token_eq_vocab", fwd(tokens=np.array([[259]])), VE,
         r"token ids \[259\].*vocabulary", store=False),
    Case("forward_token_neg", fwd(tokens=np.array([[-3]])), VE,
         r"token ids \[-3\]", store=False),
    Case("forward_token_float", fwd(tokens=np.array([[1.7]])), VE,
         "integer ids.*float", store=False),
    Case("forward_idx_7_jax_array", fwd(jnp.array([7])), VE,
         r"adapter_idx \[7\]", store=False),
    Case("jit_forward_idx_7", fwd((7,), jit=True), VE, r"adapter_idx \[7\]",
         store=False),
    Case("jit_forward_idx_neg1", fwd((-1,), jit=True), VE,
         r"adapter_idx \[-1\]", store=False),
    Case("jit_forward_token_vocab", fwd(tokens=np.array([[300]]), jit=True),
         VE, r"token ids \[300\]", store=False),
    Case("jit_forward_token_float", fwd(tokens=np.array([[2.5]]), jit=True),
         VE, "integer ids", store=False),
    # --- training batch construction ---------------------------------------
    Case("collator_slot_out_of_range", collate({"u": 5}, num_slots=3), DE,
         r"outside \[1, 3\)", store=False),
    Case("collator_slot_zero", collate({"u": 0}, num_slots=3), DE,
         "null adapter", store=False),
    Case("collator_slot_negative", collate({"u": -1}, num_slots=3), DE,
         r"outside \[1, 3\)", store=False),
    Case("collator_token_over_vocab", collate({"u": 1}, (1, 5, 400),
                                              vocab_size=259), DE,
         "x:1: token ids outside", store=False),
    Case("collator_unknown_user", collate({"v": 1}), DE, "slot map",
         store=False),
    Case("pipeline_slot_out_of_range", lambda c: data_lib.make_pipeline(
        {"u": [data_lib.Example("u", np.arange(1, 5, dtype=np.int32), 1)]},
        {"u": 9}, global_batch=2, num_steps=1, buckets=(8,), seed=0,
        **_known(data_lib.make_pipeline, dict(num_slots=3)))[0], DE,
         r"outside \[1, 3\)", store=False),
    # --- training data files -----------------------------------------------
    Case("jsonl_blank_line", jsonl(GOOD_LINE + "\n" + GOOD_LINE), DE,
         ":2: empty line", store=False),
    Case("jsonl_malformed", jsonl("{user: x}\n"), DE, ":1: malformed JSON",
         store=False),
    Case("jsonl_array", jsonl("[1, 2]\n"), DE, "expected a JSON object",
         store=False),
    Case("jsonl_null", jsonl("null\n"), DE, "expected a JSON object",
         store=False),
    Case("jsonl_no_user", jsonl('{"prompt": "a", "completion": "b"}\n'), DE,
         "'user'", store=False),
    Case("jsonl_user_int", jsonl('{"user": 5, "text": "a"}\n'), DE, "'user'",
         store=False),
    Case("jsonl_prompt_and_text", jsonl(
        '{"user": "a", "prompt": "a", "completion": "b", "text": "c"}\n'), DE,
         "either", store=False),
    Case("jsonl_prompt_int", jsonl(
        '{"user": "a", "prompt": 5, "completion": "b"}\n'), DE,
         "'prompt' must be a string", store=False),
    Case("jsonl_empty_completion", jsonl(
        '{"user": "a", "prompt": "x", "completion": ""}\n'), DE,
         "empty 'completion'", store=False),
    Case("jsonl_weight_negative", jsonl(
        '{"user": "a", "text": "x", "weight": -1}\n'), DE, "'weight'",
         store=False),
    Case("jsonl_weight_str", jsonl(
        '{"user": "a", "text": "x", "weight": "heavy"}\n'), DE, "'weight'",
         store=False),
    Case("jsonl_empty_file", jsonl(""), DE, "no records", store=False),
    Case("jsonl_bad_utf8", jsonl(b'{"user": "a", "text": "caf\xe9"}\n',
                                 "wb"), DE, ":1: .*not valid UTF-8",
         store=False),
    Case("format_prompt_bad_style", lambda c: data_lib.format_prompt(
        c.base.tokenizer, "hi", "fancy"), DE, "prompt style", store=False),
    Case("tokenize_overflow_error", lambda c: data_lib.tokenize_record(
        {"user": "a", "prompt": "x", "completion": "y" * 50,
         "_source": "f:1"}, c.base.tokenizer, 8, "error"), DE,
         "f:1: example is .* longer than max_length", store=False),
    # --- launch/train.py's library call (nothing may be published) ---------
    Case("train_missing_data", lambda c: c.train(
        train_data="/nonexistent/data.jsonl"), DE, "does not exist"),
    Case("train_bad_line", lambda c: c.train(train_data=c.write(
        "bad.jsonl", GOOD_LINE + "{oops\n")), DE, "bad.jsonl:2"),
    Case("train_bad_utf8", lambda c: c.train(train_data=c.write(
        "bad8.jsonl", GOOD_LINE.encode() + b'{"user": "\xff"}\n', "wb")), DE,
         "bad8.jsonl:2: .*UTF-8"),
    Case("train_prompt_style", lambda c: c.train(prompt_style="fancy"), DE,
         "prompt style"),
    Case("train_other_base", lambda c: c.train(), ValueError,
         "alice.*trained on base.*Nothing was trained"),
    Case("train_overflow_error", lambda c: c.train(
        train_data=c.write("long.jsonl", '{"user": "bob", "prompt": "x", '
                           '"completion": "' + "y" * 200 + '"}\n'),
        overflow="error"), DE, "longer than max_length"),
    # --- launch/eval.py's library call -------------------------------------
    Case("eval_missing_heldout", lambda c: evaluate_and_promote(
        c.base, Registry.open(c.registry_dir), "/nonexistent/heldout.jsonl"),
         DE, "does not exist"),
    Case("eval_bad_heldout_line", lambda c: evaluate_and_promote(
        c.base, Registry.open(c.registry_dir), c.write("h.jsonl", "[1]\n")),
         DE, "h.jsonl:1"),
    # --- the launchers as subprocesses (a representative few) --------------
    Case("sub_train_missing_data", sub(
        "launch.train", "--config=configs/smollm2_personal.py:tiny",
        "--config.train_data=/nonexistent/d.jsonl",
        "--config.registry={reg}", "--workdir={tmp}/w1"),
         match="error: DataError: .*does not exist"),
    Case("sub_train_no_config", sub("launch.train", "--workdir={tmp}/w2"),
         match="--config"),
    Case("sub_eval_missing_registry", sub(
        "launch.eval", "--base=random:tiny", "--registry={tmp}/nope",
        "--heldout={data}"), match="is not a mintjax registry"),
    Case("sub_eval_missing_heldout", sub(
        "launch.eval", "--base=random:tiny", "--registry={reg}",
        "--heldout=/nonexistent/h.jsonl"), match="does not exist"),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  return Ctx(str(tmp_path_factory.mktemp("bad_model")))


@pytest.mark.parametrize("case", params(CASES))
def test_bad_model_input(case, ctx):
  check(case, ctx, ctx.registry_dir)


def test_valid_inputs_still_run(ctx):
  # The checks refuse only what is out of range: slot 2 of 3 and the last
  # vocabulary id are served, jitted and not.
  for jit in (False, True):
    assert fwd((2,), np.array([[0, 258]]), jit)(ctx).message is None
