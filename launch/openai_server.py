"""Serve an OpenAI-compatible HTTP API (thin launcher).

  python -m launch.openai_server --config=configs/openai_server.py:smollm2 \
      --config.registry=REG --config.server.port=8000

Installed as the `mintjax-openai-server` console script. All logic lives in
`mintjax.apps.openai_server.server.serve`; see docs/SERVING.md.
"""

import os
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Server config (configs/openai_server.py:variant).",
    lock_config=True)


def main(argv):
  del argv
  from mintjax.apps.openai_server.server import serve  # pylint: disable=g-import-not-at-top
  serve(_CONFIG.value)


def run():
  """Console-script entry: the config defaults to configs/openai_server.py."""
  if not any(a.startswith("--config=") or a == "--config"
             for a in sys.argv[1:]):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.argv.insert(1, "--config=" + os.path.join(
        here, "configs", "openai_server.py"))
  app.run(main)


if __name__ == "__main__":
  app.run(main)
