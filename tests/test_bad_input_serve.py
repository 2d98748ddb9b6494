"""Bad-input corpus, serving side: `Engine` requests (prompts, refs,
sampling parameters, chat messages), `launch/serve.py`'s JSONL batch mode
(every bad line gets its own non-null error and the good lines are still
served) and the serve launcher as a subprocess.

Each bad request rides in a batch with a good one: the good one must still
be served, so a bad request can never take the batch down.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bad_input_corpus import Case, Reported, check, params
from configs import serve as serve_config
from mintjax.adapters.spec import AdapterWeights
from mintjax.model.base import random_base
from mintjax.apps import jsonl_serving as batch_lib
from mintjax.store.registry import Registry

GOOD = {"prompt": [5, 6, 7], "max_new_tokens": 2}


class Ctx:
  """A tiny random base, a registry with 'alice' and 'stranger' (another
  base), an engine over them, and one JSONL batch run over BAD_LINES."""

  registry_dir = None  # engine runs record residency: not a bad-input write

  def __init__(self, tmp: str):
    self.tmp = tmp
    cfg = serve_config.get_config("tiny")
    cfg.registry = os.path.join(tmp, "reg")
    cfg.input = os.path.join(tmp, "in.jsonl")
    cfg.output = os.path.join(tmp, "out.jsonl")
    cfg.engine.update(max_len=32, max_batch=4, num_slots=2, targets="q,v",
                      max_rank=4, prefill_batch=2, steps_per_call=4)
    cfg.defaults.max_new_tokens = 2
    self.cfg = cfg
    self.reg = Registry.open(cfg.registry)
    self.engine = batch_lib.engine_from_config(cfg)
    base = self.engine.base
    other = random_base(base.config, seed=7)
    for name, b in (("alice", base), ("stranger", other)):
      self.reg.create_adapter(name, spec=dict(targets=["q", "v"], rank=4),
                              base_fingerprint=b.fingerprint)
      self.reg.publish(name, AdapterWeights.random(base.config, ("q", "v"),
                                                   4, seed=1), {})
    self.vocab = base.config.vocab_size
    self._batch = None

  def batch(self):
    """(outputs by input line, or the exception that killed the batch)."""
    if self._batch is None:
      lines = [json.dumps(GOOD).encode()] + [
          l for _, l, _ in BAD_LINES] + [json.dumps(GOOD).encode()]
      with open(self.cfg.input, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
      try:
        batch_lib.serve_jsonl(self.cfg)
        with open(self.cfg.output, encoding="utf-8") as f:
          out = [json.loads(l) for l in f]
        self._batch = out
      except Exception as e:  # pylint: disable=broad-except  # tallied
        self._batch = e
    return self._batch

  def close(self):
    self.reg.close()


def build_context(tmp):
  c = Ctx(tmp)
  c.batch()  # one JSONL run for all line cases (not timed per case)
  return c


def req(request):
  """Serves [bad request, good request]; the bad one's error, in place."""
  def fn(ctx):
    try:
      res = ctx.engine.generate([request, GOOD])
    except Exception as e:  # pylint: disable=broad-except  # batch died
      return Reported(f"{type(e).__name__}: {e}", traceback=True)
    if res[1].finish_reason == "error":
      return Reported(f"the good request failed too: {res[1].error}",
                      traceback=True)
    if res[0].finish_reason != "error":
      return Reported(None)
    return Reported(res[0].error or "")
  return fn


def line(i):
  """The JSONL output line of BAD_LINES[i]; the good ones must be served."""
  def fn(ctx):
    out = ctx.batch()
    if isinstance(out, Exception):
      return Reported(f"batch died: {type(out).__name__}: {out}",
                      traceback=True)
    if out[0]["error"] or out[-1]["error"] or len(out) != len(BAD_LINES) + 2:
      return Reported("the good lines were not served", traceback=True)
    r = out[i + 1]
    if r["finish_reason"] != "error":
      return Reported(None)
    # A null error on a failed line is the bug the issue names.
    return Reported(r["error"] if r["error"] is not None else "",
                    traceback=r["error"] is None)
  return fn


def sub_serve(ctx, *overrides):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.serve", *overrides], cwd=REPO,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode == 0:
    return Reported(None)
  err = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  return Reported(err[-1] if err else "", traceback="Traceback" in
                  proc.stderr)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(batch_lib.__file__)))
REPO = os.path.dirname(REPO)
P = {"prompt": "hi"}
BAD_REQUESTS = [
    ("prompt_int", {"prompt": 5}, "'prompt' must be text or a list"),
    ("prompt_null_id", {"prompt": [None]}, "integers in"),
    ("prompt_float_id", {"prompt": [1.5, 2.0]}, "integers in"),
    ("prompt_bool_id", {"prompt": [True]}, "integers in"),
    ("prompt_negative_id", {"prompt": [-1]}, "integers in"),
    ("prompt_id_eq_vocab", {"prompt": [259]}, r"\[0, 259\)"),
    ("prompt_id_huge", {"prompt": [2**40]}, r"\[0, 259\)"),
    ("prompt_empty_ids", {"prompt": []}, "empty"),
    ("prompt_empty_text", {"prompt": ""}, "empty"),
    ("prompt_dict", {"prompt": {"a": 1}}, "'prompt' must be text"),
    ("prompt_too_long", {"prompt": [3] * 100}, "max_len"),
    ("text_too_long", {"prompt": "x" * 100}, "max_len"),
    ("prompt_and_messages", dict(P, messages=[{"role": "user",
                                               "content": "x"}]),
     "exactly one"),
    ("neither_prompt_nor_messages", {"max_new_tokens": 2}, "exactly one"),
    ("messages_int", {"messages": 5}, "'messages' must be a list"),
    ("messages_str", {"messages": "hi"}, "'messages' must be a list"),
    ("messages_item_int", {"messages": [5]}, "chat message 0"),
    ("messages_no_content", {"messages": [{"role": "user"}]},
     "chat message 0"),
    ("messages_role_int", {"messages": [{"role": 1, "content": "x"}]},
     "chat message 0"),
    ("messages_content_list", {"messages": [{"role": "user",
                                             "content": ["x"]}]},
     "chat message 0"),
    ("messages_empty", {"messages": []}, "empty"),
    ("adapter_int", dict(P, adapter=5), "'adapter' must be a ref string"),
    ("adapter_empty", dict(P, adapter=""), "adapter|reference"),
    ("adapter_unknown", dict(P, adapter="ghost"), "ghost"),
    ("adapter_rev_missing", dict(P, adapter="alice@99"), "99"),
    ("adapter_tag_missing", dict(P, adapter="alice:nope"), "nope"),
    ("adapter_other_base", dict(P, adapter="stranger"),
     "trained on base .* convert or retrain"),
    ("adapter_bad_ref", dict(P, adapter="alice@@1"), "reference"),
    ("adapter_arabic_digit", dict(P, adapter="alice@\u0661"),
     "revision|reference"),
    ("adapter_trailing_newline", dict(P, adapter="alice\n"),
     "reference|adapter id"),
    ("max_new_tokens_0", dict(P, max_new_tokens=0), "max_new_tokens"),
    ("max_new_tokens_neg", dict(P, max_new_tokens=-1), "max_new_tokens"),
    ("max_new_tokens_2p31", dict(P, max_new_tokens=2**31 + 5),
     "max_new_tokens.*at most"),
    ("max_new_tokens_float", dict(P, max_new_tokens=1.5),
     "max_new_tokens must be an integer"),
    ("max_new_tokens_bool", dict(P, max_new_tokens=True),
     "max_new_tokens must be an integer"),
    ("max_new_tokens_str", dict(P, max_new_tokens="8"),
     "max_new_tokens must be an integer"),
    ("temperature_neg", dict(P, temperature=-1), "temperature"),
    ("temperature_str", dict(P, temperature="hot"), "temperature"),
    ("temperature_nan", dict(P, temperature=math.nan), "temperature"),
    ("temperature_inf", dict(P, temperature=math.inf), "temperature"),
    ("top_k_neg", dict(P, top_k=-1), "top_k"),
    ("top_k_2p40", dict(P, top_k=2**40), "top_k.*at most"),
    ("top_k_float", dict(P, top_k=1.5), "top_k must be an integer"),
    ("top_k_over_vocab", dict(P, top_k=10**6), "top_k.*vocabulary"),
    ("top_p_zero", dict(P, top_p=0), "top_p"),
    ("top_p_big", dict(P, top_p=1.5), "top_p"),
    ("top_p_str", dict(P, top_p="x"), "top_p"),
    ("seed_neg", dict(P, seed=-1), "seed"),
    ("seed_2p40", dict(P, seed=2**40), "seed"),
    ("seed_float", dict(P, seed=1.5), "seed must be an integer"),
    ("stop_int", dict(P, stop=5), "stop must be a string or a list"),
    ("stop_list_int", dict(P, stop=[5]), "stop must be a string or a list"),
    ("stop_empty_string", dict(P, stop=[""]), "stop"),
    ("stop_ids_float", dict(P, stop_token_ids=[1.5]), "stop_token_ids"),
    ("stop_ids_neg", dict(P, stop_token_ids=[-1]), "stop_token_ids"),
    ("stop_ids_over_vocab", dict(P, stop_token_ids=[10**6]),
     "outside the vocabulary"),
    ("stop_ids_too_many", dict(P, stop_token_ids=list(range(3, 12))),
     "at most"),
    ("stop_ids_int", dict(P, stop_token_ids=5), "stop_token_ids"),
    ("ignore_eos_str", dict(P, ignore_eos="yes"), "ignore_eos"),
    ("unknown_field", {"promt": "hi"}, "unknown request fields"),
    ("sampling_int", dict(P, sampling=5), "'sampling' must be an object"),
    ("sampling_unknown_key", dict(P, sampling={"bogus": 1}),
     "unknown sampling parameters"),
    ("add_bos_str", dict(P, add_bos="yes"), "add_bos"),
    ("request_none", None, "must be a GenerationRequest or a dict"),
    ("request_int", 5, "must be a GenerationRequest or a dict"),
    ("request_str", "hello", "must be a GenerationRequest or a dict"),
    ("request_list", [1, 2], "must be a GenerationRequest or a dict"),
]

BAD_LINES = [
    ("jsonl_prompt_int", b'{"prompt": 5}', "line 2: .*'prompt' must be"),
    ("jsonl_stop_int", b'{"prompt": "hi", "stop": 5}', "line 3: .*stop"),
    ("jsonl_prompt_null", b'{"prompt": [null]}', "line 4: .*integers"),
    ("jsonl_max_new_tokens_2p31",
     b'{"prompt": "hi", "max_new_tokens": 2147483653}',
     "line 5: .*max_new_tokens"),
    ("jsonl_top_k_2p40", b'{"prompt": "hi", "top_k": 1099511627776}',
     "line 6: .*top_k"),
    ("jsonl_bad_utf8", b'{"prompt": "caf\xe9"}', "line 7 is not valid UTF-8"),
    ("jsonl_null", b"null", "line 8 is a JSON NoneType|line 8 .*not a request"),
    ("jsonl_number", b"42", "line 9 .*not a request"),
    ("jsonl_array", b"[1, 2]", "line 10 .*not a request"),
    ("jsonl_string", b'"hello"', "line 11 .*not a request"),
    ("jsonl_broken", b"{broken", "line 12 is not valid JSON"),
    ("jsonl_float_ids", b'{"prompt": [1.5]}', "line 13: .*integers"),
    ("jsonl_unknown_adapter", b'{"prompt": "hi", "adapter": "ghost"}',
     "line 14: .*ghost"),
    ("jsonl_sampling_int", b'{"prompt": "hi", "sampling": 5}',
     "line 15: .*sampling"),
    ("jsonl_temperature_str", b'{"prompt": "hi", "temperature": "hot"}',
     "line 16: .*temperature"),
    ("jsonl_empty_object", b"{}", "line 17: .*exactly one"),
    ("jsonl_nan_temperature", b'{"prompt": "hi", "temperature": NaN}',
     "line 18: .*temperature"),
]

CASES = [Case(n, req(r), match=m, store=False, xfail=x[0] if x else None)
         for n, r, m, *x in BAD_REQUESTS]
CASES += [Case(n, line(i), match=m, store=False)
          for i, (n, _, m) in enumerate(BAD_LINES)]
CASES += [
    Case("serve_missing_input", lambda c: sub_serve(
        c, "--config=configs/serve.py:tiny", "--config.input=/nonexistent.j",
        f"--config.output={c.tmp}/o.jsonl"), match="input .* is not a file",
         store=False),
    Case("serve_output_dir_missing", lambda c: sub_serve(
        c, "--config=configs/serve.py:tiny", f"--config.input={__file__}",
        "--config.output=/nonexistent/dir/o.jsonl"),
         match="output folder .* does not exist", store=False),
    Case("serve_no_config", lambda c: sub_serve(c), match="--config",
         store=False),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  c = build_context(str(tmp_path_factory.mktemp("bad_serve")))
  yield c
  c.close()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_serve_input(case, ctx):
  check(case, ctx, None)


def test_batch_serves_good_lines_around_bad_ones(ctx):
  out = ctx.batch()
  assert not isinstance(out, Exception), out
  assert len(out) == len(BAD_LINES) + 2
  assert out[0]["error"] is None and out[-1]["error"] is None
  assert out[0]["tokens"] == out[-1]["tokens"] and len(out[0]["tokens"]) == 2
  assert all(o["error"] for o in out[1:-1])  # never null on a failed line
