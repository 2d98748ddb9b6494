"""Where the optional Hugging Face parity interpreter lives.

torch, transformers and peft are never imported by mintjax or its default
tests; fixture generation and the PEFT/transformers columns of the
benchmarks run them in a separate interpreter, in a subprocess. `make
parity-venv` builds it at `.venv-parity/` (Python 3.11, `torch==2.13.0` CPU
build); `MINTJAX_PARITY_PYTHON` points elsewhere.
"""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parity_python() -> str | None:
  """Path of the parity interpreter, or None when it is not installed."""
  path = os.environ.get("MINTJAX_PARITY_PYTHON") or os.path.join(
      REPO_ROOT, ".venv-parity", "bin", "python")
  return path if os.path.exists(path) else None
