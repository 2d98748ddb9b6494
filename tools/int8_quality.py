"""int8 weight-only base vs float on SmolLM2-135M: quality and memory, side by side.

  .venv/bin/python -m tools.int8_quality [--num_users=16] [--skip_demo]

Loads the embedded SmolLM2-135M-Instruct (float32), quantizes it
(`mintjax.model.int8_base.quantize_base`: per-channel absmax int8) and
reports, for both bases in one run:

  - parameter bytes (float32, bfloat16 equivalent, int8 + scales);
  - perplexity on a fixed text (`FIXED_TEXT`, public domain, below);
  - greedy completions of a few prompts (how many tokens agree);
  - the demo's held-out exact match: the same personal-facts workload and
    recipe as `make demo` (configs/smollm2_personal.py:demo), trained as
    LoRA on each base (QLoRA-style on the int8 one) and evaluated on the
    held-out paraphrases.

Prints one JSON line per measurement and a final summary table.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import smollm2_personal
from mintjax.apps import demo, personal_data
from mintjax.apps.train_workflow import train_and_publish
from mintjax.model import int8_base, llama, quant
from mintjax.model.smollm2 import load_smollm2

_NUM_USERS = flags.DEFINE_integer("num_users", 16, "demo users per base")
_SKIP_DEMO = flags.DEFINE_bool("skip_demo", False, "perplexity and memory "
                               "only (no adapter training)")
_WORKDIR = flags.DEFINE_string("workdir", None, "scratch directory "
                               "(default: a temporary one)")

# The opening of the US Declaration of Independence (1776; public domain).
FIXED_TEXT = (
    "When in the Course of human events, it becomes necessary for one people "
    "to dissolve the political bands which have connected them with another, "
    "and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a "
    "decent respect to the opinions of mankind requires that they should "
    "declare the causes which impel them to the separation. We hold these "
    "truths to be self-evident, that all men are created equal, that they "
    "are endowed by their Creator with certain unalienable Rights, that "
    "among these are Life, Liberty and the pursuit of Happiness. That to "
    "secure these rights, Governments are instituted among Men, deriving "
    "their just powers from the consent of the governed, That whenever any "
    "Form of Government becomes destructive of these ends, it is the Right "
    "of the People to alter or to abolish it, and to institute new "
    "Government, laying its foundation on such principles and organizing its "
    "powers in such form, as to them shall seem most likely to effect their "
    "Safety and Happiness.")
PROMPTS = ("The capital of France is", "Water boils at a temperature of",
           "The largest planet in the solar system is",
           "def fibonacci(n):")


def perplexity(base, text: str) -> tuple[float, int]:
  """exp(mean next-token NLL) of `text` under `base`, and the token count."""
  ids = np.asarray([base.tokenizer.encode(text)], np.int32)
  logits = jax.jit(lambda p, t: llama.forward(
      p, None, None, t, config=base.config)[0])(base.params, ids)
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()
  return math.exp(float(nll)), ids.shape[1]


def demo_exact_match(base, num_users: int, workdir: str) -> dict:
  """The demo's workload and recipe on `base`: held-out exact match."""
  recipe = smollm2_personal.get_config("demo")
  train, heldout, truth = personal_data.make_personal_data(num_users, 0)
  data = dict(
      train=personal_data.write_jsonl(train, os.path.join(
          workdir, "data", "train.jsonl")),
      heldout=personal_data.write_jsonl(heldout, os.path.join(
          workdir, "data", "heldout.jsonl")),
      truth=truth, heldout_records=heldout)
  cfg = demo.train_config(recipe, num_users, base_dir="(in memory)",
                          data=data,
                          registry_dir=os.path.join(workdir, "registry"))
  t0 = time.perf_counter()
  out = train_and_publish(cfg, os.path.join(workdir, "train"), base=base)
  evals = {u: e for u, e in out["evals"].items() if e}
  return dict(
      users=len(evals),
      adapted_exact_match=float(np.mean([e["exact_match"]
                                         for e in evals.values()])),
      base_exact_match=float(np.mean([e["base_exact_match"]
                                      for e in evals.values()])),
      worst_user=float(min(e["exact_match"] for e in evals.values())),
      seconds=round(time.perf_counter() - t0, 1))


def main(argv):
  del argv
  fbase = load_smollm2("float32")
  qbase = int8_base.quantize_base(fbase)
  f32 = quant.nbytes(fbase.params)
  rows = {"memory": dict(float32_bytes=f32, bfloat16_bytes=f32 // 2,
                         int8_bytes=quant.nbytes(qbase.params))}
  rows["memory"]["saved_vs_bf16"] = round(
      1 - rows["memory"]["int8_bytes"] / rows["memory"]["bfloat16_bytes"], 4)
  print(json.dumps({"memory": rows["memory"]}), flush=True)
  for name, base in (("float32", fbase), ("int8", qbase)):
    ppl, n = perplexity(base, FIXED_TEXT)
    rows[name] = dict(perplexity=round(ppl, 4), tokens=n)
    toks, _ = demo.greedy_complete(base, PROMPTS, max_new_tokens=8)
    rows[name]["greedy"] = [base.tokenizer.decode(t) for t in toks]
    rows[name]["greedy_tokens"] = toks
    print(json.dumps({name: {k: v for k, v in rows[name].items()
                             if k != "greedy_tokens"}}), flush=True)
  same = sum(a == b for fa, qa in zip(rows["float32"]["greedy_tokens"],
                                     rows["int8"]["greedy_tokens"])
             for a, b in zip(fa, qa))
  total = sum(len(t) for t in rows["float32"]["greedy_tokens"])
  print(json.dumps({"greedy_tokens_equal": f"{same}/{total}"}), flush=True)
  if not _SKIP_DEMO.value:
    root = _WORKDIR.value or tempfile.mkdtemp(prefix="int8_quality_")
    for name, base in (("float32", fbase), ("int8", qbase)):
      rows[name]["demo"] = demo_exact_match(
          base, _NUM_USERS.value, os.path.join(root, name))
      print(json.dumps({name: {"demo": rows[name]["demo"]}}), flush=True)
  m = rows["memory"]
  print(f"\nSmolLM2-135M  params: float32 {m['float32_bytes'] / 2**20:.1f} MiB"
        f", bf16 {m['bfloat16_bytes'] / 2**20:.1f} MiB, int8 "
        f"{m['int8_bytes'] / 2**20:.1f} MiB ({m['saved_vs_bf16']:.1%} less "
        "than bf16)")
  for name in ("float32", "int8"):
    r = rows[name]
    line = f"{name:8s} perplexity {r['perplexity']:.3f} ({r['tokens']} tokens)"
    if "demo" in r:
      d = r["demo"]
      line += (f"; demo held-out exact match {d['adapted_exact_match']:.3f} "
               f"(base {d['base_exact_match']:.3f}, worst user "
               f"{d['worst_user']:.3f}, {d['users']} users)")
    print(line)
  print(f"greedy tokens equal: {same}/{total}")


if __name__ == "__main__":
  app.run(main)
