"""Scaling study output: JSON results, matplotlib figures and SCALING.md.

Owns the files `tools/scaling.py` writes: `<out_dir>/<axis>.json` (the
measured numbers plus machine, command and date), one PNG per axis
(`scale_down.png`, `scale_up.png`, `scale_out.png`; matplotlib with the Agg
backend, each figure stamped with machine, command and date) and the
markdown report, rebuilt from whichever axes' JSON files exist plus an
optional hand-written `<out_dir>/notes.md`. Nothing here
measures anything: every number comes from the JSON files.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

PNG = {"down": "scale_down.png", "up": "scale_up.png", "out": "scale_out.png"}


def write_json(out_dir: str, axis: str, data: Mapping) -> str:
  path = os.path.join(out_dir, f"{axis}.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # a crash never leaves half a results file
  return path


def read_json(out_dir: str, axis: str) -> dict | None:
  path = os.path.join(out_dir, f"{axis}.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _stamp(fig, data: Mapping) -> None:
  m = data["machine"]
  fig.text(0.005, 0.005, f"{m['cpu']}, nproc {m['nproc']}, jax {m['jax']} "
           f"({m['backend']}); `{m['command']}`; {m['date']}", fontsize=6,
           color="0.35", ha="left", va="bottom")


def _mib(b: float) -> str:
  return f"{b / 2**20:.3f} MiB" if b < 2**20 else f"{b / 2**20:.2f} MiB"


def plot_down(data: Mapping, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.6))
  groups: dict[str, list] = {}
  for r in data["rows"]:
    key = r["variant"] if r["variant"] != "lora" else (
        "LoRA q,v" if r["targets"] == ["q", "v"] else
        "LoRA all 7" if len(r["targets"]) == 7 else "LoRA " +
        ",".join(r["targets"]))
    groups.setdefault(key, []).append(r)
  for key, rows in groups.items():
    rows = sorted(rows, key=lambda r: r["adapter_bytes"])
    xs = [r["adapter_bytes"] for r in rows]
    ys = [r["heldout_em"] for r in rows]
    ax.plot(xs, ys, "o-" if len(rows) > 1 else "*", label=key, ms=7)
    for r in rows:
      ax.annotate(f"r{r['rank']}", (r["adapter_bytes"], r["heldout_em"]),
                  textcoords="offset points", xytext=(3, 4), fontsize=7)
  ref = next(r for r in data["rows"] if r["arm"] == data["reference"])
  ax.axhline(0.95 * ref["heldout_em"], color="0.5", ls="--", lw=0.8,
             label=f"95% of {data['reference']}")
  ax.set_xscale("log")
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel("adapter size per user (bytes, float32)")
  ax.set_ylabel("held-out exact match")
  ax.set_title(f"Scale Down: {data['base']}, {data['params']['users']} "
               f"users, {data['params']['steps']} steps")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _stamp(fig, data)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_up(data: Mapping, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
  for key, ax, title in (("heldout_em", axes[0], "held-out (paraphrase)"),
                         ("train_em", axes[1], "train prompts (recall)")):
    for r in data["rows"]:
      xs = [p["step"] for p in r["curve"]]
      ax.plot(xs, [p[key] for p in r["curve"]],
              "-o" if r["base"] == "pretrained" else "--x",
              label=f"{r['arm']} {r['base']}", ms=4)
    ax.set_xlabel("train step")
    ax.set_title(f"Scale Up: {title}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("exact match")
  axes[0].set_ylim(-0.03, 1.03)
  axes[1].legend(fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _stamp(fig, data)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_out(data: Mapping, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  dec = [r for r in data["decode"] if r["distinct"] > 0]
  base = next(r for r in data["decode"] if r["distinct"] == 0)
  axes[0].plot([r["distinct"] for r in dec], [r["decode_tok_s"] for r in dec],
               "o-", label="mixed batch")
  axes[0].axhline(base["decode_tok_s"], color="0.5", ls="--",
                  label="all rows on base")
  axes[0].set_xscale("log", base=2)
  axes[0].set_ylim(bottom=0)
  axes[0].set_xlabel(f"distinct adapters in a batch of {base['batch']}")
  axes[0].set_ylabel("decode tokens/s")
  axes[0].set_title("decode throughput")
  axes[0].legend(fontsize=8)
  reg = data["registry"]
  n = [r["adapters"] for r in reg]
  for key, label in (("resolve_p50_ms", "resolve p50"),
                     ("resolve_p99_ms", "resolve p99"),
                     ("load_p50_ms", "load p50"),
                     ("load_many64_p50_ms", "load_many(64) p50")):
    axes[1].plot(n, [r[key] for r in reg], "o-", label=label)
  axes[1].set_xscale("log")
  axes[1].set_yscale("log")
  axes[1].set_xlabel("adapters in the catalog")
  axes[1].set_ylabel("latency (ms)")
  axes[1].set_title("registry")
  axes[1].legend(fontsize=8)
  tr = data["train"]
  axes[2].plot([r["users"] for r in tr], [r["tokens_per_s"] for r in tr],
               "o-")
  axes[2].set_xscale("log", base=2)
  axes[2].set_ylim(bottom=0)
  axes[2].set_xlabel(f"users (adapters) per step of {tr[0]['batch']} rows")
  axes[2].set_ylabel("train tokens/s")
  axes[2].set_title("multi-tenant training")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(f"Scale Out: {data['base']}", fontsize=10)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  _stamp(fig, data)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt_step(v) -> str:
  return "not reached" if v is None else str(v)


def _header(data: Mapping) -> list[str]:
  m = data["machine"]
  return [f"Measured {m['date']} on {m['cpu']} (nproc {m['nproc']}), jax "
          f"{m['jax']} ({m['backend']}), Python {m['python']}; command "
          f"`{m['command']}`; {data['wall_s'] / 60:.1f} min for this axis. "
          f"Base `{data['base']}` ({data['base_fingerprint'][:19]}...).", ""]


def section_down(data: Mapping) -> list[str]:
  p = data["params"]
  out = ["## Scale Down: how small can a personal adapter be?", ""]
  out += _header(data)
  out += [f"{p['users']} users, 3 personal facts each (3 training phrasings "
          "per fact, 1 unseen paraphrase held out: "
          "`mintjax.apps.personal_data`); one adapter per user, all users "
          f"trained together for {p['steps']} steps of {p['batch_size']} "
          f"rows (AdamW, lr {p['learning_rate']}, alpha = 2r). Held-out "
          "exact match = greedy completion equals the fact (teacher-forced "
          "argmax, `mintjax.eval.evaluate`).", "",
          f"![Scale Down](scaling/{PNG['down']})", "",
          "| adapter | variant | rank | targets | bytes / user | held-out EM "
          "| train-prompt EM | ms / step |", "|---|---|---|---|---|---|---|---|"]
  for r in sorted(data["rows"], key=lambda r: r["adapter_bytes"]):
    out.append(f"| {r['arm']} | {r['variant']} | {r['rank']} | "
               f"{','.join(r['targets'])} | {r['adapter_bytes']:,} "
               f"({_mib(r['adapter_bytes'])}) | {r['heldout_em']:.3f} | "
               f"{r['train_em']:.3f} | {r['step_s'] * 1e3:.0f} |")
  if data.get("vera") == "pending":
    out.append("| vera (VeRA-style) | vera | - | q,v | - | pending | pending "
               "| - |")
  ref = next(r for r in data["rows"] if r["arm"] == data["reference"])
  best = next((r for r in data["rows"] if r["arm"] == data["smallest_95"]),
              None)
  out.append("")
  if ref["heldout_em"] <= 0:
    out.append(f"The reference {data['reference']} reached held-out exact "
               "match 0, so '95% of it' selects nothing meaningful; train "
               "longer or on a pretrained base.")
  elif best is None:
    out.append(f"No adapter reached 95% of {data['reference']}'s held-out "
               f"exact match ({ref['heldout_em']:.3f}).")
  else:
    out.append(
        f"**Smallest adapter reaching 95% of {data['reference']}'s held-out "
        f"exact match ({ref['heldout_em']:.3f} -> threshold "
        f"{0.95 * ref['heldout_em']:.3f}): {best['arm']}**, "
        f"{best['adapter_bytes']:,} bytes per user "
        f"({ref['adapter_bytes'] / best['adapter_bytes']:.0f}x smaller), "
        f"held-out EM {best['heldout_em']:.3f}.")
  top = max(data["rows"], key=lambda r: r["heldout_em"])
  level = 0.95 * top["heldout_em"]
  ok = [r for r in data["rows"] if r["heldout_em"] >= level - 1e-9]
  small = min(ok, key=lambda r: r["adapter_bytes"]) if ok else None
  if top["arm"] != data["reference"] and small and (
      small["arm"] != data["smallest_95"]):
    out += ["", f"Against the best arm instead ({top['arm']}, held-out EM "
            f"{top['heldout_em']:.3f} -> threshold {level:.3f}), the "
            f"smallest adapter reaching 95% is **{small['arm']}** "
            f"({small['adapter_bytes']:,} bytes per user, held-out EM "
            f"{small['heldout_em']:.3f})."]
  if data.get("vera") == "pending":
    out.append("")
    out.append("The VeRA-style variant (`BankSpec(variant=\"vera\")`) was "
               "not trainable when this was run; its row is pending.")
  return out + [""]


def section_up(data: Mapping) -> list[str]:
  out = ["## Scale Up: does a stronger base make the same adapter more "
         "useful?", ""]
  out += _header(data)
  out += ["The same adapters, data, seeds and steps on the pretrained base "
          "and on a randomly initialised twin of the same shape and "
          f"tokenizer (twin {data['twin_fingerprint'][:19]}...).", "",
          f"![Scale Up](scaling/{PNG['up']})", "",
          "| adapter | base | held-out EM | train-prompt EM | steps to 50% "
          "of the pretrained held-out EM | steps to train-prompt EM >= 0.5 |",
          "|---|---|---|---|---|---|"]
  for r in data["rows"]:
    out.append(f"| {r['arm']} | {r['base']} | {r['heldout_em']:.3f} | "
               f"{r['train_em']:.3f} | "
               f"{_fmt_step(r['steps_to_half_pretrained_heldout'])} | "
               f"{_fmt_step(r['steps_to_train_em_50'])} |")
  ev = data["params"]["eval_every"]
  out += ["", f"Steps are read off evaluations every {ev} steps (so they "
          f"are multiples of {ev}).", ""]
  return out


def section_out(data: Mapping) -> list[str]:
  out = ["## Scale Out: many adapters served, stored and trained together",
         ""]
  out += _header(data)
  out += [f"![Scale Out](scaling/{PNG['out']})", ""]
  d0 = data["decode"][0]
  out += [f"**Decode** (`Engine`, batch of {d0['batch']} requests, rank "
          f"{d0['rank']} on {','.join(d0['targets'])}, every adapter "
          "resident; 0 = every row on the base, same engine and program):",
          "", "| distinct adapters | decode tokens/s | step (ms) | step vs "
          "base |", "|---|---|---|---|"]
  for r in data["decode"]:
    out.append(f"| {r['distinct']} | {r['decode_tok_s']:.1f} | "
               f"{r['step_ms']:.1f} | {r['ratio_vs_base']:.2f}x |")
  out += ["", "**Registry** (one SQLite catalog + tensorstore store grown "
          "through the sizes; rank-1 q,v adapters of a tiny shape class, "
          "2 KiB each):", "", "| adapters | time to grow (s) | resolve p50 / "
          "p99 (ms) | load p50 / p99 (ms) | load_many(64) p50 (ms) | catalog "
          "MiB |", "|---|---|---|---|---|---|"]
  for r in data["registry"]:
    out.append(f"| {r['adapters']:,} | {r['publish_s']:.1f} | "
               f"{r['resolve_p50_ms']:.3f} / {r['resolve_p99_ms']:.3f} | "
               f"{r['load_p50_ms']:.3f} / {r['load_p99_ms']:.3f} | "
               f"{r['load_many64_p50_ms']:.2f} | "
               f"{r['catalog_bytes'] / 2**20:.1f} |")
  t0 = data["train"][0]
  out += ["", f"**Training** (one compiled step, {t0['batch']} rows of "
          f"{t0['seq_len']} tokens, rank {t0['rank']} on "
          f"{','.join(t0['targets'])}; rows spread round-robin over U users' "
          "adapters):", "", "| users per step | step (ms) | tokens/s | step "
          "vs 1 user |", "|---|---|---|---|"]
  for r in data["train"]:
    out.append(f"| {r['users']} | {r['step_ms']:.1f} | "
               f"{r['tokens_per_s']:.1f} | {r['ratio_vs_one_user']:.2f}x |")
  return out + [""]


def write_all(out_dir: str, doc_path: str) -> str:
  """Plots every axis whose JSON exists and rewrites the markdown report."""
  lines = ["# Scaling study: Scale Down, Scale Up, Scale Out", "",
           "Generated by `python -m tools.scaling` (one command regenerates "
           "every table and plot; `--only=down|up|out` reruns one axis and "
           "keeps the others' last results). Every number below was "
           "measured by that run on the machine named in its section; "
           "nothing is copied. Raw numbers: `docs/scaling/*.json`.", ""]
  rel = os.path.relpath(os.path.abspath(out_dir),
                        os.path.dirname(os.path.abspath(doc_path)))
  for axis, plot, section in (("down", plot_down, section_down),
                              ("up", plot_up, section_up),
                              ("out", plot_out, section_out)):
    data = read_json(out_dir, axis)
    if data is None:
      lines += [f"## {axis}: not run yet (`python -m tools.scaling "
                f"--only={axis}`)", ""]
      continue
    plot(data, os.path.join(out_dir, PNG[axis]))
    lines += [l.replace("](scaling/", f"]({rel}/") for l in section(data)]
  # Hand-written reading of the numbers (kept across reruns) goes last.
  notes = os.path.join(out_dir, "notes.md")
  if os.path.isfile(notes):
    with open(notes, encoding="utf-8") as f:
      lines += ["## Reading the numbers", "", f.read().strip(), ""]
  with open(doc_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  return doc_path
