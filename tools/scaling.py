"""The paper's three scaling axes, measured and plotted in one command.

    .venv/bin/python -m tools.scaling                 # everything (~40 min CPU)
    .venv/bin/python -m tools.scaling --only=out      # rerun one axis
    .venv/bin/python -m tools.scaling --quick --out_dir=/tmp/s   # tiny smoke

Scale Down  held-out exact match vs adapter bytes for LoRA rank 1..16 on q,v
            and on all seven projections (+ the VeRA variant), and the
            smallest adapter
            reaching 95% of rank-16's accuracy (`mintjax.apps.scaling.adapters`).
Scale Up    the same adapters on the pretrained SmolLM2-135M and on a
            randomly initialised twin: held-out accuracy and steps-to-accuracy.
Scale Out   decode tokens/s vs distinct adapters per batch, registry
            resolve/load latency vs catalog size, train tokens/s vs users per
            step (`mintjax.apps.scaling.out`).

Each axis writes `<out_dir>/<axis>.json` (numbers + machine, command, date)
and a PNG; `docs/SCALING.md` is rebuilt from every JSON present, so a
`--only` rerun keeps the other axes' last results. `--quick` runs the same
code on `random:tiny` with tiny sizes (used by tests/test_scaling.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import jax

from mintjax.adapters.spec import ALL_TARGETS
from mintjax.apps.scaling import adapters as sa
from mintjax.apps.scaling import out as so
from mintjax.apps.scaling import report as scaling_report
from mintjax.model.sources import load_base_source

AXES = ("down", "up", "out")
# Sized for a shared 2-core CPU (~30-40 min with other jobs running): the
# SmolLM2-135M train step costs ~1-2 s at 8 rows of 16 tokens there.
FULL = dict(
    base="smollm2", users=8, steps=30, batch_size=8, eval_every=10,
    # 5e-3 diverged for rank 16 (alpha = 2r) within 30 steps; 2e-3 did not.
    learning_rate=2e-3, ranks=(1, 2, 4, 8, 16),
    up_arms=("r1-qv", "r16-all7"),
    # VeRA trains vectors only and did not learn in 30 steps at 2e-2.
    vera_rank=256, vera_learning_rate=5e-2, decode_distinct=(1, 4, 16, 64),
    decode_batch=64, decode_new_tokens=8, decode_repeats=2,
    catalog_sizes=(10**3, 10**4, 10**5, 10**6), train_users=(1, 4, 16, 64),
    train_batch=64)
QUICK = dict(
    base="random:tiny", users=4, steps=4, batch_size=4, eval_every=2,
    learning_rate=1e-2, ranks=(2,), up_arms=("r2-qv",), vera_rank=8,
    vera_learning_rate=2e-2, decode_distinct=(1, 2, 4), decode_batch=4,
    decode_new_tokens=8, decode_repeats=2, catalog_sizes=(100, 1000),
    train_users=(1, 2, 4), train_batch=4)


def machine_info(command: str) -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return dict(nproc=os.cpu_count(), cpu=cpu, jax=jax.__version__,
              backend=jax.default_backend(), python=platform.python_version(),
              date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              command=command)


def arms_for(p: dict) -> list[sa.Arm]:
  arms = [sa.Arm(r, t) for t in (sa.QV, ALL_TARGETS) for r in p["ranks"]]
  arms.append(sa.Arm(p["vera_rank"], sa.QV, "vera", scale=1.0))
  return arms


def _log(msg: str) -> None:
  print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


def _train(base, arm, workload, p):
  t0 = time.perf_counter()
  r = sa.train_arm(base, arm, workload, steps=p["steps"],
                   batch_size=p["batch_size"], eval_every=p["eval_every"],
                   # A family may have its own rate ('vera_learning_rate').
                   learning_rate=p.get(f"{arm.variant}_learning_rate",
                                       p["learning_rate"]))
  _log(f"{arm.name}: held-out EM {r['heldout_em']:.3f}, train EM "
       f"{r['train_em']:.3f} ({time.perf_counter() - t0:.0f} s)")
  return r


def run_down(base, workload, p) -> dict:
  rows = [_train(base, arm, workload, p) for arm in arms_for(p)]
  ref = next(r for r in rows if r["arm"] == f"r{max(p['ranks'])}-all7")
  best = sa.smallest_reaching(rows, ref, 0.95)
  return dict(rows=rows, reference=ref["arm"],
              smallest_95=best["arm"] if best else None,
              vera="done" if any(r["variant"] == "vera" for r in rows)
              else "pending")


def run_up(base, workload, p, down: dict | None) -> dict:
  arms = {a.name: a for a in arms_for(p)}
  twin = sa.random_twin(base)
  rows = []
  for name in p["up_arms"]:
    pre = next((r for r in (down or {}).get("rows", []) if r["arm"] == name),
               None)
    if pre is None:
      pre = _train(base, arms[name], workload, p)
    rnd = _train(twin, arms[name], workload, p)
    for label, r in (("pretrained", pre), ("random", rnd)):
      rows.append(dict(
          r, base=label,
          # Undefined when the pretrained arm itself learned nothing.
          steps_to_half_pretrained_heldout=sa.steps_to(
              r["curve"], "heldout_em", 0.5 * pre["heldout_em"])
          if pre["heldout_em"] > 0 else None,
          steps_to_train_em_50=sa.steps_to(r["curve"], "train_em", 0.5)))
  return dict(rows=rows, twin_fingerprint=twin.fingerprint,
              base_fingerprint=base.fingerprint)


def run_out(base, p, workdir) -> dict:
  _log("decode vs distinct adapters")
  decode = so.decode_vs_distinct(base, p["decode_distinct"],
                                 batch=p["decode_batch"],
                                 new_tokens=p["decode_new_tokens"],
                                 repeats=p["decode_repeats"])
  _log("registry vs catalog size")
  root = tempfile.mkdtemp(prefix="scaling_registry_", dir=workdir)
  try:
    registry = so.registry_vs_catalog(root, p["catalog_sizes"])
  finally:
    shutil.rmtree(root, ignore_errors=True)
  _log("train throughput vs users per step")
  train = so.train_vs_users(base, p["train_users"], batch=p["train_batch"],
                            repeats=2)
  return dict(decode=decode, registry=registry, train=train)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="random:tiny base, tiny sizes (a smoke test)")
  ap.add_argument("--only", default="down,up,out",
                  help="comma list of axes to (re)run: down, up, out")
  ap.add_argument("--out_dir", default=None,
                  help="JSON + PNG folder (default docs/scaling; --quick "
                  "needs an explicit folder so it never overwrites docs)")
  ap.add_argument("--doc", default=None,
                  help="markdown report (default <out_dir>/../SCALING.md)")
  ap.add_argument("--learning_rate", type=float, default=None,
                  help="override the LoRA arms' learning rate")
  ap.add_argument("--report", action="store_true",
                  help="only rebuild the plots and markdown from the JSON")
  args = ap.parse_args(argv)
  only = [a.strip() for a in args.only.split(",") if a.strip()]
  bad = [a for a in only if a not in AXES]
  if bad or not only:
    ap.error(f"--only takes a comma list of {AXES}, got {args.only!r}")
  if args.quick and args.out_dir is None:
    ap.error("--quick needs --out_dir (the committed docs/scaling holds the "
             "full run's numbers)")
  out_dir = args.out_dir or os.path.join("docs", "scaling")
  doc = args.doc or os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                                 "SCALING.md")
  os.makedirs(out_dir, exist_ok=True)
  if args.report:
    scaling_report.write_all(out_dir, doc)
    return {}
  p = dict(QUICK if args.quick else FULL)
  if args.learning_rate is not None:
    p["learning_rate"] = args.learning_rate
  command = "python -m tools.scaling " + " ".join(
      sys.argv[1:] if argv is None else argv)
  info = machine_info(command.strip())
  _log(f"loading base {p['base']}")
  base = load_base_source(p["base"])
  workload = (sa.make_workload(base.tokenizer, p["users"])
              if {"down", "up"} & set(only) else None)
  results = {}
  for axis in AXES:
    if axis not in only:
      continue
    t0 = time.perf_counter()
    if axis == "down":
      data = run_down(base, workload, p)
    elif axis == "up":
      prior = results.get("down") or scaling_report.read_json(out_dir, "down")
      data = run_up(base, workload, p, prior if prior and prior.get(
          "params") == _train_params(p) else None)
    else:
      data = run_out(base, p, out_dir)
    data.update(machine=info, params=_train_params(p) if axis != "out" else p,
                wall_s=time.perf_counter() - t0, base=p["base"],
                base_fingerprint=base.fingerprint)
    results[axis] = data
    scaling_report.write_json(out_dir, axis, data)
    _log(f"{axis} done in {data['wall_s']:.0f} s")
  scaling_report.write_all(out_dir, doc)
  return results


def _train_params(p: dict) -> dict:
  keys = ("base", "users", "steps", "batch_size", "eval_every",
          "learning_rate", "vera_learning_rate")
  return {k: p[k] for k in keys}


if __name__ == "__main__":
  main()
