"""Compile a mintjax step ahead of time for a TPU topology (no device needed).

    .venv-tpu/bin/python -m tools.aot --model=llama-3.1-8b --topology=v5e:2x4 \\
        --mesh=1,1,8 --step=decode --slots=1024 --rank=16 --batch=64 \\
        --lora_impl=gather --rules=slot=tensor --json=/tmp/aot.json
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        .venv/bin/python -m tools.aot --model=smollm2-135m --topology=cpu:8

Prints per-device bytes (params, bank, optimizer, KV cache, temporaries)
against the chip's HBM and whether they fit, compile time, XLA's raw cost,
the analytic roofline step time and tokens/s, for the step with adapters and
the same step without, and the LoRA overhead; `--json` writes the same
report. `--mixed_ranks` adds the rank-skip estimate for a bank of mixed true
ranks. All logic lives in `mintjax.aot`.
"""

from __future__ import annotations

import argparse
import json
import sys

from mintjax import aot


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama-3.1-8b",
                 help="preset name or HF config.json path")
  p.add_argument("--topology", default="v5e:2x4")
  p.add_argument("--mesh", default="1,1,-1",
                 help="data,fsdp,tensor sizes (one may be -1)")
  p.add_argument("--step", default="decode", choices=aot.STEPS)
  p.add_argument("--slots", type=int, default=64)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--targets", default="q,k,v,o,gate,up,down")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--cache_len", type=int, default=2048)
  p.add_argument("--distinct", type=int, default=0)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--bank_dtype", default="")
  p.add_argument("--remat", default=True,
                 action=argparse.BooleanOptionalAction)
  p.add_argument("--lora_impl", default="auto",
                 help="'auto' = the target platform's kernel")
  p.add_argument("--rule_set", default="default",
                 help="named rule set: default or slot_sharded")
  p.add_argument("--rules", default="",
                 help="rule overrides, e.g. slot=tensor or slot=fsdp+tensor")
  p.add_argument("--hbm_gib", type=float, default=0.0)
  p.add_argument("--mixed_ranks", default="",
                 help="comma-separated true ranks of the resident adapters, "
                      "e.g. 1,2,4,8,16 (cycled over the slots)")
  p.add_argument("--json", default="", help="write the report here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    req = aot.AotRequest(
        model=args.model, topology=args.topology,
        mesh=aot.mesh_sizes(args.mesh), step=args.step, slots=args.slots,
        rank=args.rank, targets=tuple(args.targets.split(",")),
        batch=args.batch, seq_len=args.seq_len, cache_len=args.cache_len,
        distinct=args.distinct, dtype=args.dtype, bank_dtype=args.bank_dtype,
        remat=args.remat, lora_impl=args.lora_impl,
        rule_set=args.rule_set, rules=aot.parse_rules(args.rules),
        hbm_gib=args.hbm_gib)
    report = aot.compile_report(req)
    if args.mixed_ranks:
      report["mixed_ranks"] = aot.mixed_rank_saving(
          req, [int(r) for r in args.mixed_ranks.split(",")])
  except (aot.AotError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(aot.format_report(report))
  if "mixed_ranks" in report:
    print("  mixed ranks:", json.dumps(report["mixed_ranks"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
