"""`make demo`: the end-to-end personal-models demo (thin absl entry point).

  .venv/bin/python -m tools.demo [--workdir=demo_out] [--num_users=64]
      [--base=smollm2] [--quick]

Converts the embedded SmolLM2-135M-Instruct on the first run (cached in the
workdir), checks it with greedy completions and a mixed base/random-adapter
batch, trains N users' personal adapters together, publishes them to a
registry, serves one mixed batch and prints a summary. `--quick` runs the
same on the random tiny model in well under a minute. All logic lives in
`mintjax.apps.demo.run_demo`; this file picks the training recipe
(`configs/smollm2_personal.py:demo`, or `demo_tiny` with `--quick`).
"""

from __future__ import annotations

import logging

from absl import app
from absl import flags

from configs import smollm2_personal
from mintjax.apps import demo

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "output directory")
_NUM_USERS = flags.DEFINE_integer("num_users", 64, "users (adapters) to "
                                  "train and serve")
_BASE = flags.DEFINE_string(
    "base", demo.DEFAULT_BASE, "'smollm2' (the embedded GGUF), "
    "'random:<variant>', a GGUF file, an HF folder or a base checkpoint")
_QUICK = flags.DEFINE_bool("quick", False, "tiny random base and recipe "
                           "(implies --base=random:tiny unless --base is set)")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")


class _ProgressOnly(logging.Filter):
  """Keeps the trainer's step lines and warnings; drops library chatter."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      # Orbax warns about reads it abandons on purpose; not actionable here.
      return "orbax" not in record.pathname
    return record.module == "train_workflow"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  base = _BASE.value
  if _QUICK.value and not flags.FLAGS["base"].present:
    base = "random:tiny"
  for handler in logging.getLogger().handlers:
    handler.addFilter(_ProgressOnly())
  recipe = smollm2_personal.get_config("demo_tiny" if _QUICK.value
                                      else "demo")
  demo.run_demo(_WORKDIR.value, num_users=_NUM_USERS.value, base_source=base,
                recipe=recipe, seed=_SEED.value)


if __name__ == "__main__":
  app.run(main)
