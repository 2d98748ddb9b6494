"""The scale-up plan: every preset's train and decode step compiled for a TPU.

Owns `PLAN` (preset -> named topology and mesh), the reference workloads,
`run_row` (compile one preset x step, escalating the sharding rules when
the compiler runs out of HBM, falling back from the Pallas kernel to the
XLA gather when the kernel does not compile, and searching the largest bank
that fits), the JSON cache of compile results (a rerun compiles only what
is missing) and `render_markdown` (docs/SCALE_UP.md). `tools/scale_up.py`
is the CLI; every number comes from `mintjax.aot.compile_step`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Mapping

from mintjax import aot
from mintjax.aot import moe_plan

# preset -> (topology, (data, fsdp, tensor)). Topology names count chips
# (v5p-32 is 16 chips: Google names v5p slices by TensorCores, two a chip).
PLAN: dict[str, tuple[str, tuple[int, int, int]]] = {
    "smollm2-135m": ("v5e:2x2", (1, 1, 4)),
    "smollm2-360m": ("v5e:2x2", (1, 1, 4)),
    "qwen2.5-0.5b": ("v5e:2x2", (1, 1, 4)),
    "llama-3.2-1b": ("v5e:2x2", (1, 1, 4)),
    "qwen2.5-1.5b": ("v5e:2x2", (1, 1, 4)),
    "smollm2-1.7b": ("v5e:2x2", (1, 1, 4)),
    "llama-3.2-3b": ("v5e:2x2", (1, 1, 4)),
    "llama-3.1-8b": ("v5e:2x4", (1, 1, 8)),
    "mistral-7b": ("v5e:2x4", (1, 1, 8)),
    "qwen2.5-7b": ("v5e:2x4", (1, 1, 8)),
    "llama-3.1-70b": ("v5p:2x2x4", (1, 2, 8)),
    "qwen2.5-72b": ("v5p:2x2x4", (1, 2, 8)),
    "llama-3.1-405b": ("v5p:4x4x4", (1, 8, 8)),
}
TOPOLOGY_NAMES = {"v5e:2x2": "v5e-4", "v5e:2x4": "v5e-8",
                  "v5p:2x2x4": "v5p-32 (16 chips)",
                  "v5p:4x4x4": "v5p-128 (64 chips)"}

# Reference workloads (rank 16 on all seven projections).
TRAIN = dict(step="train", slots=64, batch=16, seq_len=256, remat=True)
DECODE = dict(step="decode", slots=1024, batch=64, cache_len=2048,
              distinct=64)
RULE_ESCALATION = ("default", "slot_sharded")


def request(preset: str, workload: Mapping, **changes) -> aot.AotRequest:
  topology, mesh = PLAN[preset]
  kw = dict(model=preset, topology=topology, mesh=mesh, rank=16,
            lora_impl="auto")
  kw.update(workload)
  kw.update(changes)
  return aot.AotRequest(**kw)


class Cache:
  """compile_step results keyed by request; saved after every compile."""

  def __init__(self, path: str):
    self.path = path
    self.data: dict = {}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)
    # Compiler errors other than running out of HBM come from code (a kernel
    # that does not lower yet), which changes between runs: retry them.
    self.data = {k: v for k, v in self.data.items()
                 if "error" not in v or v.get("oom")}

  @staticmethod
  def key(req: aot.AotRequest, with_adapters: bool) -> str:
    d = aot._request_dict(req)  # pylint: disable=protected-access
    d["with_adapters"] = with_adapters
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def get(self, req, with_adapters=True):
    hit = self.data.get(self.key(req, with_adapters))
    # The cost model is analytic: re-derive it so a cached compile follows
    # the current `aot.add_estimates`.
    return None if hit is None else aot.add_estimates(req, hit)

  def compile(self, req: aot.AotRequest, with_adapters: bool = True,
              log: Callable[[str], None] = print) -> dict:
    hit = self.get(req, with_adapters)
    if hit is not None:
      return hit
    t0 = time.time()
    result = aot.compile_step(req, with_adapters=with_adapters)
    result["request"] = aot._request_dict(req)  # pylint: disable=protected-access
    log(f"  compiled {req.model} {req.step} slots={req.slots} "
        f"targets={','.join(req.targets)} rules={req.rule_set} "
        f"impl={result['lora_impl']} adapters={with_adapters}: "
        f"{'fits' if result.get('fits') else 'no fit'} "
        f"({time.time() - t0:.0f} s)")
    self.data[self.key(req, with_adapters)] = result
    self.save()
    return result

  def save(self):
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


def _is_kernel_failure(result: Mapping) -> bool:
  return "error" in result and not result.get("oom")


def fit(cache: Cache, req: aot.AotRequest, log=print,
        best_of_rules: bool = False):
  """Compiles `req`, escalating rules on OOM and falling back from the kernel.

  With `best_of_rules`, every rule set is compiled and the fitting one with
  the lowest estimated step time is kept (a replicated bank that fits still
  costs every chip a read of each gathered adapter).

  Returns:
    (request that was used, its result, notes: list of what was changed).
  """
  notes, fitting = [], []
  r, result = req, {}
  for rule_set in RULE_ESCALATION:
    r = req.replace(rule_set=rule_set)
    result = cache.compile(r, log=log)
    if _is_kernel_failure(result) and r.lora_impl == "auto":
      note = (f"kernel `{result['lora_impl']}` did not compile: "
              f"{result['error'][:160]}")
      if note not in notes:
        notes.append(note)
      r = r.replace(lora_impl="gather")
      result = cache.compile(r, log=log)
    if result.get("fits"):
      fitting.append((r, result))
      if not best_of_rules:
        break
    elif "error" in result and not result.get("oom"):
      return r, result, notes
  if not fitting and req.lora_impl == "auto" and result.get("oom"):
    # The kernel's shard_map keeps every slot on every shard, so a bank
    # that fits sharded can still run out of HBM on the kernel path.
    r2, result2, notes2 = fit(cache, req.replace(lora_impl="gather"),
                              log=log, best_of_rules=best_of_rules)
    if result2.get("fits"):
      return r2, result2, notes + notes2 + [
          f"kernel path out of HBM with every rule set "
          f"({result['error'][:120]}); XLA `gather` fits"]
  if not fitting:
    return r, result, notes
  r, result = min(fitting, key=lambda rr: rr[1]["est_step_s"])
  if r.rule_set != "default":
    default = [x for rr, x in fitting if rr.rule_set == "default"]
    notes.append(
        f"rules `{r.rule_set}`: " + (
            "default rules run out of HBM" if not default else
            f"default rules fit ({default[0]['total_per_device'] / 1e9:.1f}"
            f" GB/device) but est. {default[0]['est_step_s'] * 1e3:.1f} ms "
            f"vs {result['est_step_s'] * 1e3:.1f} ms"))
  return r, result, notes


def largest_bank(cache: Cache, req: aot.AotRequest, fitted: Mapping | None,
                 log=print, max_tries: int = 3) -> dict:
  """The largest slot count (rank and targets of `req`) that compiles.

  Predicts it from the fitted compile's resident bytes (bank, optimizer
  state and, for training, a bank-sized f32 gradient grow linearly with
  slots; the rest is held fixed), rounds down to a multiple of the slot
  sharding, and verifies by compiling; on failure it retries 15% lower.
  """
  req = req.replace(rule_set="slot_sharded")
  base = fitted if fitted and fitted.get("fits") else cache.compile(
      req.replace(slots=64), log=log)
  if not base.get("fits"):
    return dict(slots=None, note="64 slots do not fit")
  res = base["resident_bytes"]
  slots0 = base["request"]["slots"]
  per_slot = (res.get("bank", 0) + res.get("optimizer", 0)) / slots0
  if req.step == "train":
    per_slot *= 4 / 3  # the f32 gradient of the bank is a temporary
  spare = base["hbm"] * 0.92 - base["total_per_device"]
  shards = max(1, base["mesh"]["fsdp"] * base["mesh"]["tensor"])
  guess = slots0 + spare / max(per_slot, 1.0)
  guess = int(guess // shards * shards)
  best = dict(slots=slots0, verified=True)
  for _ in range(max_tries):
    if guess <= slots0:
      break
    result = cache.compile(req.replace(slots=guess), log=log)
    if result.get("fits"):
      best = dict(slots=guess, verified=True,
                  gb_per_device=result["total_per_device"] / 1e9)
      break
    guess = int(guess * 0.85 // shards * shards)
  return best


def run_row(cache: Cache, preset: str, step: str, log=print,
            search: bool = True, workload: Mapping | None = None,
            best_of_rules: bool = False) -> dict:
  """One preset x step: fit (rules, kernel fallback), base, largest bank."""
  if workload is None:
    workload = TRAIN if step == "train" else DECODE
  req = request(preset, workload)
  used, lora, notes = fit(cache, req, log=log, best_of_rules=best_of_rules)
  # The base-only step does not depend on the bank's shape (train: one
  # rank-1 q adapter; serve: no bank), so one compile serves every row.
  base = cache.compile(used.replace(
      lora_impl="gather", slots=2, rank=1, targets=("q",), distinct=0,
      rule_set="default"), with_adapters=False, log=log)
  row = dict(preset=preset, step=step, request=aot._request_dict(used),  # pylint: disable=protected-access
             lora=lora, base=base, notes=notes)
  if "est_step_s" in lora and "est_step_s" in base:
    row["overhead"] = lora["est_step_s"] / base["est_step_s"] - 1
  if search:
    row["largest"] = largest_bank(cache, used, lora if lora.get("fits")
                                  else None, log=log)
  return row


# --- markdown -------------------------------------------------------------------

def _gb(x) -> str:
  return "—" if x is None else f"{x / 1e9:.2f}"


def _ms(x) -> str:
  return "—" if x is None else f"{x * 1e3:.1f}"


def refresh_estimates(row: dict) -> dict:
  """Re-derives a saved row's analytic estimates and overhead (cost model
  changes do not need a recompile)."""
  for key in ("lora", "base"):
    if "request" in row.get(key, {}):
      aot.add_estimates(aot.request_from_dict(row[key]["request"]), row[key])
  if "est_step_s" in row["lora"] and "est_step_s" in row["base"]:
    row["overhead"] = row["lora"]["est_step_s"] / row["base"][
        "est_step_s"] - 1
  return row


def render_table(rows) -> list[str]:
  out = ["| preset | step | topology | mesh (d,f,t) | impl | rules | "
         "GB/device (params+bank+opt+KV+temp) | fits | est. ms/step | "
         "tokens/s | LoRA overhead | largest bank (slots × r16) | "
         "compile s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    lo, r = row["lora"], row["request"]
    mesh = lo.get("mesh", {})
    mesh_s = f"{mesh.get('data')},{mesh.get('fsdp')},{mesh.get('tensor')}"
    topo = f"{r['topology']} ({TOPOLOGY_NAMES.get(r['topology'], '')})"
    if "error" in lo:
      reason = "out of HBM" if lo.get("oom") else "compile error"
      out.append(f"| {row['preset']} | {row['step']} | {topo} | {mesh_s} | "
                 f"{lo.get('lora_impl')} | {r['rule_set']} | — | no "
                 f"({reason}) | — | — | — | "
                 f"{_largest(row)} | {lo.get('compile_s')} |")
      continue
    res = lo["resident_bytes"]
    parts = "+".join(f"{res.get(k, 0) / 1e9:.1f}" for k in (
        "params", "bank", "optimizer", "kv_cache", "temporaries"))
    over = row.get("overhead")
    out.append(
        f"| {row['preset']} | {row['step']} | {topo} | {mesh_s} | "
        f"{lo['lora_impl']} | {r['rule_set']} | "
        f"{_gb(lo['total_per_device'])} ({parts}) | "
        f"{'yes' if lo['fits'] else 'no'} | {_ms(lo['est_step_s'])} | "
        f"{lo['tokens_per_s']:,.0f} | "
        f"{'—' if over is None else f'{over * 100:.1f}%'} | "
        f"{_largest(row)} | {lo['compile_s']} |")
  return out


def predict_largest(row) -> int | None:
  """Slots × rank 16 predicted to fit with the `slot_sharded` rules.

  Fixed per-chip bytes: params and KV cache as compiled, plus the base-only
  step's temporaries; per slot: the factors (train: f32 factors, gradient and
  two Adam moments, 16 bytes a number; serve: the bank dtype), split over
  the fsdp x tensor chips. Not verified by a compile.
  """
  lo, base = row["lora"], row["base"]
  if "total_per_device" not in base:  # the base step itself did not fit
    return None
  req = aot.request_from_dict(row["request"])
  spec = req.spec()
  per_number = 16 if req.step == "train" else (
      2 if spec.dtype == "bfloat16" else 4)
  per_slot = spec.params_per_adapter(req.model_config()) * per_number
  shards = base["mesh"]["fsdp"] * base["mesh"]["tensor"]
  res = base["resident_bytes"]
  fixed = (res.get("params", 0) + res.get("kv_cache", 0) +
           res.get("temporaries", 0))
  spare = base["hbm"] * 0.92 - fixed
  del lo
  return max(0, int(spare * shards / per_slot)) if spare > 0 else 0


def _largest(row) -> str:
  big = row.get("largest")
  if not big:
    guess = predict_largest(row)
    return "—" if guess is None else f"~{guess:,} (predicted)"
  if big.get("slots") is None:
    return big.get("note", "—")
  return f"≥ {big['slots']:,}" if big.get("verified") else "—"


# Issue 12's goals: (name, preset, workload changes, max overhead or None).
GOALS = (
    ("Llama-3.1-8B train, 1,024 slots, all seven targets", "llama-3.1-8b",
     dict(TRAIN, slots=1024), 0.15),
    ("Llama-3.1-8B train, 1,024 slots, q,v", "llama-3.1-8b",
     dict(TRAIN, slots=1024, targets=("q", "v")), 0.15),
    ("Llama-3.1-8B train, 1,024 slots, q", "llama-3.1-8b",
     dict(TRAIN, slots=1024, targets=("q",)), 0.15),
    ("Llama-3.1-8B decode, 1,024 resident / 64 distinct, all seven",
     "llama-3.1-8b", dict(DECODE), 0.10),
    ("Llama-3.1-8B decode, 1,024 resident / 64 distinct, q,k,v,o",
     "llama-3.1-8b", dict(DECODE, targets=("q", "k", "v", "o")), 0.10),
    ("Llama-3.1-8B decode, 1,024 resident / 64 distinct, q,v",
     "llama-3.1-8b", dict(DECODE, targets=("q", "v")), 0.10),
)


def run_goal(cache: Cache, goal, log=print) -> dict:
  name, preset, workload, max_overhead = goal
  row = run_row(cache, preset, workload["step"], log=log, search=False,
                workload=workload, best_of_rules=True)
  row.update(goal=name, max_overhead=max_overhead)
  return row


def render_goals(rows) -> list[str]:
  out = ["| goal | fits | GB/device | rules | est. overhead | target | met |",
         "|---|---|---|---|---|---|---|"]
  for row in rows:
    lo = row["lora"]
    over = row.get("overhead")
    fits = bool(lo.get("fits"))
    met = fits and over is not None and over <= row["max_overhead"]
    gb = (_gb(lo["total_per_device"]) if "total_per_device" in lo else
          "out of HBM" if lo.get("oom") else "error")
    out.append(f"| {row['goal']} | {'yes' if fits else 'no'} | {gb} | "
               f"{row['request']['rule_set']} | {percent(over)} | "
               f"≤ {row['max_overhead'] * 100:.0f}% | "
               f"{'yes' if met else 'no'} |")
  return out


def not_run(done: set) -> list[str]:
  return [f"{p} {s}" for p in PLAN for s in ("train", "decode")
          if (p, s) not in done]


def percent(x) -> str:
  return "—" if x is None else f"{x * 100:.1f}%"


def adapter_arithmetic(preset: str, targets, slots: int = 1024,
                       rank: int = 16) -> dict:
  """Bytes a bank of `slots` rank-`rank` adapters needs, before compiling."""
  req = request(preset, dict(DECODE, slots=slots, targets=tuple(targets),
                            rank=rank))
  cfg, spec = req.model_config(), req.spec()
  per = spec.params_per_adapter(cfg)
  return dict(params_per_adapter=per, bank_bf16=per * slots * 2,
              train_f32_adam=per * slots * 4 * 4,  # bank, grad, mu, nu
              base_bf16=cfg.num_params() * 2)


def render_markdown(rows, goal_rows, meta: Mapping) -> str:
  """docs/SCALE_UP.md from the sweep's rows (see tools/scale_up.py)."""
  chips = "\n".join(
      f"| {c.name} | {c.hbm_bytes / aot.GIB:.0f} GiB"
      f"{' (80 GB)' if k == 'h100' else ' (141 GB)' if k == 'h200' else ''}"
      f" | {c.bf16_flops / 1e12:.0f} | {c.hbm_bandwidth / 1e9:,.0f} | "
      f"{c.source} |" for k, c in aot.CHIPS.items() if k != "cpu")
  a7 = adapter_arithmetic("llama-3.1-8b", aot.ALL_TARGETS)
  aqv = adapter_arithmetic("llama-3.1-8b", ("q", "v"))
  aq = adapter_arithmetic("llama-3.1-8b", ("q",))
  aqkvo = adapter_arithmetic("llama-3.1-8b", ("q", "k", "v", "o"))
  c8 = aot.presets.get_config("llama-3.1-8b")
  kv = 2 * c8.num_layers * 64 * 2048 * c8.kv_dim * 2
  done = {(r["preset"], r["step"]) for r in rows}
  missing = not_run(done)
  lines = [
      "# Scale-up plan: every preset compiled for a TPU slice",
      "",
      "Generated by `" + meta["command"] + "` on " + meta["date"] +
      f" ({meta['host']}); compile results are cached in "
      f"`{meta['cache']}`, so a rerun compiles only what is missing. "
      "Do not edit by hand.",
      "",
      "Every number below comes from a **deviceless TPU compile** (libtpu "
      f"{meta.get('libtpu', '?')}, jax {meta.get('jax', '?')}) of the same "
      "step functions `launch/train.py` (`make_train_step`) and `Engine` "
      "(`make_step_fns`) run, over abstract parameters, bank, optimizer "
      "state and KV cache (`mintjax.aot`). **No TPU or GPU was lent to this "
      "task** (the device tool reports it as not drawn), so there are no "
      "measured device numbers yet: `tools/device_check.sh` is the place to "
      "add them next to these estimates when a device is available.",
      "",
      "## How to read it",
      "",
      "- GB/device: XLA's memory analysis of the compiled step per chip "
      "(arguments + outputs − donated aliases + temporaries); the split in "
      "brackets is params + bank + optimizer state + KV cache + XLA "
      "temporaries. *fits* means the TPU compiler accepted the program "
      "(it refuses with `CompileTimeHbmOom` otherwise) and the total is "
      "within the chip's HBM.",
      "- est. ms/step: roofline, max(FLOPs / peak bf16, HBM bytes / "
      "bandwidth) per chip, from an analytic count (`mintjax.aot.step_cost`)"
      ": XLA's `cost_analysis()` counts the layer `scan` body once, so its "
      "raw FLOPs (kept in the JSON as `xla_flops_raw`) are ~1/L of the "
      "step's. Train = forward + remat recompute + backward data gradients "
      "(the base gets no weight gradient) + LoRA dA/dB + AdamW's "
      "read-modify-write of the slots it updates (every slot, or only the "
      "batch's when the optimizer takes its present-slot path, plus one "
      "read of the whole gradient); decode = one token per row with "
      "attention over the whole cache, weights + KV cache + the distinct "
      "adapters' rows read once. Activation traffic and collectives are "
      "not counted, so these are lower bounds on step time.",
      "- LoRA overhead: est. step time with the bank / the same step "
      "without it − 1 (train: the base-only step is the same step with "
      "one rank-1 adapter on q, the least a trainable step carries).",
      "- largest bank: slots × rank 16 on the row's targets with the "
      "`slot_sharded` rules. `≥ N`: verified by compiling N slots; "
      "`~N (predicted)`: from the compiled base step's fixed bytes plus the "
      "bank's analytic bytes per slot (`mintjax.scale_up.predict_largest`),"
      " not compiled (the search is `tools.scale_up` without "
      "`--no_search`).",
      "- impl: `pallas_sgmv` is the TPU kernel; `gather` means the kernel "
      "did not compile for that mesh and the XLA gather formulation was "
      "compiled instead (the note says why).",
      "",
      "Workloads: train = " + f"{TRAIN['batch']} rows × {TRAIN['seq_len']} "
      f"tokens, {TRAIN['slots']} slots, f32 bank + per-slot AdamW, remat; "
      f"decode = {DECODE['batch']} rows, cache {DECODE['cache_len']}, "
      f"{DECODE['slots']:,} resident slots, {DECODE['distinct']} distinct "
      "per batch, bf16 bank. Rank 16 on all seven projections unless a "
      "row says otherwise.",
      "",
      "## Chips",
      "",
      "| chip | HBM | peak bf16 TFLOP/s | HBM GB/s | source |",
      "|---|---|---|---|---|",
      chips,
      "",
      "## Goals (issue 12)",
      "",
  ]
  lines += render_goals(goal_rows) if goal_rows else ["Not run yet."]
  lines += [
      "",
      "Why the all-seven-target goals cannot be met, by arithmetic (no "
      "compile needed): one rank-16 Llama-3.1-8B adapter on all seven "
      f"projections is {a7['params_per_adapter'] / 1e6:.1f} M parameters, "
      f"so 1,024 of them are {a7['bank_bf16'] / 1e9:.0f} GB in bf16 and "
      f"{a7['train_f32_adam'] / 1e9:.0f} GB to train (f32 factors, "
      "gradient and two Adam moments), against 8 × 16 GiB = 137 GB on a "
      "v5e-8: training them cannot fit whatever the sharding. On q,v the "
      f"same bank is {aqv['train_f32_adam'] / 1e9:.0f} GB to train, on q "
      f"alone {aq['train_f32_adam'] / 1e9:.0f} GB. For decode, 64 distinct "
      "all-seven adapters are "
      f"{64 * a7['params_per_adapter'] * 2 / 1e9:.1f} GB read per step "
      f"next to {a7['base_bf16'] / 1e9:.1f} GB of weights and "
      f"{kv / 1e9:.1f} GB of KV cache (64 × 2,048 tokens), so a "
      "memory-bound decode step cannot be less than "
      f"{64 * a7['params_per_adapter'] * 2 / (a7['base_bf16'] + kv):.0%} "
      "slower with them; on q,k,v,o the floor is "
      f"{64 * aqkvo['params_per_adapter'] * 2 / (a7['base_bf16'] + kv):.0%}"
      ", on q,v "
      f"{64 * aqv['params_per_adapter'] * 2 / (a7['base_bf16'] + kv):.0%}."
      " Training pays a different cost: a per-slot AdamW that sweeps "
      "every slot with `jnp.where` (to keep untouched slots bit-identical) "
      "reads and writes every slot's factors and moments each step, so its "
      "traffic grows with the bank, not the batch. "
      "`mintjax/train/optimizer.py` now updates only the ≤ 16 slots present "
      "in a batch (gather, update, scatter; `slot_sweep='auto'` picks it "
      "when the batch's rows are fewer than half the slots) and reads the "
      "whole gradient once for the per-slot norms; the estimates count "
      "that.",
      "",
      "## Every preset",
      "",
  ]
  lines += render_table(rows) if rows else ["Not run yet."]
  notes = [(f"{r['preset']} {r['step']}", n) for r in rows
           for n in r["notes"]]
  notes += [(r["goal"], n) for r in goal_rows for n in r["notes"]]
  kernel = sorted({n for _, n in notes if n.startswith("kernel")})
  lines += ["", "## Sharding-rule changes and fallbacks per row", ""]
  if kernel:
    lines += [f"- TPU kernel: {n} (rows that hit it: "
              f"{sum(1 for _, m in notes if m == n)}; they were compiled "
              "with the XLA `gather` formulation instead)." for n in kernel]
  rule_notes = [(w, n) for w, n in notes if not n.startswith("kernel")]
  lines += [f"- {w}: {n}" for w, n in rule_notes]
  if not rule_notes:
    lines += ["- no row needed a rule change."]
  lines += [
      "", "## The kernel path and sharded banks", "",
      "The impl column says which gather-LoRA implementation each row was "
      "compiled with: `pallas_sgmv` where the TPU kernel compiled, the XLA "
      "`gather` formulation where it did not when the row ran (the kernel's "
      "multi-chip `shard_map` landed during this sweep; rows compiled "
      "before it used `gather`, and the goal rows were compiled with "
      "`--lora_impl=gather` on purpose so their rule sets compare like for "
      "like). The kernel's `shard_map` (`lora_op`) splits tokens over the "
      "batch axes and the factors' d_in/d_out like the activations, but "
      "keeps every slot on every shard: with the `slot_sharded` rules XLA "
      "all-gathers each layer's slots before the kernel runs (1,024 "
      "all-seven Llama-3.1-8B slots: 2.7 GB per layer per step over ICI, "
      "not counted in the estimates). Large banks on the kernel path want "
      "a slot-parallel dispatch (route each token to the shard that owns "
      "its slot and back, as expert-parallel MoE layers do)."]
  mixed = aot.mixed_rank_saving(request("llama-3.1-8b", DECODE),
                                [1, 2, 4, 8, 16])
  lines += [
      "", "## Mixed ranks", "",
      "A bank whose adapters cycle through true ranks 1, 2, 4, 8, 16 "
      f"(mean {mixed['mean_rank']:.1f} of max 16) lets the SGMV kernel skip "
      f"{mixed['lora_flops_saving']:.0%} of the LoRA FLOPs, provided the "
      "per-slot rank reaches it (`LayerBank.rank`). In this checkout it "
      + ("does" if mixed["rank_reaches_kernel"] else
         "does not yet (the rank plumbing is another engineer's open item), "
         "so the compiled steps above still pay for max rank") +
      ". `python -m tools.aot --mixed_ranks=1,2,4,8,16` reports the same "
      "for any request."]
  lines += [
      "", "## Reproduce", "", "```",
      "make tpu-venv   # once: libtpu in .venv-tpu",
      ".venv-tpu/bin/python -m tools.scale_up --steps= --lora_impl=gather  "
      "# the goals",
      ".venv-tpu/bin/python -m tools.scale_up --no_goals --no_search  "
      "# every preset (add --only=...)",
      ".venv-tpu/bin/python -m tools.scale_up --no_goals  # + largest-bank "
      "search",
      ".venv-tpu/bin/python -m tools.scale_up --render_only  # this file "
      "from the JSON",
      "```", "",
      "Each compile is cached by its full request in the cache JSON, so a "
      "rerun compiles only what is missing (compiler errors other than "
      "out-of-HBM are retried). On this 2-core machine, shared with other "
      "jobs, one compile took 1–10 minutes (Llama-3.1-70B train: 10)."]
  lines += [""] + moe_plan.render_section()
  lines += ["", "## Not run yet", ""]
  lines += ([f"- {m}" for m in missing] if missing else
            ["- every preset × step has a row."])
  lines += ["", meta.get("extra", "").strip(), ""]
  return "\n".join(lines).rstrip() + "\n"
