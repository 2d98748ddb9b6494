"""The adapter registry (MinT): identity, revisions, provenance, tags, loads.

Owns `Registry`, the one entry point to persistent adapter state
(`AdapterInfo`, ids and refs live in `mintjax.store.identity`). It ties the SQLite catalog (`mintjax.store.catalog`) to the sharded
tensorstore arrays (`mintjax.store.weights`).

References: 'alice' (latest revision), 'alice@3' (revision 3), 'alice:prod'
(tag; 'alice:latest' is the latest revision unless a tag of that name
exists). Ids and tags use letters, digits, '-', '_' and '.', start with a
letter or digit and are never paths.

Publish protocol (crash safe, many processes at once):
  1. validate everything (spec, shapes, rank, alpha, NaN/Inf, base);
  2. one write transaction reserves rows as *pending* and grows the array;
  3. write the rows (one batched tensorstore write), read them back, hash;
  4. one write transaction inserts the revisions (numbered max + 1 per
     adapter) and drops the pending record.
A crash before 4 leaves only a pending record (reclaimed by `gc`); after 4
the revision is complete. Bad input raises before step 2: nothing changes.

Loads do not re-hash rows by default (hashing costs about as much as the read
itself for large adapters); `verify()` re-hashes everything, and
`Registry.open(..., verify_on_load=True)` checks every load.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.adapters.vera import VeraWeights
from mintjax.config import ModelConfig
from mintjax.store import catalog as catalog_lib
from mintjax.store.catalog import Catalog, Revision
from mintjax.store.errors import (BaseMismatchError, InvalidAdapterError,
                                  RegistryError, StoreCorruptionError,
                                  UnknownRefError)
from mintjax.store.identity import (AdapterInfo, build_provenance,
                                    check_meta, check_name, check_weights,
                                    hostname, parse_ref)
from mintjax.store.weights import RowLayout, WeightsStore, row_sha256

__all__ = ["Registry", "Revision", "AdapterInfo", "parse_ref"]


class Registry:
  """Adapter identity, immutable revisions, tags, evals and the weights."""

  def __init__(self, catalog: Catalog, store: WeightsStore,
               verify_on_load: bool = False):
    self.catalog = catalog
    self.store = store
    self.verify_on_load = verify_on_load

  @classmethod
  def open(cls, path_or_spec, compression: str | None = None,
           verify_on_load: bool = False) -> "Registry":
    """Opens (creating if missing) a registry.

    Args:
      path_or_spec: a local directory (catalog.sqlite + arrays/ inside it),
        or a dict {'catalog': local sqlite path, 'store': directory, URL
        ('gs://b/p', 's3://b/p') or tensorstore kvstore spec}.
      compression: None or 'zstd' for arrays created from now on.
      verify_on_load: re-hash every row that is loaded.
    """
    if isinstance(path_or_spec, Mapping):
      extra = set(path_or_spec) - {"catalog", "store", "compression"}
      if extra or "catalog" not in path_or_spec:
        raise RegistryError(
            f"registry spec {dict(path_or_spec)} must have keys 'catalog' "
            "(a local .sqlite path) and optionally 'store' and 'compression'")
      cat_path = str(path_or_spec["catalog"])
      store = path_or_spec.get("store", os.path.dirname(
          os.path.abspath(cat_path)))
      compression = path_or_spec.get("compression", compression)
    else:
      path = os.fspath(path_or_spec)
      if "://" in path and not path.startswith("file://"):
        raise RegistryError(
            f"{path!r} is a remote store; the SQLite catalog must be local: "
            "open {'catalog': '/local/catalog.sqlite', 'store': "
            f"'{path}'}} instead")
      path = path[len("file://"):] if path.startswith("file://") else path
      cat_path, store = os.path.join(path, "catalog.sqlite"), path
    return cls(Catalog(cat_path), WeightsStore(store, compression),
               verify_on_load)

  def close(self) -> None:
    self.catalog.close()

  # --- identity ------------------------------------------------------------

  def create_adapter(self, adapter_id: str, *, spec, base_fingerprint: str,
                     owner: str = "", exist_ok: bool = False,
                     config: ModelConfig | None = None,
                     shapes: Mapping[str, Sequence[int]] | None = None
                     ) -> dict:
    """Registers a new adapter identity.

    Args:
      adapter_id: stable id (see `check_name`).
      spec: AdapterInfo, AdapterSpec or dict (targets, rank, alpha, ...).
      base_fingerprint: the base model's 'sha256:...' fingerprint.
      owner: owner / tenant name.
      exist_ok: return the existing adapter if it has the same spec and base.
      config: optional base config fixing per-target shapes now; otherwise
        `shapes` ({t: (L, d_in, d_out)}) or the first publish fixes them.

    Returns:
      The adapter's catalog record.
    """
    check_name(adapter_id)
    info = AdapterInfo.from_any(spec)
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
      raise InvalidAdapterError(
          f"base_fingerprint must be a non-empty string like 'sha256:...', "
          f"got {base_fingerprint!r}; use BaseModel.fingerprint")
    if not isinstance(owner, str):
      raise InvalidAdapterError(f"owner must be a string, got {owner!r}")
    layout = None
    if config is not None:
      shapes = {t: (config.num_layers, *config.projection_shape(t))
                for t in info.targets}
    if shapes is not None:
      if set(shapes) != set(info.targets):
        raise InvalidAdapterError(
            f"shapes name targets {sorted(shapes)}, the spec has "
            f"{list(info.targets)}")
      layout = RowLayout.for_info(info, shapes)
    existing = self.catalog.adapter(adapter_id)
    if existing is not None:
      if (exist_ok and existing["spec"] == info.to_dict() and
          existing["base_fingerprint"] == base_fingerprint):
        return existing
      raise InvalidAdapterError(
          f"adapter {adapter_id!r} already exists (spec {existing['spec']}, "
          f"base {existing['base_fingerprint'][:19]}); pick another id, or "
          "pass exist_ok=True with the same spec and base")
    with self.catalog.write() as db:
      self.catalog.insert_adapter(
          db, adapter_id, owner, info.to_dict(), base_fingerprint,
          layout.to_dict() if layout else None,
          layout.class_key(base_fingerprint) if layout else None)
    return self.catalog.adapter(adapter_id)

  def create_adapters(self, adapter_ids: Sequence[str], *, spec,
                      base_fingerprint: str, owner: str = "",
                      config: ModelConfig | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None
                      ) -> None:
    """Registers many adapters of one spec in one transaction (bulk path).

    Same checks as `create_adapter`; refuses (creating none) if any id is
    invalid, repeated or already registered.
    """
    ids = [check_name(i) for i in adapter_ids]
    if len(set(ids)) != len(ids):
      raise InvalidAdapterError("create_adapters got repeated adapter ids")
    taken = self.catalog.existing_ids(ids)
    if taken:
      raise InvalidAdapterError(
          f"{len(taken)} adapters already exist (e.g. {taken[0]!r}); "
          "create_adapters only registers new ids")
    # Validate spec/base/shapes once through the single-adapter path's checks.
    info = AdapterInfo.from_any(spec)
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
      raise InvalidAdapterError(
          f"base_fingerprint must be a non-empty string, got "
          f"{base_fingerprint!r}")
    if config is not None:
      shapes = {t: (config.num_layers, *config.projection_shape(t))
                for t in info.targets}
    layout_json = key = None
    if shapes is not None:
      layout = RowLayout.for_info(info, shapes)
      layout_json = json.dumps(layout.to_dict(), sort_keys=True)
      key = layout.class_key(base_fingerprint)
    spec_json = json.dumps(info.to_dict(), sort_keys=True)
    with self.catalog.write() as db:
      self.catalog.insert_adapters(db, [
          (i, owner, spec_json, base_fingerprint, layout_json, key)
          for i in ids])

  def adapter(self, adapter_id: str) -> dict:
    check_name(adapter_id)
    rec = self.catalog.adapter(adapter_id)
    if rec is None:
      raise UnknownRefError(
          f"unknown adapter {adapter_id!r}; create it with create_adapter() "
          "or list adapters with `python -m tools.mint list`")
    return rec

  def list_adapters(self) -> list[dict]:
    return self.catalog.adapters()

  # --- publish -------------------------------------------------------------

  def publish(self, adapter_id: str, weights: AdapterWeights,
              provenance: Mapping | None = None, parent: int | None = None,
              meta: Mapping | None = None) -> Revision:
    """Publishes one new immutable revision (see the module docstring).

    Args:
      adapter_id: an existing adapter.
      weights: factors of exactly the adapter's targets, rank and alpha.
      provenance: data_fingerprint, training_config, steps, seed and any
        extra JSON keys; base fingerprint, code version and host are filled.
      parent: revision this one derives from; None means the latest.
      meta: storage metadata (e.g. PEFT per-module ranks; see peft_io).
    """
    return self.publish_many([(adapter_id, weights, provenance, parent,
                               meta)])[0]

  def publish_many(self, items: Sequence[tuple]) -> list[Revision]:
    """Publishes many revisions: one reservation, one batched write, one commit.

    Args:
      items: tuples (adapter_id, weights[, provenance[, parent[, meta]]]).

    Returns:
      The new revisions, in order. All or none are published.
    """
    prepared = [self._prepare(*it) for it in items]
    by_key: dict[str, list[int]] = {}
    for i, p in enumerate(prepared):
      by_key.setdefault(p["array_key"], []).append(i)
    out: list[Revision] = [None] * len(prepared)  # type: ignore
    for key, idx in by_key.items():
      layout = prepared[idx[0]]["layout"]
      with self.catalog.write() as db:
        for i in idx:
          if prepared[i]["new_layout"]:
            aid = prepared[i]["adapter_id"]
            self.catalog.set_layout(db, aid, layout.to_dict(), key)
            if self.catalog.adapter(aid)["array_key"] != key:
              raise InvalidAdapterError(
                  f"adapter {aid!r} got its shapes from a concurrent first "
                  "publish with different shapes; these weights do not fit")
        rows, pending, need = self.catalog.allocate_rows(
            db, key, layout.to_dict(), len(idx))
        # Growing under the write lock: concurrent resizes never race.
        self.store.ensure_capacity(key, layout, need)
      try:
        data = np.stack([prepared[i]["row"] for i in idx])
        self.store.write_rows(key, layout, rows, data)
        back = self.store.read_rows_many([(key, layout, r) for r in rows])
        for i, row in zip(idx, back):
          if row_sha256(row) != prepared[i]["sha256"]:
            raise StoreCorruptionError(
                f"row read back for {prepared[i]['adapter_id']} does not "
                "match what was written; the storage is unreliable")
        for i, r in zip(idx, rows):
          prepared[i]["row_index"] = r
        with self.catalog.write() as db:
          numbers, parents, created = self.catalog.insert_revisions(db, [dict(
              adapter_id=prepared[i]["adapter_id"],
              parent=prepared[i]["parent"], array_key=key,
              row=prepared[i]["row_index"], sha256=prepared[i]["sha256"],
              provenance_json=prepared[i]["provenance_json"],
              meta_json=prepared[i]["meta_json"]) for i in idx], pending)
      except BaseException:
        with self.catalog.write() as db:
          self.catalog.release_pending(db, pending)
        raise
      for i, n, parent in zip(idx, numbers, parents):
        p = prepared[i]
        out[i] = Revision(p["adapter_id"], n, parent, p["base_fingerprint"],
                          p["sha256"], p["provenance_json"], created, key,
                          p["row_index"], p["meta_json"])
    return out

  def _prepare(self, adapter_id, weights, provenance=None, parent=None,
               meta=None) -> dict:
    """Validates one publish item; raises before anything is written."""
    rec = self.adapter(adapter_id)
    info = _info_of(rec)
    check_weights(adapter_id, info, weights)
    layout_new = rec["layout"] is None
    if layout_new and info.variant == "vera":
      raise InvalidAdapterError(
          f"VeRA adapter {adapter_id!r} has no recorded shapes (its vectors "
          "do not determine d_in); create it with config= or shapes=")
    if layout_new:
      shapes = {}
      for t in info.targets:
        if t not in weights.lora_a or t not in weights.lora_b:
          raise InvalidAdapterError(
              f"weights for {adapter_id!r} lack target {t!r}; the adapter's "
              f"targets are {list(info.targets)}")
        a, b = np.shape(weights.lora_a[t]), np.shape(weights.lora_b[t])
        if len(a) != 3 or len(b) != 3 or a[0] != b[0]:
          raise InvalidAdapterError(
              f"lora_a[{t!r}] {a} / lora_b[{t!r}] {b} must be [L, d_in, r] / "
              "[L, r, d_out]")
        shapes[t] = (a[0], a[1], b[2])
      layout = RowLayout.for_info(info, shapes)
    else:
      layout = _layout_of(rec)
    row = layout.pack(*((weights.lambda_d, weights.lambda_b) if
                        info.variant == "vera" else
                        (weights.lora_a, weights.lora_b)))
    if parent is not None and (not isinstance(parent, int) or parent < 1):
      raise InvalidAdapterError(
          f"parent must be a revision number >= 1 or None, got {parent!r}")
    if parent is not None:
      latest = self.catalog.revision(adapter_id, None)
      if latest is None or parent > latest.revision:
        raise UnknownRefError(
            f"parent {adapter_id}@{parent} does not exist (latest: "
            f"{latest.revision if latest else 'none'})")
    prov = build_provenance(rec, provenance)
    meta = dict(meta or {})
    check_meta(meta, layout)
    return dict(adapter_id=adapter_id, layout=layout, new_layout=layout_new,
                base_fingerprint=rec["base_fingerprint"],
                array_key=rec["array_key"] or layout.class_key(
                    rec["base_fingerprint"]),
                row=row, sha256=row_sha256(row),
                parent="latest" if parent is None else parent,
                provenance_json=json.dumps(prov, sort_keys=True),
                meta_json=json.dumps(meta, sort_keys=True))

  # --- resolve and load ----------------------------------------------------

  def resolve(self, ref: str) -> Revision:
    """'alice' | 'alice@3' | 'alice:prod' -> Revision."""
    return self._resolve_many([ref])[0][0]

  def _resolve_many(self, refs: Sequence[str]
                    ) -> list[tuple[Revision, str, str]]:
    """Resolves refs in one catalog query: (Revision, spec, layout JSON)."""
    found = self.catalog.resolve_many([parse_ref(r) for r in refs])
    for ref, f in zip(refs, found):
      if f is None:
        self._unresolved(ref)
    return found

  def _unresolved(self, ref: str) -> None:
    """Raises the error that explains why `ref` names nothing."""
    aid, rev, tag = parse_ref(ref)
    if tag is not None:
      rev = self.catalog.tag_revision(aid, tag)
      if rev is None and tag != "latest":
        self.adapter(aid)
        tags = self.catalog.tags(aid)
        raise UnknownRefError(
            f"adapter {aid!r} has no tag {tag!r} (tags: "
            f"{sorted(tags) or 'none'}); set one with tag('{aid}@N', "
            f"'{tag}')")
    found = self.catalog.revision(aid, rev)
    if found is None:
      self.adapter(aid)
      latest = self.catalog.revision(aid, None)
      raise UnknownRefError(
          f"{ref!r} names no revision: adapter {aid!r} has "
          f"{'revisions 1..%d' % latest.revision if latest else 'no revisions'}"
          "; publish one or pick an existing revision")
    raise UnknownRefError(f"{ref!r} names no revision")

  def _weights(self, rev: Revision, spec_json: str, layout_json: str,
               row: np.ndarray) -> AdapterWeights | VeraWeights:
    info = _info_json(spec_json)
    layout = _layout_json(layout_json)
    if self.verify_on_load and row_sha256(row) != rev.sha256:
      raise StoreCorruptionError(
          f"{rev.ref}: stored bytes hash to {row_sha256(row)[:19]}, the "
          f"catalog recorded {rev.sha256[:19]}; run `mint verify`")
    a, b = layout.unpack(row)
    if info.variant == "vera":  # Only the vectors: materialised by consumers.
      return VeraWeights(a, b, info.rank, info.basis_seed, info.alpha)
    for t, f in (rev.meta.get("b_scale") or {}).items():
      f = np.asarray(f, np.float64)
      if not np.all(f == 1.0):
        b[t] = (b[t].astype(np.float64) * f[:, None, None]).astype(b[t].dtype)
    return AdapterWeights(a, b, rank=info.rank, alpha=info.alpha,
                          use_rslora=info.use_rslora)

  @staticmethod
  def _check_base(rev: Revision, expect_base: str | None) -> None:
    if expect_base is not None and rev.base_fingerprint != expect_base:
      raise BaseMismatchError(
          f"adapter {rev.ref!r} was trained on base "
          f"{rev.base_fingerprint[:19]}..., this engine serves "
          f"{expect_base[:19]}...; convert or retrain the adapter for this "
          "base")

  def load(self, ref: str, expect_base: str | None = None
           ) -> tuple[Revision, AdapterWeights]:
    """Resolves and reads one adapter revision."""
    return self.load_many([ref], expect_base)[0]

  def load_many(self, refs: Sequence[str], expect_base: str | None = None
                ) -> list[tuple[Revision, AdapterWeights]]:
    """Resolves many refs and reads all their rows in one batched read.

    LoRA revisions come back as `AdapterWeights`, VeRA revisions as the
    stored `VeraWeights`; `.to_lora(config)` gives LoRA factors for both, and
    the bank (`pad_weights`) materialises VeRA when writing a slot.
    """
    found = self._resolve_many(list(refs))
    for rev, _, _ in found:
      self._check_base(rev, expect_base)
    rows = self.store.read_rows_many(
        [(rev.array_key, _layout_json(layout), rev.row)
         for rev, _, layout in found])
    return [(rev, self._weights(rev, spec, layout, row))
            for (rev, spec, layout), row in zip(found, rows)]

  def read_raw(self, ref: str) -> tuple[Revision, dict, dict]:
    """Stored factors exactly as written (no b_scale folding): (rev, A, B)."""
    rev = self.resolve(ref)
    layout = _layout_of(self.adapter(rev.adapter_id))
    a, b = layout.unpack(self.store.read_row(rev.array_key, layout, rev.row))
    return rev, a, b

  # --- history, evals, tags, residency -------------------------------------

  def history(self, adapter_id: str) -> list[Revision]:
    self.adapter(adapter_id)
    return self.catalog.revisions(adapter_id)

  def record_eval(self, ref: str, metric: str, value: float,
                  data_fingerprint: str = "") -> None:
    rev = self.resolve(ref)
    if not isinstance(metric, str) or not metric.strip():
      raise InvalidAdapterError(f"metric must be a non-empty name, got "
                                f"{metric!r}")
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.floating, np.integer)) or not math.isfinite(
            float(value)):
      raise InvalidAdapterError(
          f"eval value for {metric!r} must be a finite number, got {value!r}")
    self.catalog.insert_eval(rev.adapter_id, rev.revision, metric,
                             float(value), str(data_fingerprint))

  def evals(self, ref: str) -> list[dict]:
    rev = self.resolve(ref)
    return self.catalog.evals(rev.adapter_id, rev.revision)

  def tag(self, ref: str, tag: str, reason: str = "tag") -> Revision:
    """Points `tag` at the revision `ref` names (recorded in tag history)."""
    check_name(tag, "tag")
    rev = self.resolve(ref)
    with self.catalog.write() as db:
      self.catalog.set_tag(db, rev.adapter_id, tag, rev.revision, reason)
    return rev

  def tags(self, adapter_id: str) -> dict[str, int]:
    self.adapter(adapter_id)
    return self.catalog.tags(adapter_id)

  def tag_history(self, adapter_id: str, tag: str | None = None
                  ) -> list[dict]:
    self.adapter(adapter_id)
    return self.catalog.tag_events(adapter_id, tag)

  def rollback(self, adapter_id: str, tag: str = "prod", to: int | None = None
               ) -> Revision:
    """Moves `tag` back: to revision `to`, or to where it pointed before."""
    check_name(tag, "tag")
    self.adapter(adapter_id)
    current = self.catalog.tag_revision(adapter_id, tag)
    if current is None:
      raise UnknownRefError(
          f"adapter {adapter_id!r} has no tag {tag!r} to roll back; tag a "
          "revision first")
    if to is None:
      moves = [e for e in self.catalog.tag_events(adapter_id, tag)
               if e["old"] is not None and e["old"] != e["new"]]
      if not moves:
        raise RegistryError(
            f"{adapter_id}:{tag} has never pointed anywhere else; pass "
            "to=REVISION to choose the target")
      to = moves[-1]["old"]
    rev = self.resolve(f"{adapter_id}@{to}")
    with self.catalog.write() as db:
      self.catalog.set_tag(db, adapter_id, tag, rev.revision,
                           f"rollback from {current}")
    return rev

  def record_residency(self, ref_or_revision, served: int = 0, loads: int = 0
                       ) -> None:
    """Adds serving counters (called by the serving engine)."""
    rev = (ref_or_revision if isinstance(ref_or_revision, Revision) else
           self.resolve(ref_or_revision))
    for name, v in (("served", served), ("loads", loads)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidAdapterError(f"{name} must be an int >= 0, got {v!r}")
    self.catalog.add_residency(rev.adapter_id, rev.revision, served, loads)

  def residency(self, adapter_id: str) -> list[dict]:
    self.adapter(adapter_id)
    return self.catalog.residency(adapter_id)

  # --- diff, gc, verify ----------------------------------------------------

  def diff(self, ref_a: str, ref_b: str) -> dict[str, dict]:
    """Per-target norms of the effective weight deltas scale * A @ B.

    Returns:
      target -> {'norm_a', 'norm_b', 'delta' (||dW_a - dW_b||_F), 'rel'
      (delta / max(norm_a, norm_b))}, over all layers. A target one side
      lacks counts as a zero delta; shapes must agree.
    """
    (ra, wa), (rb, wb) = [(r, w if isinstance(w, AdapterWeights) else
                           w.to_lora(_layout_of(self.adapter(r.adapter_id))))
                          for r, w in self.load_many([ref_a, ref_b])]
    out = {}
    for t in ALL_TARGETS:
      if t not in wa.lora_a and t not in wb.lora_a:
        continue
      dw = []
      for w in (wa, wb):
        if t in w.lora_a:
          a = np.asarray(w.lora_a[t], np.float64)
          b = np.asarray(w.lora_b[t], np.float64)
          dw.append(w.scale * np.einsum("lir,lro->lio", a, b))
        else:
          dw.append(None)
      shape = next(d.shape for d in dw if d is not None)
      dw = [np.zeros(shape) if d is None else d for d in dw]
      if dw[0].shape != dw[1].shape:
        raise InvalidAdapterError(
            f"cannot diff {ra.ref} and {rb.ref}: target {t!r} has shapes "
            f"{dw[0].shape} and {dw[1].shape}")
      na, nb = float(np.linalg.norm(dw[0])), float(np.linalg.norm(dw[1]))
      delta = float(np.linalg.norm(dw[0] - dw[1]))
      out[t] = dict(norm_a=na, norm_b=nb, delta=delta,
                    rel=delta / max(na, nb) if max(na, nb) > 0 else 0.0)
    return out

  def gc(self, stale_after_s: float = 3600.0) -> dict:
    """Reclaims rows of publishes that died before committing.

    A pending reservation is dead when its process (same host) no longer
    exists, or it is older than `stale_after_s`. Its rows go to the free
    list and are reused by later publishes.
    """
    host, now = hostname(), catalog_lib._now()
    dead = []
    for p in self.catalog.pending():
      if p["host"] == host and p["pid"] != os.getpid():
        alive = catalog_lib.pid_alive(p["pid"])
      else:
        alive = p["pid"] == os.getpid() and p["host"] == host
      if not alive or now - p["since"] > stale_after_s:
        dead.append(p)
    with self.catalog.write() as db:
      self.catalog.release_pending(db, [p["id"] for p in dead])
    return dict(reclaimed_reservations=len(dead),
                reclaimed_rows=sum(p["stop"] - p["start"] for p in dead))

  def verify(self, batch: int = 256) -> dict:
    """Re-reads and re-hashes every revision's row.

    Returns:
      {'ok': bool, 'checked': n, 'bad': [refs whose bytes do not match]}.
    """
    revs = self.catalog.revisions()
    layouts: dict[str, RowLayout] = {}
    bad = []
    for i in range(0, len(revs), batch):
      chunk = revs[i:i + batch]
      for r in chunk:
        if r.adapter_id not in layouts:
          layouts[r.adapter_id] = _layout_of(self.adapter(r.adapter_id))
      rows = self.store.read_rows_many(
          [(r.array_key, layouts[r.adapter_id], r.row) for r in chunk])
      bad += [r.ref for r, row in zip(chunk, rows)
              if row_sha256(row) != r.sha256]
    return dict(ok=not bad, checked=len(revs), bad=bad)


@functools.lru_cache(maxsize=256)
def _info_json(spec_json: str) -> AdapterInfo:
  return AdapterInfo.from_any(json.loads(spec_json))


@functools.lru_cache(maxsize=256)
def _layout_json(layout_json: str) -> RowLayout:
  return RowLayout.from_dict(json.loads(layout_json))


def _info_of(rec: dict) -> AdapterInfo:
  """The adapter's parsed spec; cached by JSON (many adapters share one)."""
  return _info_json(rec["spec_json"])


def _layout_of(rec: dict) -> RowLayout:
  return _layout_json(rec["layout_json"])
