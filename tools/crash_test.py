"""Crash, concurrency and gc harness for the adapter registry.

Owns the worker processes the store tests and this tool start, and the
checks run after every kill:

  * `writer`: publishes forever, mixing single `publish` calls and
    `publish_many` calls of 1 .. 2 * rows_per_shard + 3 items (so rows fill
    shards and spill into the next), into a tiny shape class, a big one
    (~230 KB rows, 16 per shard) and a shape class new to the trial (so
    kills land while an array is being created). Every revision's
    provenance names the seed its weights were generated from. An *ack*
    line goes to the ledger only after `publish`/`publish_many` returned.
  * `gc`: runs `Registry.gc()` in a loop beside the writers of every trial
    (killed with them), as if on another host, so whatever it reclaims is
    reused at once.
  * `reader`: loads acknowledged revisions in a loop and compares them
    bit-exact (the concurrent gc + publish + read scenario).
  * `tagger`: moves the tag 'prod' of the shared adapters to their latest
    revision in a loop; afterwards every tag's history must be one chain
    (each move's old revision is the previous move's new one: no lost
    update between concurrent movers).

After each kill (`check`): every acknowledged revision loads bit-exact;
every revision in the catalog, acknowledged or not, loads bit-exact against
the seed in its provenance (nothing half-written is visible); revision
numbers are 1..n per adapter; `verify` is clean. Each registry serves
`--trials_per_registry` trials; then leases expire, `gc` must leave no
reservation and no unreferenced shard file, and everything is checked again.

Kills are SIGKILL, at a random moment or the moment a shard write is in
flight (a `*.__lock` file exists; local stores only), 1-3 writers per trial.

Any registry location works (`--registry_template`, whose `{name}` is
replaced per registry): by default a local directory (SQLite + files);
e.g. a PostgreSQL catalog with weights on S3:

    .venv/bin/python -m tools.crash_test --trials=200
    .venv/bin/python -m tools.crash_test --mode=scenario --duration_s=20
    .venv/bin/python -m tools.crash_test --trials=20 --registry_template=\
      'postgresql://u@host/db?schema={name}&store=s3://bkt/{name}?endpoint=...'
    .venv/bin/python -m tools.crash_test --trials=20 --local_services=pg,s3
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from mintjax.adapters.spec import AdapterWeights
from mintjax.config import ModelConfig
from mintjax.store.errors import RegistryError, UnknownRefError
from mintjax.store.registry import Registry
from tools import local_services

CONFIG = ModelConfig("llama", vocab_size=300, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
# q + v at rank 16 on 4 layers of width 256: 229,376-byte rows, 16 per shard.
BIG = ModelConfig("llama", vocab_size=300, hidden_size=256,
                  intermediate_size=512, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64)
TARGETS = ("q", "v")
RANK = 2
BIG_RANK = 16
BIG_ROWS_PER_SHARD = 16
BASE = "sha256:crashtestbase"
LEASE_S = 2.0
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODE = flags.DEFINE_enum(
    "mode", "trials", ["trials", "scenario", "writer", "gc", "reader",
                       "tagger", "concurrent"], "what to run")
_PATH = flags.DEFINE_string("path", None,
                            "registry directory or URL (workers)")
_REGISTRY = flags.DEFINE_string(
    "registry_template", None, "registry location template for trials and "
    "scenario; '{name}' is replaced per registry (default: a local dir)")
_SERVICES = flags.DEFINE_list(
    "local_services", [], "start throwaway local servers and use them: "
    "'pg' (PostgreSQL catalog), 's3' (moto S3 store)")
_SEED = flags.DEFINE_integer("seed", 0, "first weights seed (workers)")
_WORKER = flags.DEFINE_integer("worker", 0, "worker index")
_TRIAL = flags.DEFINE_integer("trial", 0, "trial number (writer)")
_COUNT = flags.DEFINE_integer("count", 8, "revisions per worker (concurrent)")
_LEDGER = flags.DEFINE_string("ledger", None, "ack ledger file (writer)")
_OUT = flags.DEFINE_string("result_json", None,
                           "result JSON (reader, writer)")
_HOST = flags.DEFINE_string("host", "", "gc: run as if on this host")
_DURATION = flags.DEFINE_float("duration_s", 0.0,
                               "stop after this long (0: run until killed)")
_TRIALS = flags.DEFINE_integer("trials", 200, "SIGKILL trials to run")
_PER_REG = flags.DEFINE_integer("trials_per_registry", 10,
                                "trials sharing one registry")
_MAX_DELAY = flags.DEFINE_float("max_delay_s", 1.5,
                                "kill within this long after writers start")


# --- what the workers publish ------------------------------------------------


def weights_for(seed: int, kind: str = "tiny") -> AdapterWeights:
  """The adapter weights a worker publishes for `seed` (tiny or big)."""
  if kind == "big":
    return AdapterWeights.random(BIG, TARGETS, BIG_RANK, alpha=8.0,
                                 seed=seed)
  return AdapterWeights.random(CONFIG, TARGETS, RANK, alpha=4.0, seed=seed)


def _spec(kind: str) -> dict:
  return (dict(targets=TARGETS, rank=BIG_RANK, alpha=8.0) if kind == "big"
          else dict(targets=TARGETS, rank=RANK, alpha=4.0))


def create(reg: Registry, adapter_id: str, kind: str = "tiny",
           base: str = BASE) -> None:
  reg.create_adapter(adapter_id, spec=_spec(kind), base_fingerprint=base,
                     exist_ok=True)


def _open(path: str, lease_s: float | None = None) -> Registry:
  """Opens with a short lease (falls back for a registry API without one,
  so this harness also runs against older mintjax checkouts)."""
  if lease_s is None:
    return Registry.open(path)
  try:
    return Registry.open(path, lease_s=lease_s)
  except TypeError:
    return Registry.open(path)


def _targets(worker: int, trial: int) -> list[tuple[str, str, str]]:
  """(adapter id, kind, base) a writer publishes to."""
  return [("shared-tiny", "tiny", BASE), ("shared-big", "big", BASE),
          (f"own{worker}-tiny", "tiny", BASE),
          (f"own{worker}-big", "big", BASE),
          # A base new to the trial: its first publish creates an array.
          (f"t{trial}-new", "tiny", f"sha256:crash-trial-{trial}")]


def setup(path: str, trial: int, writers: int = 3) -> None:
  """Creates every adapter the writers of `trial` publish to. Their arrays
  are created by the first publish, which a kill may interrupt."""
  reg = _open(path)
  try:
    for w in range(writers):
      for aid, kind, base in _targets(w, trial):
        create(reg, aid, kind, base)
  finally:
    reg.close()


def writer(path: str, *, worker: int, trial: int, seed: int, ledger: str,
           duration_s: float = 0.0, out: str | None = None) -> None:
  """Publishes until killed (or `duration_s`); acks after each return."""
  reg = _open(path, LEASE_S)
  targets = _targets(worker, trial)  # Created by the parent (`setup`).
  rng = random.Random(seed)
  fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  stats = dict(calls=0, acked=0, refused={})
  start, i = time.time(), 0
  print("ready", flush=True)
  while not duration_s or time.time() - start < duration_s:
    kind = rng.choice(["tiny", "big"])
    pool = [t for t in targets if t[1] == kind]
    if rng.random() < 0.4:
      n = 1
    elif kind == "big":
      n = rng.randint(2, 2 * BIG_ROWS_PER_SHARD + 3)
    else:
      n = rng.randint(2, 40)
    items, seeds = [], []
    for _ in range(n):
      aid = rng.choice(pool)[0]
      s = seed * 1_000_000 + i
      i += 1
      items.append((aid, weights_for(s, kind), {"seed": s, "kind": kind}))
      seeds.append(s)
    try:
      revs = (reg.publish_many(items) if n > 1 or rng.random() < 0.5 else
              [reg.publish(*items[0])])
    except RegistryError as e:  # E.g. a lease that expired: nothing acked.
      name = type(e).__name__
      stats["refused"][name] = stats["refused"].get(name, 0) + 1
      continue
    stats["calls"] += 1
    stats["acked"] += len(revs)
    # One write of whole lines (O_APPEND): an ack is complete or absent.
    os.write(fd, "".join(json.dumps(dict(ref=r.ref, seed=s, kind=kind)) +
                         "\n" for r, s in zip(revs, seeds)).encode())
  os.close(fd)
  if out:
    with open(out, "w") as f:
      json.dump(stats, f)


def _pretend_host(name: str) -> None:
  """Makes this process report hostname `name`, as if it ran on another
  machine of a multi-host deployment (gc must be safe from any host)."""
  for mod in list(sys.modules.values()):
    if (getattr(mod, "__name__", "").startswith("mintjax.store") and
        hasattr(mod, "hostname")):
      setattr(mod, "hostname", lambda: name)


def gc_loop(path: str, duration_s: float = 0.0, host: str = "") -> None:
  """Collects garbage in a loop until killed (or `duration_s`)."""
  if host:
    _pretend_host(host)
  reg = _open(path)
  print("ready", flush=True)
  start = time.time()
  while not duration_s or time.time() - start < duration_s:
    reg.gc()
    time.sleep(0.05)


def tagger(path: str, duration_s: float, out: str, seed: int) -> None:
  """Moves 'prod' of the shared adapters to their latest revision."""
  reg = _open(path)
  rng = random.Random(seed)
  stats = dict(moves=0, not_yet=0)
  print("ready", flush=True)
  start = time.time()
  while time.time() - start < duration_s:
    aid = rng.choice(["shared-tiny", "shared-big"])
    try:
      reg.tag(aid, "prod", reason=f"tagger {seed}")
      stats["moves"] += 1
    except UnknownRefError:  # No revision published yet.
      stats["not_yet"] += 1
      time.sleep(0.02)
  with open(out, "w") as f:
    json.dump(stats, f)


def tag_chains_broken(reg: Registry) -> int:
  """Tags whose history is not one chain (a lost concurrent update)."""
  broken = 0
  for rec in reg.list_adapters():
    for tag in rec["tags"]:
      events = reg.tag_history(rec["id"], tag)
      prev = None
      for e in events:
        if e["old"] != prev:
          broken += 1
          break
        prev = e["new"]
      if prev != rec["tags"][tag]:
        broken += 1
  return broken


def read_ledger(ledger: str) -> dict[str, tuple[int, str]]:
  """Acknowledged refs -> (seed, kind). A torn last line is not an ack."""
  acks = {}
  try:
    with open(ledger) as f:
      for line in f:
        try:
          d = json.loads(line)
        except ValueError:
          continue
        acks[d["ref"]] = (d["seed"], d["kind"])
  except FileNotFoundError:
    pass
  return acks


def _same(w, want) -> bool:
  return all(np.array_equal(w.lora_a[t], want.lora_a[t]) and
             np.array_equal(w.lora_b[t], want.lora_b[t]) for t in TARGETS)


def reader(path: str, ledger: str, duration_s: float, out: str,
           seed: int) -> None:
  """Loads acknowledged revisions bit-exact in a loop; writes the tally."""
  reg = _open(path)
  rng = random.Random(seed)
  stats = dict(loads=0, wrong=0, errors={})
  print("ready", flush=True)
  start = time.time()
  while time.time() - start < duration_s:
    acks = list(read_ledger(ledger).items())
    if not acks:
      time.sleep(0.05)
      continue
    for ref, (s, kind) in rng.sample(acks, min(16, len(acks))):
      try:
        _, w = reg.load(ref)
      except Exception as e:  # pylint: disable=broad-except
        name = type(e).__name__
        stats["errors"][name] = stats["errors"].get(name, 0) + 1
        stats.setdefault("examples", []).append(f"{ref}: {e}"[:300])
        continue
      stats["loads"] += 1
      stats["wrong"] += not _same(w, weights_for(s, kind))
  with open(out, "w") as f:
    json.dump(stats, f)


# --- checks ------------------------------------------------------------------


def check(path: str, ledger: str) -> dict:
  """Every invariant of the store after a kill (see the module docstring).

  Returns:
    counts: acked, revisions, lost / unreadable / wrong acked revisions,
    bad (unacked revisions that do not read back as their seed), gaps
    (adapters whose numbering is not 1..n), verify_bad.
  """
  reg = _open(path)
  out = dict(acked=0, revisions=0, lost=0, unreadable=0, wrong=0, bad=0,
             gaps=0, verify_bad=0, examples=[])
  try:
    seen = {}
    for rec in reg.list_adapters():
      revs = reg.history(rec["id"])
      if [r.revision for r in revs] != list(range(1, len(revs) + 1)):
        out["gaps"] += 1
        out["examples"].append(f"{rec['id']}: numbering "
                               f"{[r.revision for r in revs][:20]}")
      for r in revs:
        seen[r.ref] = r
    out["revisions"] = len(seen)
    readable = {}
    refs = sorted(seen)
    for i in range(0, len(refs), 32):
      chunk = refs[i:i + 32]
      try:
        pairs = reg.load_many(chunk)
      except Exception:  # pylint: disable=broad-except
        pairs = []
        for ref in chunk:  # Find which ones.
          try:
            pairs.append(reg.load(ref))
          except Exception as e:  # pylint: disable=broad-except
            out["examples"].append(f"{ref}: {type(e).__name__}: "
                                   f"{str(e)[:160]}")
      for rev, w in pairs:
        prov = rev.provenance
        readable[rev.ref] = (prov.get("seed"), prov.get("kind", "tiny"),
                             _same(w, weights_for(prov.get("seed"),
                                                  prov.get("kind", "tiny"))))
    acks = read_ledger(ledger)
    out["acked"] = len(acks)
    for ref, (s, kind) in acks.items():
      if ref not in seen:
        out["lost"] += 1
        out["examples"].append(f"acked {ref} is not in the catalog")
      elif ref not in readable:
        out["unreadable"] += 1
      elif readable[ref] != (s, kind, True):
        out["wrong"] += 1
        out["examples"].append(f"acked {ref} reads {readable[ref]}, "
                               f"expected seed {s}")
    for ref in seen:
      if ref not in acks and (ref not in readable or
                              not readable[ref][2]):
        out["bad"] += 1
    report = reg.verify()
    out["verify_bad"] = len(report["bad"])
  finally:
    reg.close()
  out["examples"] = out["examples"][:5]
  return out


def final_gc_check(path: str) -> dict:
  """After leases expire: gc leaves no reservation and no orphan file."""
  time.sleep(LEASE_S + 0.2)
  reg = _open(path)
  try:
    result = reg.gc()
    left = len(reg.catalog.reservations()) if hasattr(
        reg.catalog, "reservations") else 0
    orphans = 0
    if hasattr(reg.store, "shard_files"):
      for key, _, _ in reg.catalog.arrays():
        usage = reg.catalog.shard_usage(key)
        orphans += len(reg.store.shard_files(key) - usage.referenced)
    return dict(reclaimed=result.get("reclaimed_reservations", 0),
                reservations_left=left, orphan_shards=orphans)
  finally:
    reg.close()


# --- trials ------------------------------------------------------------------


def _start(*commands: list[str]) -> list[subprocess.Popen]:
  """Starts workers together (imports overlap) and waits until each is
  ready."""
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tools.crash_test", *args], cwd=_REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in commands]
  for proc, args in zip(procs, commands):
    line = proc.stdout.readline()
    if line.strip() != "ready":
      for p in procs:
        p.kill()
      raise RuntimeError(f"worker {args} failed to start: {line}"
                         f"{proc.stderr.read()[-3000:]}")
  return procs


def _lock_files(path: str) -> bool:
  """Whether a tensorstore write is in flight (its lock file exists).
  Always False for a registry URL (object stores have no lock files)."""
  if "://" in path:
    return False
  return bool(glob.glob(os.path.join(path, "arrays", "*", "c", "*",
                                     "*.__lock")) or
              glob.glob(os.path.join(path, "arrays", "*", "*.__lock")))


def crash_trial(path: str, ledger: str, trial: int, rng: random.Random,
                max_delay_s: float = 1.5) -> dict:
  """Starts 1-3 writers and a gc loop, SIGKILLs them, checks the store.

  The first writer dies at a random moment or the moment a write is in
  flight (a lock file exists); the others and gc run on a little longer
  (reusing whatever gc reclaims), then die too.
  """
  n_writers = 1 + trial % 3
  setup(path, trial, n_writers)
  commands = [["--mode=writer", f"--path={path}", f"--worker={w}",
               f"--trial={trial}", f"--seed={trial * 10 + w + 1}",
               f"--ledger={ledger}"] for w in range(n_writers)]
  commands.append(["--mode=gc", f"--path={path}", "--host=gc-host"])
  procs = _start(*commands)
  deadline = time.time() + rng.uniform(0.05, max_delay_s)
  targeted = rng.random() < 0.5
  while time.time() < deadline:
    if targeted and _lock_files(path):
      break  # A shard (or array metadata) write is in flight: kill now.
    time.sleep(0.001 if targeted else 0.02)
  os.kill(procs[0].pid, signal.SIGKILL)
  time.sleep(rng.uniform(0.0, max_delay_s / 2))
  for p in rng.sample(procs[1:], len(procs) - 1):
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()
    p.stdout.close()
    p.stderr.close()
  result = check(path, ledger)
  result["kills"] = len(procs)
  return result


def run_trials(trials: int, per_registry: int, max_delay_s: float,
               seed: int = 0, log=print, registry: str | None = None
               ) -> dict:
  """Runs the SIGKILL trials; returns the tally (see `check`).

  `registry`: a location template ('{name}' replaced per registry, see
  the module docstring); None for a local directory per registry.
  """
  rng = random.Random(seed)
  tally = dict(trials=0, kills=0, max_writers=0, acked=0, revisions=0,
               lost=0, unreadable=0, wrong=0, bad=0, gaps=0, verify_bad=0,
               reservations_left=0, orphan_shards=0, reclaimed=0)
  work = tempfile.mkdtemp(prefix="mint_crash_")
  failures = ("lost", "unreadable", "wrong", "bad", "gaps", "verify_bad")
  try:
    for first in range(0, trials, per_registry):
      name = f"reg{first}_{os.getpid()}_{random.Random().randrange(1 << 30)}"
      path = (registry.replace("{name}", name) if registry else
              os.path.join(work, f"reg{first}"))
      ledger = os.path.join(work, f"ledger{first}.jsonl")
      # Checks are cumulative (every ack of the registry so far), so the
      # registry's count is the worst of its trials, not their sum.
      worst = dict.fromkeys(failures, 0)
      last = {}
      for trial in range(first, min(trials, first + per_registry)):
        last = crash_trial(path, ledger, trial, rng, max_delay_s)
        tally["trials"] += 1
        tally["kills"] += last["kills"]
        tally["max_writers"] = max(tally["max_writers"], 1 + trial % 3)
        for k in failures:
          worst[k] = max(worst[k], last[k])
        if any(last[k] for k in failures):
          log(f"trial {trial}: {last}")
      for k in failures:
        tally[k] += worst[k]
      tally["acked"] += last.get("acked", 0)
      tally["revisions"] += last.get("revisions", 0)
      fin = final_gc_check(path)
      for k in ("reservations_left", "orphan_shards", "reclaimed"):
        tally[k] += fin[k]
      if not registry:
        shutil.rmtree(path, ignore_errors=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return tally


def run_scenario(path: str, duration_s: float, writers: int = 3,
                 readers: int = 2, *, taggers: int = 0,
                 registry: str | None = None) -> dict:
  """Writers + a gc loop + readers (+ taggers) run together for
  `duration_s`. `path` is a work directory (ledger, results); the registry
  is `registry` (a location) or `path` itself."""
  work = path
  ledger = os.path.join(work, "ledger.jsonl")
  os.makedirs(work, exist_ok=True)
  path = registry or path
  setup(path, 0, writers)
  commands, outs = [], []
  for w in range(writers):
    outs.append(os.path.join(work, f"writer{w}.json"))
    commands.append(["--mode=writer", f"--path={path}", f"--worker={w}",
                     f"--seed={w + 1}", f"--ledger={ledger}",
                     f"--duration_s={duration_s}", f"--result_json={outs[-1]}"])
  commands.append(["--mode=gc", f"--path={path}", "--host=gc-host",
                   f"--duration_s={duration_s}"])
  for r in range(readers):
    outs.append(os.path.join(work, f"reader{r}.json"))
    commands.append(["--mode=reader", f"--path={path}", f"--ledger={ledger}",
                     f"--duration_s={duration_s}", f"--result_json={outs[-1]}",
                     f"--seed={r}"])
  for t in range(taggers):
    outs.append(os.path.join(work, f"tagger{t}.json"))
    commands.append(["--mode=tagger", f"--path={path}",
                     f"--duration_s={duration_s}", f"--result_json={outs[-1]}",
                     f"--seed={t}"])
  procs = _start(*commands)
  failures = []
  for p in procs:
    _, err = p.communicate(timeout=duration_s + 300)
    if p.returncode:  # The exception line of its traceback.
      failures.append((err.strip().splitlines() or ["?"])[-1][:300])
  stats = [json.load(open(o)) for o in outs if os.path.exists(o)]
  result = dict(
      worker_failures=failures,
      acked=sum(s.get("acked", 0) for s in stats),
      refused={k: sum(s.get("refused", {}).get(k, 0) for s in stats)
               for s0 in stats for k in s0.get("refused", {})},
      loads=sum(s.get("loads", 0) for s in stats),
      tag_moves=sum(s.get("moves", 0) for s in stats),
      read_wrong=sum(s.get("wrong", 0) for s in stats),
      read_errors={k: sum(s.get("errors", {}).get(k, 0) for s in stats)
                   for s0 in stats for k in s0.get("errors", {})})
  result["check"] = check(path, ledger)
  reg = _open(path)
  try:
    result["tag_chains_broken"] = tag_chains_broken(reg)
  finally:
    reg.close()
  result["final_gc"] = final_gc_check(path)
  return result


# --- the first version's workers (tests/test_store_crash.py uses them) --------


def concurrent(path: str, worker: int, count: int, seed: int) -> None:
  reg = Registry.open(path)
  for i in range(count):
    target = "shared" if i % 2 == 0 else f"own-{worker}"
    s = seed + worker * 1000 + i
    reg.publish(target, weights_for(s), {"seed": s, "steps": worker})


def run_concurrent(path: str, workers: int = 4, count: int = 8) -> None:
  """Runs `workers` concurrent publishers to completion."""
  reg = Registry.open(path)
  create(reg, "shared")
  for w in range(workers):
    create(reg, f"own-{w}")
  reg.close()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tools.crash_test", "--mode=concurrent",
       f"--path={path}", f"--worker={w}", f"--count={count}"], cwd=_REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for w in range(workers)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    if p.returncode:
      raise RuntimeError(f"concurrent worker failed: {err[-2000:]}")


TABLE_KEYS = ("trials", "kills", "max_writers", "acked", "revisions", "lost",
              "unreadable", "wrong", "bad", "gaps", "verify_bad",
              "reclaimed", "reservations_left", "orphan_shards")


def main(argv):
  del argv
  mode = _MODE.value
  if mode == "writer":
    writer(_PATH.value, worker=_WORKER.value, trial=_TRIAL.value,
           seed=_SEED.value, ledger=_LEDGER.value,
           duration_s=_DURATION.value, out=_OUT.value)
  elif mode == "gc":
    gc_loop(_PATH.value, _DURATION.value, _HOST.value)
  elif mode == "reader":
    reader(_PATH.value, _LEDGER.value, _DURATION.value, _OUT.value,
           _SEED.value)
  elif mode == "tagger":
    tagger(_PATH.value, _DURATION.value, _OUT.value, _SEED.value)
  elif mode == "concurrent":
    concurrent(_PATH.value, _WORKER.value, _COUNT.value, _SEED.value)
  elif mode == "scenario":
    path = tempfile.mkdtemp(prefix="mint_scenario_")
    try:
      with local_services.registry_template(_SERVICES.value,
                                          _REGISTRY.value) as registry:
        print(json.dumps(run_scenario(
            path, _DURATION.value or 20.0, taggers=2,
            registry=registry and registry.replace("{name}", "scenario")),
                         indent=1))
    finally:
      shutil.rmtree(path, ignore_errors=True)
  else:
    start = time.perf_counter()
    with local_services.registry_template(_SERVICES.value,
                                          _REGISTRY.value) as registry:
      tally = run_trials(_TRIALS.value, _PER_REG.value, _MAX_DELAY.value,
                         registry=registry)
    print("| " + " | ".join(TABLE_KEYS) + " | seconds |")
    print("|" + "---|" * (len(TABLE_KEYS) + 1))
    print("| " + " | ".join(str(tally[k]) for k in TABLE_KEYS) +
          f" | {time.perf_counter() - start:.0f} |")
    failed = any(tally[k] for k in ("lost", "unreadable", "wrong", "bad",
                                    "gaps", "verify_bad",
                                    "reservations_left", "orphan_shards"))
    return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
