"""The `mint` console script's entry: speak first, then load the CLI.

`tools/mint.py` (the registry CLI) imports the store, and with it jax, at
module level; a console script importing it directly stays silent for
seconds on a busy machine. This entry prints which command runs (stderr,
so `--json` output stays clean) and only then imports it.
"""

import sys

from launch import console


def cli():
  """Console-script entry (`mint`)."""
  command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
  console.say(f"mint: {command or 'no command'}")
  from tools import mint  # pylint: disable=g-import-not-at-top
  mint.cli()
