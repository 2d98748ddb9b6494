"""Adapter identity: ids, references, what an adapter is, code version.

Owns `check_name` (ids and tags: letters, digits, '-', '_', '.', never a
path), `parse_ref` ('alice', 'alice@3', 'alice:prod'), `parse_info` (the
store's door for an adapter spec: `mintjax.adapters.spec.AdapterInfo`, the
one type saying what an adapter is, or its stored dict form; errors become
`InvalidAdapterError`), `check_weights` (publish-time checks of weights
against the spec, the family-specific ones asked of its family) and
`build_provenance` (what every revision records about where it came from:
base and data fingerprints, training config, code version, steps, seed,
host). Used
by `mintjax.store.registry`; no I/O besides the one `git rev-parse`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import socket
import subprocess
from typing import Any, Mapping

from mintjax.adapters.spec import AdapterError, AdapterInfo
from mintjax.store.errors import BaseMismatchError, InvalidAdapterError

# \Z, not $: '$' also matches before a trailing newline, so 'alice\n' would
# pass. re.ASCII: only ASCII letters and digits are name characters.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z", re.ASCII)
_REF_RE = re.compile(
    r"(?P<id>[^@:]+)(?:@(?P<rev>[^@:]*)|:(?P<tag>[^@:]*))?\Z")
_REV_RE = re.compile(r"[0-9]{1,18}\Z", re.ASCII)


def check_name(name: Any, what: str = "adapter id") -> str:
  """Validates an adapter id or tag name; returns it."""
  if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
    raise InvalidAdapterError(
        f"invalid {what} {name!r}: expected 1-128 letters, digits, '-', '_' "
        "or '.', starting with a letter or digit, without '..' (ids are "
        "names, never paths), e.g. 'alice' or 'team-a.v2'")
  return name


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
  """'alice' | 'alice@3' | 'alice:prod' -> (id, revision or None, tag)."""
  m = _REF_RE.match(ref) if isinstance(ref, str) else None
  if not m:
    raise InvalidAdapterError(
        f"invalid reference {ref!r}: expected 'ID', 'ID@REVISION' or "
        "'ID:TAG', e.g. 'alice', 'alice@3', 'alice:prod'")
  aid = check_name(m.group("id"))
  rev, tag = m.group("rev"), m.group("tag")
  if rev is not None:
    # Only ASCII digits: str.isdigit() also accepts e.g. Arabic-Indic '٣'.
    if not _REV_RE.match(rev) or int(rev) < 1:
      raise InvalidAdapterError(
          f"invalid revision in {ref!r}: revisions are numbered 1, 2, 3...")
    return aid, int(rev), None
  if tag is not None:
    return aid, None, check_name(tag, "tag")
  return aid, None, None


def parse_info(spec) -> AdapterInfo:
  """The adapter spec from an `AdapterInfo` or its dict form (the stored
  JSON, or a hand-written {targets, rank, alpha, ...}).

  A bank spec (`BankSpec`) is refused: it has no alpha, and none is
  invented; use `AdapterInfo.for_bank(spec, alpha=...)`.

  Raises:
    InvalidAdapterError: naming what is wrong with the spec.
  """
  if isinstance(spec, AdapterInfo):
    return spec
  if not isinstance(spec, Mapping):
    raise InvalidAdapterError(
        f"invalid adapter spec of type {type(spec).__name__}; pass an "
        "AdapterInfo (e.g. AdapterInfo.for_bank(bank_spec, alpha=...)) or a "
        "dict with targets, rank and alpha")
  try:
    return AdapterInfo.from_dict(spec)
  except (AdapterError, TypeError) as e:
    raise InvalidAdapterError(f"invalid adapter spec: {e}") from None


def check_weights(adapter_id: str, info: AdapterInfo, weights) -> None:
  """Checks weights against the adapter's fixed spec (before any write).

  The weights must be the host type of the spec's family (LoRA:
  `AdapterWeights`, VeRA: `VeraWeights`) with the spec's rank, alpha and
  scale rule, plus whatever the family checks (VeRA: basis seed, targets).

  Raises:
    InvalidAdapterError: saying what differs and how to fix it.
  """
  family = info.family
  want = family.weights_type
  if not isinstance(weights, want):
    raise InvalidAdapterError(
        f"weights for {adapter_id!r} must be {want.__name__} (the adapter's "
        f"variant is {info.variant!r}), got {type(weights).__name__}")
  problem = family.check_weights(adapter_id, info, weights)
  if problem:
    raise InvalidAdapterError(problem)
  if weights.rank != info.rank:
    raise InvalidAdapterError(
        f"weights for {adapter_id!r} have rank {weights.rank}, the adapter "
        f"was created with rank {info.rank}; create a new adapter for a "
        "different rank")
  if (not isinstance(weights.alpha, (int, float)) or
      float(weights.alpha) != info.alpha or
      bool(weights.use_rslora) != info.use_rslora):
    raise InvalidAdapterError(
        f"weights for {adapter_id!r} have alpha={weights.alpha} use_rslora="
        f"{weights.use_rslora}, the adapter was created with alpha="
        f"{info.alpha} use_rslora={info.use_rslora}; they must match")


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
  """mintjax package version and git commit (when run from a checkout)."""
  try:
    from importlib.metadata import version
    pkg = version("mintjax")
  except Exception:  # Not installed as a distribution.
    pkg = "unknown"
  commit = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"],
                         capture_output=True, text=True, timeout=5)
    if out.returncode == 0:
      commit = out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {"mintjax": pkg, "git_commit": commit}


@functools.lru_cache(maxsize=1)
def hostname() -> str:
  return socket.gethostname()


def build_provenance(rec: dict, provenance: Mapping | None) -> dict:
  """Validates a publisher's provenance and fills the recorded defaults.

  Args:
    rec: the adapter's catalog record (id, base_fingerprint).
    provenance: data_fingerprint, training_config, steps, seed, extras.

  Returns:
    The provenance with base fingerprint, code version and host filled.
  """
  if provenance is None:
    provenance = {}
  if not isinstance(provenance, Mapping):
    raise InvalidAdapterError(
        f"provenance must be a dict, got {type(provenance).__name__}")
  prov = dict(provenance)
  base = prov.get("base_fingerprint", rec["base_fingerprint"])
  if base != rec["base_fingerprint"]:
    raise BaseMismatchError(
        f"provenance says these weights were trained on base {base[:19]}..., "
        f"adapter {rec['id']!r} belongs to base "
        f"{rec['base_fingerprint'][:19]}...; publish to an adapter created "
        "for that base")
  for key in ("steps", "seed"):
    if prov.get(key) is not None and (not isinstance(prov[key], int) or
                                      isinstance(prov[key], bool)):
      raise InvalidAdapterError(
          f"provenance[{key!r}] must be an int or None, got {prov[key]!r}")
  prov["base_fingerprint"] = base
  prov.setdefault("data_fingerprint", "")
  prov.setdefault("training_config", {})
  prov.setdefault("steps", None)
  prov.setdefault("seed", None)
  prov.setdefault("code_version", code_version())
  prov.setdefault("host", hostname())
  try:
    json.dumps(prov, allow_nan=False, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise InvalidAdapterError(
        f"provenance must be JSON-serialisable (plain dicts, lists, "
        f"strings, finite numbers): {e}") from None
  return prov


def check_meta(meta: dict, layout) -> None:
  """Checks a revision's storage metadata against its `RowLayout`."""
  fold = meta.get("b_scale")
  if fold is None:
    return
  for t, f in fold.items():
    if t not in layout.targets or len(f) != layout.shapes[t][0] or not all(
        isinstance(x, (int, float)) and math.isfinite(x) for x in f):
      raise InvalidAdapterError(
          f"meta['b_scale'][{t!r}] must be {layout.shapes.get(t, [0])[0]} "
          "finite per-layer factors for a target of the adapter")
