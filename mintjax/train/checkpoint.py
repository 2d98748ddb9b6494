"""Train-state checkpoints with Orbax: bank, optimizer, data iterator, slots.

Owns `TrainCheckpointer`, a thin layer over `ocp.CheckpointManager` that
saves, at a global step, the adapter bank and per-slot optimizer state
(sharded arrays, `StandardSave`) together with a JSON record of the run's
position: cohort index, step within the cohort, the data iterator's state
and the slot -> user map. Saves are asynchronous; only finalized
checkpoints (Orbax commits them atomically) are ever restored, so killing a
run mid-save resumes from the previous one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mintjax.adapters.bank import AdapterBank
from mintjax.train.optimizer import SlotOptState


class CheckpointMismatchError(ValueError):
  """A checkpoint does not belong to the run trying to resume from it."""


class TrainCheckpointer:
  """Saves and restores the train state under `<workdir>/checkpoints`.

  Args:
    workdir: run directory.
    max_to_keep: checkpoints kept on disk.
    async_save: write in the background (wait with `wait()`).
  """

  def __init__(self, workdir: str, max_to_keep: int = 2,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, bank: AdapterBank, opt_state: SlotOptState,
           meta: dict[str, Any], force: bool = False) -> bool:
    """Starts saving (async). `meta` must be JSON-serialisable.

    Returns:
      True if a save was started.
    """
    return self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"bank": bank, "opt": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, bank_like: AdapterBank,
              opt_like: SlotOptState, expect: dict[str, Any] | None = None
              ) -> tuple[AdapterBank, SlotOptState, dict]:
    """Restores step `step` onto the shardings of `bank_like`/`opt_like`.

    Args:
      step: a saved step.
      bank_like, opt_like: arrays (or ShapeDtypeStructs with shardings)
        giving the target shapes, dtypes and shardings.
      expect: meta keys that must match (e.g. the run fingerprint).

    Raises:
      CheckpointMismatchError: a key of `expect` differs.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None)),
        {"bank": bank_like, "opt": opt_like})
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    for k, v in (expect or {}).items():
      if meta.get(k) != v:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory} step {step} has {k}={meta.get(k)!r}"
            f", this run has {v!r}; use a fresh --workdir for a different "
            "configuration or data")
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    return out["bank"], out["opt"], meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
