"""Serve generation requests in batch mode (thin launcher).

  python -m launch.serve --config=configs/serve.py:tiny \
      --config.registry=REG --config.input=requests.jsonl \
      --config.output=results.jsonl

All logic lives in `mintjax.apps.jsonl_serving.serve_jsonl`.
"""

import sys

from absl import app
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Serve config (configs/serve.py:variant).",
    lock_config=True)


def main(argv):
  del argv
  from mintjax.apps.jsonl_serving import serve_jsonl  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None:
    sys.exit("error: no config; pass --config=configs/serve.py:tiny")
  try:
    summary = serve_jsonl(_CONFIG.value)
  except (ValueError, LookupError, OSError) as e:
    # Bad config or paths: one line, non-zero exit; bad request lines never
    # get here (they are reported per line in the output).
    sys.exit(f"error: {type(e).__name__}: {' '.join(str(e).split())}")
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
