"""The one `Revision` type, the named load result, and the base check.

Owns `Revision` (an immutable published revision as the catalog records
it), `LoadedAdapter` (what `Registry.load` returns: a NamedTuple, so
`rev, w = reg.load(ref)` keeps working) and `check_base` (the single
base-compatibility check the registry, the serving engine, residency and
training share). No I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, NamedTuple

from mintjax.store.errors import BaseMismatchError


@dataclasses.dataclass(frozen=True)
class Revision:
  """One immutable published revision of an adapter.

  Attributes:
    adapter_id: the adapter's stable id.
    revision: 1, 2, 3, ... per adapter.
    parent: revision it was derived from, or None.
    base_fingerprint: base model the adapter was trained on.
    sha256: 'sha256:<hex>' of the stored row bytes (content identity).
    provenance: (property) base/data fingerprints, training config, code
      version, steps, seed, host (and any extra keys the publisher gave);
      stored as `provenance_json`.
    created: unix time of publication.
    array_key: weights-store array holding the row.
    row: row index in that array (shard = row // rows_per_shard).
    meta: (property) storage details, e.g. PEFT per-module ranks/alphas;
      stored as `meta_json`.
    xxh3_64: xxh3-64 of the stored row bytes (signed 64-bit), checked on
      every load.
  """

  adapter_id: str
  revision: int
  parent: int | None
  base_fingerprint: str
  sha256: str
  provenance_json: str = dataclasses.field(repr=False)
  created: float = 0.0
  array_key: str = ""
  row: int = -1
  meta_json: str = dataclasses.field(default="{}", repr=False)
  xxh3_64: int | None = dataclasses.field(default=None, repr=False)

  @property
  def ref(self) -> str:
    return f"{self.adapter_id}@{self.revision}"

  # Decoded on first use: loading many adapters rarely needs provenance.
  @functools.cached_property
  def provenance(self) -> dict:
    return json.loads(self.provenance_json)

  @functools.cached_property
  def meta(self) -> dict:
    return {} if self.meta_json == "{}" else json.loads(self.meta_json)


class LoadedAdapter(NamedTuple):
  """One loaded revision: `.revision` and its `.weights` (AdapterWeights or
  VeraWeights). A tuple, so `rev, weights = reg.load(ref)` unpacks it."""

  revision: Revision
  weights: Any


def check_base(ref: str, adapter_base: str, expect_base: str | None, *,
               in_use: str = "this engine serves",
               fix: str = "convert or retrain the adapter for this base"
               ) -> None:
  """Refuses an adapter trained on another base than the one in use.

  Args:
    ref: the adapter reference, for the message ('alice@3').
    adapter_base: the base fingerprint the adapter was trained on.
    expect_base: the base being served or trained; None checks nothing.
    in_use: how the message names the base in use (serving by default;
      training says which config's base).
    fix: what the message tells the caller to do.

  Raises:
    BaseMismatchError: naming both fingerprints and the fix.
  """
  if expect_base is not None and adapter_base != expect_base:
    raise BaseMismatchError(
        f"adapter {ref!r} was trained on base {adapter_base[:19]}..., "
        f"{in_use} {expect_base[:19]}...; {fix}")
