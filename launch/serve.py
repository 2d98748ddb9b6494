"""Serve generation requests in batch mode (thin launcher).

  mintjax-serve --config=serve.py:smollm2 --config.registry=REG \
      --config.input=examples/requests.jsonl --config.output=results.jsonl
  python -m launch.serve --config=configs/serve.py:tiny ...

`--config_help` lists every config field; `--verbosity=0` shows INFO logs.
All logic lives in `mintjax.apps.jsonl_serving.serve_jsonl`.
"""

import importlib
import sys

from launch import console  # light (absl only): say() runs before jax loads

from absl import app
from ml_collections import config_flags

CONFIG_MODULE = "configs.serve"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Serve config (configs/serve.py:variant).",
    lock_config=True)


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: no config; pass --config=configs/serve.py:tiny")
  mod = importlib.import_module(CONFIG_MODULE)
  console.maybe_config_help(_CONFIG.value, CONFIG_MODULE, mod.REQUIRED)
  console.quiet_logs()
  console.require(_CONFIG.value, mod.REQUIRED, CONFIG_MODULE)
  cfg = _CONFIG.value
  console.say(f"mintjax-serve: loading base {cfg.base!r}, then compiling "
              "the serving steps")
  from mintjax.apps.jsonl_serving import serve_jsonl  # pylint: disable=g-import-not-at-top
  # Bad config or paths: one line, non-zero exit; bad request lines never
  # get here (they are reported per line in the output).
  summary = console.user_errors(lambda: serve_jsonl(cfg))
  console.say(f"done: {summary['requests']} requests, {summary['errors']} "
              f"errors, {summary['generated_tokens']} tokens in "
              f"{summary['seconds']:.1f}s -> {cfg.output}")


def run():
  """Console-script entry (`mintjax-serve`): works from any directory."""
  console.say("mintjax-serve: starting")
  sys.argv = console.resolve_config_arg(sys.argv, "serve.py:tiny")
  app.run(main)


if __name__ == "__main__":
  run()
