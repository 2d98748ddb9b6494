"""Serve an OpenAI-compatible HTTP API (thin launcher).

  mintjax-openai-server --config=openai_server.py:smollm2 \
      --config.registry=REG --config.server.port=8000
  python -m launch.openai_server --config=configs/openai_server.py:smollm2 ...

`--config_help` lists every config field; `--verbosity=0` shows INFO logs.
All logic lives in `mintjax.apps.openai_server.server.serve`; see
docs/SERVING.md.
"""

import sys

from launch import console  # light (absl only): say() runs before jax loads

from absl import app
from ml_collections import config_flags

CONFIG_MODULE = "configs.openai_server"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Server config (configs/openai_server.py:variant).",
    lock_config=True)


def main(argv):
  del argv
  console.maybe_config_help(_CONFIG.value, CONFIG_MODULE)
  console.quiet_logs()
  console.say(f"mintjax-openai-server: loading base {_CONFIG.value.base!r}, "
              "then compiling the serving steps")
  from mintjax.apps.openai_server.server import serve  # pylint: disable=g-import-not-at-top
  serve(_CONFIG.value)


def run():
  """Console-script entry: the config defaults to configs/openai_server.py."""
  console.say("mintjax-openai-server: starting")
  sys.argv = console.resolve_config_arg(sys.argv, "openai_server.py")
  app.run(main)


if __name__ == "__main__":
  run()
