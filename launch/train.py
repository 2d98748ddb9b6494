"""Train many users' personal adapters and publish them (thin launcher).

  python -m launch.train --config=configs/smollm2_personal.py:tiny \
      --config.train_data=DIR --config.registry=REG --workdir=WORK

Multi-host: pass --coordinator_address, --num_processes and --process_id on
every host (or nothing on a TPU pod, where they are detected). Rerunning the
same command with the same --workdir resumes from the latest checkpoint.
"""

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
  distributed.initialize()
  from mintjax.train.loop import train_and_publish  # pylint: disable=g-import-not-at-top
  result = train_and_publish(_CONFIG.value, _WORKDIR.value)
  logging.info("published: %s", result["published"])


if __name__ == "__main__":
  app.run(main)
