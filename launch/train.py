"""Train many users' personal adapters and publish them (thin launcher).

  mintjax-train --config=smollm2_personal.py:smollm2 \
      --config.train_data=examples/train_chat.jsonl --config.registry=REG \
      --workdir=WORK
  python -m launch.train --config=configs/smollm2_personal.py:tiny ...

`--config_help` lists every config field; `--verbosity=0` shows INFO logs.
Multi-host: pass --coordinator_address, --num_processes and --process_id on
every host (or nothing on a TPU pod, where they are detected). Rerunning the
same command with the same --workdir resumes from the latest checkpoint.
All logic lives in `mintjax.apps.train_workflow.train_and_publish`.
"""

import importlib
import os
import sys

from launch import console  # light (absl only): say() runs before jax loads

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import distributed

CONFIG_MODULE = "configs.smollm2_personal"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config (configs/x.py:variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics.jsonl); rerun "
    "with the same one to resume.")
distributed.define_flags()


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: no config; pass "
             "--config=configs/smollm2_personal.py:tiny")
  mod = importlib.import_module(CONFIG_MODULE)
  console.maybe_config_help(_CONFIG.value, CONFIG_MODULE, mod.REQUIRED)
  console.quiet_logs()
  console.require(_CONFIG.value, mod.REQUIRED, CONFIG_MODULE)
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required (the run directory: checkpoints "
             "and metrics.jsonl; rerun with the same one to resume)")
  cfg = _CONFIG.value
  if os.path.exists(cfg.base):
    # Provenance records the base as given; an absolute path lets
    # `mintjax-eval` find it (its --base default) from any directory.
    cfg.base = os.path.abspath(cfg.base)
  console.say(f"mintjax-train: loading base {cfg.base!r} and data "
              f"{cfg.train_data!r}")
  distributed.initialize()
  from mintjax.apps.train_workflow import train_and_publish  # pylint: disable=g-import-not-at-top
  # Bad data, config or registry state: one line, non-zero exit. The
  # library checks inputs before it publishes anything.
  result = console.user_errors(
      lambda: train_and_publish(cfg, _WORKDIR.value))
  console.say(f"published: {result['published']}")


def run():
  """Console-script entry (`mintjax-train`): works from any directory."""
  console.say("mintjax-train: starting")
  sys.argv = console.resolve_config_arg(sys.argv,
                                        "smollm2_personal.py:tiny")
  app.run(main)


if __name__ == "__main__":
  run()
