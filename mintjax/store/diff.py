"""How far apart two stored revisions are: per-target weight-delta norms.

Owns `diff_revisions`, used by `python -m tools.mint diff` (and kept
reachable as `Registry.diff`). It compares the effective weight deltas
dW[t] = scale * A[t] @ B[t] ([L, d_in, d_out] per target) of two
revisions, after each family turns its stored form into LoRA factors (so a
VeRA adapter is compared on its materialised factors). Reads only; no
state changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mintjax.adapters.spec import ALL_TARGETS
from mintjax.store import records
from mintjax.store.errors import InvalidAdapterError


def diff_revisions(registry: Any, ref_a: str, ref_b: str
                   ) -> dict[str, dict]:
  """Per-target norms of the effective weight deltas scale * A @ B.

  Args:
    registry: a `mintjax.store.registry.Registry`.
    ref_a, ref_b: references ('alice@2', 'alice:prod', ...).

  Returns:
    target -> {'norm_a', 'norm_b', 'delta' (||dW_a - dW_b||_F), 'rel'
    (delta / max(norm_a, norm_b))}, over all layers. A target one side
    lacks counts as a zero delta; shapes must agree.

  Raises:
    InvalidAdapterError: the two revisions' shapes differ for a target.
  """
  (ra, wa), (rb, wb) = [
      (rev, records.info_of(rec).family.to_lora(
          w, records.layout_of(rec).shapes))
      for rev, w in registry.load_many([ref_a, ref_b])
      for rec in [registry.adapter(rev.adapter_id)]]
  out = {}
  for t in ALL_TARGETS:
    if t not in wa.lora_a and t not in wb.lora_a:
      continue
    dw = [_delta(w, t) for w in (wa, wb)]
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


def _delta(weights, target: str) -> np.ndarray | None:
  """scale * A @ B of one target in float64: [L, d_in, d_out], or None."""
  if target not in weights.lora_a:
    return None
  a = np.asarray(weights.lora_a[target], np.float64)
  b = np.asarray(weights.lora_b[target], np.float64)
  return weights.scale * np.einsum("lir,lro->lio", a, b)
