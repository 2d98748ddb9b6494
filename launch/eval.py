"""Evaluate many adapter revisions at once; optionally promote a tag.

  mintjax-eval --registry=REG --heldout=examples/heldout.jsonl \
      [--refs=alice,bob@2] [--promote=prod] [--base=smollm2]
  python -m launch.eval ...

Prints a markdown table (each revision vs its parent and the base, and the
prompt format used) and which revisions were held back from the tag and why.
--base defaults to the base the revisions were trained on (their
provenance's training config). Each revision is scored in the prompt format
its provenance records; --prompt_style overrides that for every revision
(and is recorded with the metrics). Promotion refuses degenerate
evaluations: see mintjax/eval/promotion.py for the rules.
"""

import sys

from launch import console  # light (absl only): say() runs before jax loads

from absl import app
from absl import flags

from launch import distributed

_BASE = flags.DEFINE_string(
    "base", None, "Base source ('smollm2', a .gguf, HF folder, converted "
    "checkpoint, 'random:<variant>'); default: the base recorded in the "
    "revisions' provenance.")
_REGISTRY = flags.DEFINE_string("registry", None, "Registry directory.")
_HELDOUT = flags.DEFINE_string("heldout", None, "Held-out JSONL file/dir.")
_REFS = flags.DEFINE_list("refs", [], "Adapter refs (default: all with "
                          "held-out data, latest revision).")
_PROMOTE = flags.DEFINE_string("promote", None, "Tag to move (e.g. prod).")
_TOL = flags.DEFINE_float("loss_tolerance", 0.0, "Allowed loss increase.")
_STYLE = flags.DEFINE_enum(
    "prompt_style", None, ["raw", "chat"],
    "Override the prompt format (default: each revision's trained format, "
    "read from its provenance).")
_FALLBACK = flags.DEFINE_enum(
    "fallback_prompt_style", "raw", ["raw", "chat"],
    "Format for revisions whose provenance records none (warned).")
_MAXLEN = flags.DEFINE_integer("max_length", 256, "Max tokens per example.")
distributed.define_flags()


def main(argv):
  del argv
  console.quiet_logs()
  for flag, value in (("--registry", _REGISTRY.value),
                      ("--heldout", _HELDOUT.value)):
    if not value:
      sys.exit(f"error: {flag} is required")
  distributed.initialize()
  console.say("mintjax-eval: opening the registry and loading the base")
  from mintjax.eval.evaluate import evaluate_and_promote, recorded_base_source  # pylint: disable=g-import-not-at-top
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  from mintjax.model.sources import load_base_source  # pylint: disable=g-import-not-at-top
  # create=False: a mistyped --registry is an error, not a new, empty
  # registry evaluated as if it held nothing.
  registry = Registry.open(_REGISTRY.value, create=False)
  source = _BASE.value or recorded_base_source(registry, _REFS.value)
  console.say(f"base {source!r}")
  out = evaluate_and_promote(
      load_base_source(source), registry,
      _HELDOUT.value, _REFS.value, _PROMOTE.value, _TOL.value,
      prompt_style=_STYLE.value, fallback_prompt_style=_FALLBACK.value,
      max_length=_MAXLEN.value)
  print(out["table"])
  if _PROMOTE.value:
    print(f"promoted to {_PROMOTE.value!r}: {out['promoted'] or 'none'}")


def _main_reporting_errors(argv):
  """`main`, with bad input reported as one line and a non-zero exit."""
  return console.user_errors(lambda: main(argv))


def run():
  """Console-script entry (`mintjax-eval`)."""
  console.say("mintjax-eval: starting")
  app.run(_main_reporting_errors)


if __name__ == "__main__":
  run()
