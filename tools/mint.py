"""`mint` (or `python -m tools.mint`): the adapter registry's command line.

Owns the CLI only; every command is a thin call into
`mintjax.store.registry.Registry`, `mintjax.store.peft_io` or
`mintjax.store.diff`. Output is a readable table, or JSON with `--json`.
Only `create-adapter` and `import-peft` create a registry that does not
exist yet; every other
command refuses a path without one (a typo never makes an empty registry).
`verify` exits 1 when it finds damaged revisions, listing each.

    mint --registry=DIR create-adapter alice --base=smollm2 \
        [--rank=8 --alpha=16 --targets=q,k,v,o --owner=alice]
    python -m tools.mint --registry=DIR list
    python -m tools.mint --registry=DIR show alice:prod
    python -m tools.mint --registry=DIR log alice
    python -m tools.mint --registry=DIR tag alice@3 prod
    python -m tools.mint --registry=DIR rollback alice --tag=prod [--to=2]
    python -m tools.mint --registry=DIR diff alice@2 alice@3
    python -m tools.mint --registry=DIR verify
    python -m tools.mint --registry=DIR gc
    python -m tools.mint --registry=DIR import-peft PEFT_DIR --id=alice \
        (--base=SOURCE | --base_fingerprint=sha256:...)
    mint --registry=DIR import-peft DIR_A DIR_B --ids=alice,bob --base=smollm2
    python -m tools.mint --registry=DIR export-peft alice@3 OUT_DIR
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import sys
from typing import Sequence

from absl import app, flags

from launch import console

from mintjax.store import diff, peft_io
from mintjax.store.errors import RegistryError
from mintjax.store.registry import Registry, Revision

_REGISTRY = flags.DEFINE_string("registry", None, "registry directory")
_JSON = flags.DEFINE_bool("json", False, "print JSON instead of tables")
_TAG = flags.DEFINE_string("tag", "prod", "tag for rollback")
_TO = flags.DEFINE_integer("to", None, "rollback target revision")
_ID = flags.DEFINE_string("id", None, "adapter id for import-peft")
_IDS = flags.DEFINE_list("ids", [], "adapter ids for import-peft of several "
                        "folders (one per folder, in order)")
_OWNER = flags.DEFINE_string("owner", "",
                             "owner for create-adapter and import-peft")
_BASE = flags.DEFINE_string(
    "base", None, "base source to fingerprint: 'smollm2', a .gguf file, an "
    "HF folder, a converted checkpoint (create-adapter, import-peft)")
_RANK = flags.DEFINE_integer("rank", 8, "create-adapter: LoRA rank")
_ALPHA = flags.DEFINE_float("alpha", None,
                            "create-adapter: LoRA alpha (default 2*rank)")
_TARGETS = flags.DEFINE_list("targets", ["q", "k", "v", "o"],
                             "create-adapter: adapted projections")
_BASE_FP = flags.DEFINE_string("base_fingerprint", None,
                               "base fingerprint (import-peft)")
_GRACE = flags.DEFINE_float(
    "grace_s", 0.0, "gc: reclaim a reservation only this long after its "
    "lease expired (clock skew between hosts)")

USAGE = ("commands: create-adapter ID --base [--rank --alpha --targets] | "
         "list | show REF | log ID | tag REF TAG | rollback ID "
         "[--tag --to] | diff REF REF | verify | gc | import-peft DIR... "
         "(--id|--ids) (--base|--base_fingerprint) | export-peft REF DIR")


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A plain aligned text table."""
  cells = [[str(h) for h in headers]] + [
      ["" if c is None else str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
           for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _time(t: float | None) -> str:
  if t is None:
    return ""
  return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _rev_dict(rev: Revision) -> dict:
  return dict(ref=rev.ref, adapter_id=rev.adapter_id, revision=rev.revision,
              parent=rev.parent, base_fingerprint=rev.base_fingerprint,
              sha256=rev.sha256, created=rev.created,
              provenance=rev.provenance, array_key=rev.array_key, row=rev.row)


# Commands that may create the registry they are pointed at.
CREATING = frozenset({"create-adapter", "import-peft"})


class ProblemsFound(Exception):
  """A command ran and found problems (`verify`); carries its report."""


def run(reg: Registry, args: Sequence[str], as_json: bool = False) -> str:
  """Runs one command; returns its output text.

  Raises:
    ProblemsFound: `verify` found damaged revisions (its report is the
      message; the CLI prints it and exits 1).

  Raises:
    RegistryError: from the registry; usage errors as RegistryError too.
  """
  if not args:
    raise RegistryError(f"no command given; {USAGE}")
  cmd, rest = args[0], list(args[1:])

  def need(n: int, names: str):
    if len(rest) != n:
      raise RegistryError(f"`{cmd}` takes {names}, got {rest}; {USAGE}")

  if cmd == "create-adapter":
    need(1, "ID")
    if not _BASE.value:
      raise RegistryError("create-adapter needs --base=SOURCE (e.g. "
                          "--base=smollm2): the adapter is tied to its base")
    from mintjax.adapters.spec import AdapterInfo  # pylint: disable=g-import-not-at-top
    from mintjax.model.sources import load_base_source  # Heavy; only here.
    base = load_base_source(_BASE.value)
    info = AdapterInfo(
        targets=tuple(_TARGETS.value), rank=_RANK.value,
        alpha=float(_ALPHA.value if _ALPHA.value is not None
                    else 2 * _RANK.value))
    data = reg.create_adapter(rest[0], spec=info,
                              base_fingerprint=base.fingerprint,
                              owner=_OWNER.value, config=base.config)
    out = data, (f"created {rest[0]} (rank {info.rank}, alpha {info.alpha:g},"
                 f" targets {','.join(info.targets)}) on {base.fingerprint}"
                 "; publish revisions by training it (mintjax-train) or "
                 "with Registry.publish")
  elif cmd == "list":
    need(0, "no arguments")
    data = reg.list_adapters()
    rows = [(a["id"], a["owner"], a["revisions"], a["latest"],
             " ".join(f"{k}->{v}" for k, v in a["tags"].items()),
             f"r{a['spec']['rank']} {','.join(a['spec']['targets'])}",
             a["base_fingerprint"][:19]) for a in data]
    out = data, table(("id", "owner", "revs", "latest", "tags", "spec",
                       "base"), rows)
  elif cmd == "show":
    need(1, "REF")
    rev = reg.resolve(rest[0])
    data = _rev_dict(rev)
    data.update(tags={t: r for t, r in reg.tags(rev.adapter_id).items()
                      if r == rev.revision},
                evals=reg.evals(rev.ref),
                residency=[r for r in reg.residency(rev.adapter_id)
                           if r["revision"] == rev.revision])
    prov = rev.provenance
    lines = [f"{rev.ref}  (parent {rev.parent})  created {_time(rev.created)}",
             f"  sha256        {rev.sha256}",
             f"  base          {rev.base_fingerprint}",
             f"  data          {prov.get('data_fingerprint')}",
             f"  steps / seed  {prov.get('steps')} / {prov.get('seed')}",
             f"  code          {prov.get('code_version')}",
             f"  host          {prov.get('host')}",
             f"  stored at     {rev.array_key} row {rev.row}",
             f"  tags          {sorted(data['tags']) or '-'}"]
    if "source" in prov:
      lines.append(f"  source        {prov['source']}")
    if data["evals"]:
      lines.append(table(("metric", "value", "data", "time"), [
          (e["metric"], f"{e['value']:.6g}", e["data_fingerprint"][:19],
           _time(e["created"])) for e in data["evals"]]))
    for r in data["residency"]:
      lines.append(f"  served {r['served_count']} (last "
                   f"{_time(r['last_served'])}), loaded {r['load_count']}")
    out = data, "\n".join(lines)
  elif cmd == "log":
    need(1, "ID")
    revs = reg.history(rest[0])
    tags = reg.tags(rest[0])
    data = [dict(_rev_dict(r), tags=sorted(t for t, v in tags.items()
                                           if v == r.revision),
                 evals=reg.evals(r.ref)) for r in revs]
    rows = [(d["revision"], d["parent"], _time(d["created"]),
             d["sha256"][7:19], d["provenance"].get("steps"),
             " ".join(d["tags"]),
             " ".join(f"{e['metric']}={e['value']:.4g}" for e in d["evals"]))
            for d in data]
    moves = reg.tag_history(rest[0])
    text = table(("rev", "parent", "created", "sha256", "steps", "tags",
                  "evals"), rows)
    if moves:
      text += "\n\n" + table(("tag", "from", "to", "reason", "time"), [
          (m["tag"], m["old"], m["new"], m["reason"], _time(m["created"]))
          for m in moves])
    out = dict(revisions=data, tag_moves=moves), text
  elif cmd == "tag":
    need(2, "REF TAG")
    rev = reg.tag(rest[0], rest[1])
    out = _rev_dict(rev), f"{rev.adapter_id}:{rest[1]} -> {rev.ref}"
  elif cmd == "rollback":
    need(1, "ID")
    rev = reg.rollback(rest[0], tag=_TAG.value, to=_TO.value)
    out = _rev_dict(rev), f"{rev.adapter_id}:{_TAG.value} -> {rev.ref}"
  elif cmd == "diff":
    need(2, "REF_A REF_B")
    data = diff.diff_revisions(reg, rest[0], rest[1])
    out = data, table(("target", "|dW_a|", "|dW_b|", "|dW_a - dW_b|",
                       "relative"), [
        (t, f"{d['norm_a']:.6g}", f"{d['norm_b']:.6g}", f"{d['delta']:.6g}",
         f"{d['rel']:.4f}") for t, d in data.items()])
  elif cmd == "verify":
    need(0, "no arguments")
    data = reg.verify()
    text = f"verified {data['checked']} revisions: " + (
        "all OK" if data["ok"] else f"{len(data['bad'])} CORRUPT\n" +
        "\n".join(f"  {data['problems'][r]}" for r in data["bad"]))
    if not data["ok"]:
      raise ProblemsFound(json.dumps(data, indent=2, sort_keys=True) if (
          as_json) else text)
    out = data, text
  elif cmd == "gc":
    need(0, "no arguments")
    data = reg.gc(grace_s=_GRACE.value)
    out = data, (f"reclaimed {data['reclaimed_reservations']} expired "
                 f"reservations ({data['reclaimed_rows']} rows), deleted "
                 f"{data['deleted_files']} unreferenced shard files; "
                 f"{data['live_reservations']} live reservations left alone")
  elif cmd == "import-peft":
    if not rest:
      raise RegistryError(f"`import-peft` takes PEFT_DIR [PEFT_DIR ...]; "
                          f"{USAGE}")
    ids = [_ID.value] if _ID.value else list(_IDS.value)
    if len(ids) != len(rest) or (_ID.value and _IDS.value):
      raise RegistryError(
          f"import-peft of {len(rest)} folder(s) needs --id=ADAPTER_ID (one "
          "folder) or --ids=A,B,... (one id per folder, in order)")
    if bool(_BASE.value) == bool(_BASE_FP.value):
      raise RegistryError(
          "import-peft needs exactly one of --base=SOURCE (loaded and "
          "fingerprinted once here, e.g. --base=smollm2) or "
          "--base_fingerprint=sha256:...")
    if _BASE.value:
      from mintjax.model.sources import load_base_source  # Heavy; only here.
      # Loaded once; every folder is checked against it (shapes, layers)
      # and all ids against the registry before any is stored.
      revs = peft_io.import_peft(reg, load_base_source(_BASE.value), *rest,
                                 ids=ids, owner=_OWNER.value)
    else:
      revs = [peft_io.import_peft(reg, folder, adapter_id,
                                  base_fingerprint=_BASE_FP.value,
                                  owner=_OWNER.value)
              for folder, adapter_id in zip(rest, ids)]
    text = "\n".join(f"imported {f} as {r.ref}" for f, r in zip(rest, revs))
    out = ([_rev_dict(r) for r in revs] if len(revs) > 1
           else _rev_dict(revs[0])), text
  elif cmd == "export-peft":
    need(2, "REF OUT_DIR")
    rev = peft_io.export_peft(reg, rest[0], rest[1])
    out = _rev_dict(rev), f"exported {rev.ref} to {rest[1]}"
  else:
    raise RegistryError(f"unknown command {cmd!r}; {USAGE}")
  data, text = out
  return json.dumps(data, indent=2, sort_keys=True, default=str) if (
      as_json) else text


# What a bad argument or a bad file raises. Anything else is a bug in
# mintjax and keeps its traceback.
_USER_ERRORS = (RegistryError, ValueError, LookupError, OSError,
                sqlite3.Error)


def one_line(e: BaseException) -> str:
  """An exception as one line: 'error: <message>' (type kept if unclear)."""
  msg = " ".join(str(e).split()) or type(e).__name__
  if not isinstance(e, RegistryError):
    msg = f"{type(e).__name__}: {msg}"
  return f"error: {msg}"


def main(argv):
  console.quiet_logs()
  if not _REGISTRY.value:
    print("error: --registry=DIR is required", file=sys.stderr)
    return 2
  reg = None
  try:
    reg = Registry.open(_REGISTRY.value,
                        create=len(argv) > 1 and argv[1] in CREATING)
    print(run(reg, argv[1:], _JSON.value))
  except ProblemsFound as e:
    print(str(e))
    return 1
  except sqlite3.DatabaseError as e:
    print(f"error: the registry catalog in {_REGISTRY.value} is not a "
          f"readable SQLite database ({' '.join(str(e).split())}); point "
          "--registry at a registry directory or restore its catalog",
          file=sys.stderr)
    return 1
  except _USER_ERRORS as e:
    print(one_line(e), file=sys.stderr)
    return 1
  finally:
    if reg is not None:
      reg.close()
  return 0


def cli():
  """Console-script entry (`mint`)."""
  app.run(main)


if __name__ == "__main__":
  cli()
