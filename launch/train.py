"""Train many users' personal adapters and publish them (thin launcher).

  python -m launch.train --config=configs/smollm2_personal.py:tiny \
      --config.train_data=DIR --config.registry=REG --workdir=WORK

Multi-host: pass --coordinator_address, --num_processes and --process_id on
every host (or nothing on a TPU pod, where they are detected). Rerunning the
same command with the same --workdir resumes from the latest checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config (configs/x.py:variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)
distributed.define_flags()


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: no config; pass "
             "--config=configs/smollm2_personal.py:tiny")
  distributed.initialize()
  from mintjax.apps.train_workflow import train_and_publish  # pylint: disable=g-import-not-at-top
  try:
    result = train_and_publish(_CONFIG.value, _WORKDIR.value)
  except (ValueError, LookupError, OSError) as e:
    # Bad data, config or registry state: one line, non-zero exit. The
    # library checks inputs before it publishes anything.
    sys.exit(f"error: {type(e).__name__}: {' '.join(str(e).split())}")
  logging.info("published: %s", result["published"])


if __name__ == "__main__":
  app.run(main)
