"""Serve the Tinker-compatible training and sampling API (thin launcher).

  python -m launch.tinker_service --config=configs/tinker_service.py:smollm2 \
      --config.registry=REG --config.state_dir=STATE --config.server.port=8001

Installed as the `mintjax-tinker` console script. All logic lives in
`mintjax.apps.tinker_service.server.serve`; see docs/TINKER.md.
"""

import os
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Service config (configs/tinker_service.py:variant).",
    lock_config=True)


def main(argv):
  del argv
  from mintjax.apps.tinker_service.server import serve  # pylint: disable=g-import-not-at-top
  serve(_CONFIG.value)


def run():
  """Console-script entry: the config defaults to configs/tinker_service.py."""
  if not any(a.startswith("--config=") or a == "--config"
             for a in sys.argv[1:]):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.argv.insert(1, "--config=" + os.path.join(
        here, "configs", "tinker_service.py"))
  app.run(main)


if __name__ == "__main__":
  app.run(main)
