"""Convert a base to the int8 weight-only format (thin CLI).

    .venv/bin/python -m tools.quantize --base=smollm2 --out=smollm2_int8

`--base` is anything `mintjax.model.sources.load_base_source` loads
('smollm2', 'random:<variant>', a GGUF file, an HF folder, a base
checkpoint). The folder written (`int8.safetensors` + `int8.json`) loads
with `mintjax.model.int8_base.load_int8`; the logic is
`int8_base.quantize_base` / `save_int8`.
"""

from __future__ import annotations

import argparse
import sys

from mintjax.model import int8_base, quant
from mintjax.model.sources import load_base_source


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="base to quantize")
  p.add_argument("--out", required=True, help="output folder")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    base = load_base_source(args.base)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  q = int8_base.quantize_base(base)
  out = int8_base.save_int8(args.out, q)
  print(f"{args.base}: {quant.nbytes(base.params) / 2**20:.1f} MiB "
        f"({base.config.dtype}) -> {quant.nbytes(q.params) / 2**20:.1f} MiB "
        f"int8 in {out}; fingerprint {q.short_fingerprint}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
