"""Regenerate docs/SCALE_UP.md: every preset's train and decode step compiled
for a named TPU slice, the goals of issue 12, and the largest banks that fit.

    make tpu-venv     # once: .venv-tpu with libtpu (deviceless TPU compiles)
    .venv-tpu/bin/python -m tools.scale_up                       # everything
    .venv-tpu/bin/python -m tools.scale_up --only=llama-3.1-8b --no_search
    .venv-tpu/bin/python -m tools.scale_up --render_only         # from cache

Compile results are cached in docs/scale_up.json (keyed by the full
request), so a rerun compiles only what is missing and `--render_only`
rebuilds the markdown without compiling. Presets run in `--only` order (or
PLAN order); rows not run yet are listed in the document. The logic is in
`mintjax.scale_up`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys

import jax

from mintjax import scale_up


def _version(pkg: str) -> str:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="comma-separated presets")
  p.add_argument("--steps", default="train,decode")
  p.add_argument("--no_search", action="store_true",
                 help="skip the largest-bank search")
  p.add_argument("--no_goals", action="store_true")
  p.add_argument("--render_only", action="store_true",
                 help="rebuild the markdown from the cache, compile nothing")
  p.add_argument("--lora_impl", default="auto",
                 help="gather-LoRA implementation for every row ('auto': "
                      "the TPU kernel, XLA gather where it does not compile)")
  p.add_argument("--cache", default="docs/scale_up.json")
  p.add_argument("--rows", default="docs/scale_up_rows.json")
  p.add_argument("--out", default="docs/SCALE_UP.md")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  cache = scale_up.Cache(args.cache)
  saved = {"rows": {}, "goals": {}}
  if os.path.exists(args.rows):
    with open(args.rows) as f:
      saved = json.load(f)

  def save():
    with open(args.rows, "w") as f:
      json.dump(saved, f, indent=1, sort_keys=True)

  if not args.render_only:
    presets = [x for x in args.only.split(",") if x] or list(scale_up.PLAN)
    steps = [s for s in args.steps.split(",") if s]
    if not args.no_goals:
      for name, preset, workload, max_overhead in scale_up.GOALS:
        print(f"goal: {name}", flush=True)
        goal = (name, preset, dict(workload, lora_impl=args.lora_impl),
                max_overhead)
        saved["goals"][name] = scale_up.run_goal(cache, goal)
        save()
    for preset in presets:
      for step in steps:
        print(f"{preset} {step}", flush=True)
        workload = dict(scale_up.TRAIN if step == "train" else
                        scale_up.DECODE, lora_impl=args.lora_impl)
        saved["rows"][f"{preset} {step}"] = scale_up.run_row(
            cache, preset, step, search=not args.no_search,
            workload=workload)
        save()

  order = {(pr, st): i for i, (pr, st) in enumerate(
      (pr, st) for pr in scale_up.PLAN for st in ("train", "decode"))}
  for row in list(saved["rows"].values()) + list(saved["goals"].values()):
    scale_up.refresh_estimates(row)
  rows = sorted(saved["rows"].values(),
                key=lambda r: order.get((r["preset"], r["step"]), 1 << 30))
  goals = [saved["goals"][g[0]] for g in scale_up.GOALS
           if g[0] in saved["goals"]]
  meta = dict(
      command="python -m tools.scale_up " + " ".join(
          sys.argv[1:] if argv is None else argv),
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      host=f"{platform.machine()}, {os.cpu_count()} CPU cores",
      cache=args.cache, jax=jax.__version__, libtpu=_version("libtpu"))
  with open(args.out, "w") as f:
    f.write(scale_up.render_markdown(rows, goals, meta))
  print(f"wrote {args.out} ({len(rows)} rows, {len(goals)} goals)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
