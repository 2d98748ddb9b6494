"""The training side of the Tinker service: many clients, one compiled step.

Owns `TrainerConfig`, `Tenant` (one training client's adapter: its registry
id, bank slot, rank and targets) and `Trainer`, which holds the device state
(base params, a LoRA bank of `num_slots + 1` slots, per-slot Adam state and a
gradient accumulator) and a worker thread that runs every device call.

Batching across clients: each tenant has a FIFO of operations (its requests
run in the order it sent them). The worker waits for work, then until every
client whose next request is due (its last one finished less than three of
its usual turnarounds ago) has one queued, at most `batch_window_s`, then takes
the head operation of every tenant's queue: all forward-backward heads run as
ONE call of the compiled multi-tenant forward-backward (rows of every tenant
in one batch), all optim heads as ONE call of the per-slot Adam step.
`stats()` reports how many tenants shared each call (the batching ratio).

Slots: there may be more tenants than bank slots. A round takes at most
`num_slots` tenants (those waiting longest first); a tenant that is not
resident gets a free slot, or the least recently used tenant outside the
round (idle ones first) is evicted: its weights are published as a registry
revision (provenance tinker_kind='evicted') and its Adam moments, step
counter and pending gradient go to a state file (`slots.py`), all read back
bit for bit into whichever slot it gets on its next request.

Saving: `save_state` and `save_weights_for_sampler` publish a registry
revision of the tenant's adapter (provenance: kind, name, session, optimizer
steps) and point a tag at it ('state-<name>' / 'sampler-<name>'). A state
also writes the slot's Adam moments and step counter beside the registry
(`<state_dir>/optimizer/<id>_at_<rev>.npz`, its sha256 beside it), so
`load_state_with_optimizer` resumes bit for bit. Tinker paths name them:
'tinker://<model_id>/weights/<name>' and '.../sampler_weights/<name>'.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import ALL_TARGETS, AdapterInfo, AdapterWeights, BankSpec
from mintjax.apps.tinker_service import slots as slots_lib
from mintjax.apps.tinker_service.inputs import (UserError, adapter_id_of,
                                                registry_ref, tag_of)
from mintjax.model.base import BaseModel
from mintjax.store.registry import Registry
from mintjax.train import optimizer as opt_lib
from mintjax.train import split_step
from mintjax.train.cohort import init_adapter

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Shapes and policies of the trainer.

  Attributes:
    num_slots: training adapters held in the bank at once (the bank adds
      slot 0); more clients than this take turns (LRU eviction).
    max_rank: bank rank; clients may ask for any rank up to it.
    alpha: LoRA alpha (scale alpha / rank), as Tinker uses.
    max_len: longest datum in tokens.
    max_rows: rows per forward-backward call (more rows: several calls).
    batch_window_s: the longest the worker waits, once a request has
      arrived, for the other recently active clients' requests.
    active_window_s: the longest a client is waited for after its last
      request finished (3 of its usual turnarounds, at most this).
    lora_impl: gather-LoRA implementation.
    seed: adapter initialisation seed (a client's LoraConfig.seed wins).
  """

  num_slots: int = 16
  max_rank: int = 32
  alpha: float = 32.0
  max_len: int = 256
  max_rows: int = 64
  batch_window_s: float = 1.0
  active_window_s: float = 1.0
  lora_impl: str = "auto"
  seed: int = 0


@dataclasses.dataclass
class Tenant:
  """One training client: its Tinker model id, registry id and bank slot
  (None while evicted; `saved_ref` then names the revision holding it)."""

  model_id: str
  adapter_id: str
  rank: int
  targets: tuple[str, ...]
  session_id: str
  slot: int | None = None
  saved_ref: str | None = None
  optim_steps: int = 0


@dataclasses.dataclass
class _Op:
  kind: str
  tenant: Tenant
  payload: Any
  future: concurrent.futures.Future
  queued_at: float = dataclasses.field(default_factory=time.monotonic)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_slot(tree, slot, values):
  return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(
      x, v.astype(x.dtype), slot, 0), tree, values)


def _pow2(n: int, lo: int, hi: int) -> int:
  b = lo
  while b < n:
    b *= 2
  return min(b, hi)


class LockedRegistry:
  """A registry whose calls are serialised: the trainer's worker publishes
  while HTTP threads resolve and the scorer loads, through one handle."""

  def __init__(self, registry: Registry):
    self._registry = registry
    self._lock = threading.RLock()

  def __getattr__(self, name):
    fn = getattr(self._registry, name)
    if not callable(fn):
      return fn

    def locked(*args, **kwargs):
      with self._lock:
        return fn(*args, **kwargs)
    return locked


class Trainer:
  """Tenants' adapters in one bank; their requests batched (module doc)."""

  def __init__(self, base: BaseModel, registry: Registry, *, base_name: str,
               state_dir: str, config: TrainerConfig = TrainerConfig()):
    self.base, self.config = base, config
    self.registry = LockedRegistry(registry)
    self.base_name = base_name
    self.state_dir = state_dir
    os.makedirs(os.path.join(state_dir, "optimizer"), exist_ok=True)
    mc = base.config
    self.spec = BankSpec(targets=ALL_TARGETS, max_rank=config.max_rank,
                         num_slots=config.num_slots + 1, dtype="float32")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.params = jax.device_put(base.params, dev)
    self.bank = bank_lib.init_bank(mc, self.spec, sharding=dev)
    self.opt = opt_lib.init_opt_state(self.bank)
    self.grads = split_step.zero_grads(self.bank)
    self.steps = split_step.make_split_steps(mc, config.lora_impl)
    self.target_mask = {t: np.zeros(self.spec.num_slots, np.float32)
                        for t in ALL_TARGETS}
    self.tenants: dict[str, Tenant] = {}
    self.slots = slots_lib.SlotTable(config.num_slots)
    self._queues: dict[str, collections.deque] = {}
    # Turnaround tracking: when each client's last request finished, and how
    # long it usually takes to send the next one.
    self._done_at: dict[str, float] = {}
    self._turnaround: dict[str, float] = {}
    self._cv = threading.Condition()
    self._closed = False
    self._stats = collections.Counter()
    self._thread = threading.Thread(target=self._run, name="tinker-trainer",
                                    daemon=True)
    self._thread.start()

  # --- tenants --------------------------------------------------------------

  def create_tenant(self, model_id: str, *, rank: int, targets, session_id:
                    str, seed: int | None = None, owner: str = ""
                    ) -> concurrent.futures.Future:
    """Registers a new adapter identity and queues its initialisation."""
    if not isinstance(rank, int) or not 1 <= rank <= self.config.max_rank:
      raise UserError(f"lora rank {rank!r} is not served: this service's bank "
                      f"has max_rank {self.config.max_rank}; ask for a rank "
                      f"in 1..{self.config.max_rank} or restart it with "
                      "--config.trainer.max_rank")
    if not targets:
      raise UserError("train_attn and train_mlp are both false: nothing to "
                      "train; enable at least one")
    info = AdapterInfo(tuple(targets), rank, self.config.alpha)
    with self._cv:
      if model_id in self.tenants:
        raise UserError(f"model {model_id!r} already exists")
      self.registry.create_adapter(adapter_id_of(model_id), spec=info,
                                   base_fingerprint=self.base.fingerprint,
                                   owner=owner, config=self.base.config)
      t = Tenant(model_id, adapter_id_of(model_id), rank, tuple(targets),
                 session_id)
      self.tenants[model_id] = t
      self._queues[model_id] = collections.deque()
    weights = init_adapter(self.base.config, t.targets, rank,
                           self.config.alpha, t.adapter_id,
                           self.config.seed if seed is None else seed)
    return self.submit(model_id, "init", (weights, None))

  def tenant(self, model_id: str) -> Tenant:
    t = self.tenants.get(model_id)
    if t is None:
      raise UserError(f"unknown model_id {model_id!r}; create it with "
                      "create_lora_training_client first")
    return t

  def submit(self, model_id: str, kind: str, payload=None
             ) -> concurrent.futures.Future:
    """Queues one operation of a tenant; its result arrives in the future."""
    fut = concurrent.futures.Future()
    with self._cv:
      if self._closed:
        raise UserError("the service is shutting down")
      self._queues[model_id].append(_Op(kind, self.tenant(model_id), payload,
                                        fut))
      now = time.monotonic()
      done = self._done_at.pop(model_id, None)
      if done is not None:
        # One long gap (the client paused, or waited for others) may only
        # double the estimate: idle time must not read as a slow loop.
        old = self._turnaround.get(model_id, 0.1)
        self._turnaround[model_id] = min(now - done, 2 * old)
      self._cv.notify()
    return fut

  def precompile(self, length: int) -> None:
    """Compiles the forward-backward for every row bucket at `length`.

    Call before any client is served (it uses the device state directly):
    padding rows of slot 0 leave the accumulator and every slot unchanged.
    """
    row = dict(tokens=np.zeros(length, np.int32),
               targets=np.zeros(length, np.int32), weights=0.0,
               advantages=0.0, sampling_logprobs=0.0, clip_low=0.0,
               clip_high=0.0, kind=0, forward_only=True)
    b = min(8, self.config.max_rows)
    while True:
      self.grads, _, loss = self.steps.forward_backward(
          self.params, self.bank, self.grads, self._pack([(0, row)] * b))
      jax.block_until_ready(loss)
      if b >= self.config.max_rows:
        return
      b = min(2 * b, self.config.max_rows)

  def stats(self) -> dict:
    s = dict(self._stats)
    for kind in ("fwdbwd", "optim"):
      calls = s.get(f"{kind}_calls", 0)
      s[f"{kind}_clients_per_call"] = (s.get(f"{kind}_ops", 0) / calls
                                       if calls else 0.0)
    return s

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._cv.notify()
    self._thread.join(30)

  # --- the worker -----------------------------------------------------------

  def _run(self) -> None:
    while True:
      with self._cv:
        while not self._closed and not any(self._queues.values()):
          self._cv.wait()
        if self._closed:
          for q in self._queues.values():
            for op in q:
              op.future.set_exception(UserError("the service shut down"))
          return
        # Let the other clients' requests of this round arrive: wait until
        # every recently active client has one queued, at most the window.
        deadline = time.monotonic() + self.config.batch_window_s
        while not self._closed:
          now = time.monotonic()
          if now >= deadline or all(
              self._queues[m] for m in self._expected(now)):
            break
          self._cv.wait(deadline - now)
        heads = [q.popleft() for q in self._queues.values() if q]
        # Clients one phase behind (an optim step still queued) go first and
        # the others' forward-backwards wait a round: so the clients fall
        # back into step and share the next calls instead of splitting
        # into two groups that alternate for ever.
        if any(op.kind == "optim" for op in heads):
          for op in heads:
            if op.kind == "fwdbwd":
              self._queues[op.tenant.model_id].appendleft(op)
          heads = [op for op in heads if op.kind != "fwdbwd"]
        # At most num_slots tenants a round, those waiting longest first.
        heads.sort(key=lambda op: op.queued_at)
        for op in heads[self.config.num_slots:]:
          self._queues[op.tenant.model_id].appendleft(op)
        heads = heads[:self.config.num_slots]
        queued = {m for m, q in self._queues.items() if q}
      try:
        self._make_resident([op.tenant for op in heads], queued)
      except Exception as e:  # pylint: disable=broad-except
        for op in heads:  # the worker must outlive a failed eviction
          op.future.set_exception(RuntimeError(
              f"could not give {op.tenant.model_id} a slot: "
              f"{type(e).__name__}: {e}"))
        continue
      by_kind = collections.defaultdict(list)
      for op in heads:
        by_kind[op.kind].append(op)
      for kind in ("init", "load", "fwdbwd", "optim", "save"):
        ops = by_kind.pop(kind, [])
        if ops:
          t0 = time.perf_counter()
          self._guarded(getattr(self, "_do_" + kind), ops)
          self._stats[f"{kind}_seconds"] += time.perf_counter() - t0
      for ops in by_kind.values():
        for op in ops:
          op.future.set_exception(UserError(f"unknown operation {op.kind}"))

  def _expected(self, now: float) -> list[str]:
    """Clients whose next request is due: their last one finished less than
    3 typical turnarounds (+50 ms, at most `active_window_s`) ago. A client
    that stopped, or went off to sample, stops being waited for quickly."""
    out = []
    for m, done in self._done_at.items():
      allowance = min(self.config.active_window_s,
                      3 * self._turnaround.get(m, 0.1) + 0.05)
      if now - done < allowance:
        out.append(m)
    return out

  def _guarded(self, fn: Callable, ops: list[_Op]) -> None:
    try:
      results = fn(ops)
    except UserError as e:
      for op in ops:
        op.future.set_exception(e)
      return
    except Exception as e:  # pylint: disable=broad-except
      for op in ops:  # the worker must outlive any one bad batch
        op.future.set_exception(RuntimeError(f"{type(e).__name__}: {e}"))
      return
    now = time.monotonic()
    with self._cv:
      for op in ops:
        # Training loops alternate forward-backward and optim steps; a
        # client is due again only after one of those (not after creation
        # or a save, which a loop does not answer at once).
        if op.kind in ("fwdbwd", "optim") and not self._queues[
            op.tenant.model_id]:
          self._done_at[op.tenant.model_id] = now
    for op, r in zip(ops, results):
      op.future.set_result(r)

  # --- slots (worker thread only) -------------------------------------------

  def _make_resident(self, tenants: list[Tenant], queued: set[str]) -> None:
    """Gives every tenant of a round a slot, evicting LRU tenants outside
    the round (idle first) when no slot is free; reloads evicted ones."""
    keep = {t.model_id for t in tenants}
    for t in tenants:
      if t.slot is None:
        slot = self.slots.take_free()
        if slot is None:
          victim = self.tenants[self.slots.victim(keep=keep, queued=queued)]
          slot = self._evict(victim)
        self.slots.assign(slot, t.model_id)
        t.slot = slot
        if t.saved_ref is not None:  # back from eviction
          loaded = self.registry.load(t.saved_ref,
                                      expect_base=self.base.fingerprint)
          state = slots_lib.read_state_file(
              slots_lib.state_file(self.state_dir, t.saved_ref), t.saved_ref)
          self._write_tenant(t, loaded.weights, state)
          t.saved_ref = None
          self._stats["reloads"] += 1
      self.slots.touch(t.model_id)

  def _evict(self, t: Tenant) -> int:
    """Saves a tenant's slot (weights, Adam state, pending gradient) and
    frees it; returns the slot."""
    prov = dict(tinker_kind="evicted", session_id=t.session_id,
                steps=t.optim_steps, model_id=t.model_id,
                data_fingerprint=f"tinker:{t.model_id}:{t.optim_steps}")
    state = self._slot_state(t.slot, with_grads=True)
    rev = self.registry.publish(t.adapter_id, self._slot_weights(t),
                                provenance=prov)
    slots_lib.write_state_file(
        slots_lib.state_file(self.state_dir, rev.ref), state)
    slot, t.slot, t.saved_ref = t.slot, None, rev.ref
    self.slots.release(slot)
    self._stats["evictions"] += 1
    return self.slots.take_free()

  def _slot_weights(self, t: Tenant) -> AdapterWeights:
    # read_slot indexes the device arrays: only this slot comes to the host.
    w = bank_lib.read_slot(self.bank, t.slot, alpha=self.config.alpha)
    return AdapterWeights({k: w.lora_a[k] for k in t.targets},
                          {k: w.lora_b[k] for k in t.targets}, rank=w.rank,
                          alpha=w.alpha)

  def _slot_state(self, slot: int, *, with_grads: bool) -> dict:
    """A slot's Adam moments and counter (+ its gradient accumulator)."""
    # Index on the device, so one slot's rows (not every slot's) come over.
    pick = lambda tree: jax.device_get(jax.tree.map(lambda x: x[slot], tree))
    out = {"mu": pick(self.opt.mu), "nu": pick(self.opt.nu),
           "count": int(self.opt.count[slot])}
    if with_grads:
      out["grads"] = pick(self.grads)
    return out

  def _write_tenant(self, t: Tenant, weights: AdapterWeights,
                    state: dict | None) -> None:
    """Rewrites the tenant's slot in full: weights, Adam moments, counter,
    gradient accumulator and target mask (the saved `state`, else zeros),
    so nothing of the slot's previous holder survives."""
    self.bank = bank_lib.write_slot(self.bank, t.slot, weights,
                                    self.base.config, self.spec)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype),
                         (self.opt.mu, self.opt.nu))
    mu, nu = (state["mu"], state["nu"]) if state else zeros
    grads = (state or {}).get("grads") or zeros[0]
    count = np.int32(state["count"] if state else 0)
    self.opt = opt_lib.SlotOptState(
        mu=_put_slot(self.opt.mu, jnp.int32(t.slot), mu),
        nu=_put_slot(self.opt.nu, jnp.int32(t.slot), nu),
        count=self.opt.count.at[t.slot].set(count))
    self.grads = _put_slot(self.grads, jnp.int32(t.slot), grads)
    for tgt in ALL_TARGETS:
      self.target_mask[tgt][t.slot] = float(tgt in weights.targets)

  # --- operations (worker thread only) --------------------------------------

  def _do_init(self, ops: list[_Op]) -> list:
    for op in ops:
      self._write_tenant(op.tenant, op.payload[0], op.payload[1])
    return [{"model_id": op.tenant.model_id} for op in ops]

  def _do_load(self, ops: list[_Op]) -> list:
    out = []
    for op in ops:
      path, with_optimizer = op.payload
      loaded = self.registry.load(registry_ref(path),
                                  expect_base=self.base.fingerprint)
      t = op.tenant
      w = loaded.weights
      if w.rank != t.rank or set(w.targets) != set(t.targets):
        raise UserError(
            f"checkpoint {path} has rank {w.rank} on {w.targets} but model "
            f"{t.model_id} has rank {t.rank} on {t.targets}; load it into a "
            "client created with create_training_client_from_state")
      opt_slot = None
      if with_optimizer:
        ref = loaded.revision.ref
        opt_slot = slots_lib.read_state_file(
            slots_lib.state_file(self.state_dir, ref), ref)
        if opt_slot is None:
          raise UserError(f"checkpoint {ref} has no optimizer state (it was "
                          "saved for sampling); use load_state without "
                          "optimizer")
      self._write_tenant(t, w, opt_slot)
      if opt_slot is not None:
        t.optim_steps = int(opt_slot["count"])
      out.append({"path": path, "model_id": t.model_id,
                  "type": "load_weights"})
    return out

  def _do_fwdbwd(self, ops: list[_Op]) -> list:
    rows = []  # (op index, datum index, row arrays)
    for i, op in enumerate(ops):
      for j, r in enumerate(op.payload["rows"]):
        rows.append((i, j, op.tenant.slot, r))
    per_op = [[None] * len(op.payload["rows"]) for op in ops]
    cap = self.config.max_rows
    for k in range(0, len(rows), cap):
      chunk = rows[k:k + cap]
      batch = self._pack([(slot, r) for _, _, slot, r in chunk])
      self.grads, logp_bt, loss_bt = self.steps.forward_backward(
          self.params, self.bank, self.grads, batch)
      logp_bt, loss_bt = np.asarray(logp_bt), np.asarray(loss_bt)
      for n, (i, j, _, r) in enumerate(chunk):
        t = len(r["tokens"])
        per_op[i][j] = (logp_bt[n, :t].copy(), loss_bt[n, :t].copy())
      self._stats["fwdbwd_calls"] += 1
      self._stats["fwdbwd_ops"] += len({i for i, *_ in chunk})
      self._stats["fwdbwd_rows"] += len(chunk)
      self._stats["fwdbwd_tokens"] += sum(len(r["tokens"]) for *_, r in chunk)
    return [dict(logprobs=[p for p, _ in res],
                 elementwise_loss=[l for _, l in res],
                 loss_sum=float(sum(l.sum() for _, l in res)))
            for res in per_op]

  def _pack(self, rows: list[tuple[int, dict]]) -> split_step.TokenBatch:
    """Rows of one call -> a (B, T)-bucketed TokenBatch (padding: slot 0)."""
    n = len(rows)
    t_max = max(len(r["tokens"]) for _, r in rows)
    b = _pow2(n, min(8, self.config.max_rows), self.config.max_rows)
    t = _pow2(t_max, 16, self.config.max_len)
    z = lambda dt: np.zeros((b, t), dt)
    arr = dict(tokens=z(np.int32), targets=z(np.int32), positions=z(np.int32),
               segment_ids=z(np.int32), weights=z(np.float32),
               advantages=z(np.float32), sampling_logprobs=z(np.float32),
               clip_low=z(np.float32), clip_high=z(np.float32))
    adapter_idx, kind, train = (np.zeros(b, np.int32), np.zeros(b, np.int32),
                                np.zeros(b, np.float32))
    for n_, (slot, r) in enumerate(rows):
      m = len(r["tokens"])
      for k in ("tokens", "targets", "weights", "advantages",
                "sampling_logprobs", "clip_low", "clip_high"):
        arr[k][n_, :m] = r[k]
      arr["positions"][n_, :m] = np.arange(m)
      arr["segment_ids"][n_, :m] = 1
      adapter_idx[n_], kind[n_] = slot, r["kind"]
      train[n_] = 0.0 if r["forward_only"] else 1.0
    return split_step.TokenBatch(adapter_idx=adapter_idx, loss_kind=kind,
                                 train=train, **arr)

  def _do_optim(self, ops: list[_Op]) -> list:
    s = self.spec.num_slots
    hp = dict(learning_rate=np.zeros(s, np.float32),
              beta1=np.full(s, 0.9, np.float32),
              beta2=np.full(s, 0.95, np.float32),
              eps=np.full(s, 1e-12, np.float32),
              weight_decay=np.zeros(s, np.float32),
              grad_clip_norm=np.zeros(s, np.float32))
    active = np.zeros(s, bool)
    for op in ops:
      slot = op.tenant.slot
      active[slot] = True
      for k, v in op.payload.items():
        hp[k][slot] = v
    self.bank, self.opt, self.grads, metrics = self.steps.optim_step(
        self.bank, self.opt, self.grads, split_step.OptimParams(**hp),
        active, {t: m.copy() for t, m in self.target_mask.items()})
    norms = np.asarray(metrics["grad_norm"])
    self._stats["optim_calls"] += 1
    self._stats["optim_ops"] += len(ops)
    out = []
    for op in ops:
      op.tenant.optim_steps += 1
      out.append({"metrics": {
          "grad_norm:mean": float(norms[op.tenant.slot]),
          "optim_step:sum": float(op.tenant.optim_steps)}})
    return out

  def _do_save(self, ops: list[_Op]) -> list:
    out = []
    for op in ops:
      t = op.tenant
      kind, name, provenance = op.payload
      w = self._slot_weights(t)
      prov = dict(provenance, tinker_kind=kind, tinker_name=name,
                  session_id=t.session_id, steps=t.optim_steps,
                  model_id=t.model_id,
                  data_fingerprint=f"tinker:{t.model_id}:{t.optim_steps}")
      extra = None
      if kind == "state":
        extra = self._slot_state(t.slot, with_grads=False)
      rev = self.registry.publish(t.adapter_id, w, provenance=prov)
      if extra is not None:
        slots_lib.write_state_file(
            slots_lib.state_file(self.state_dir, rev.ref), extra)
      self.registry.tag(rev.ref, tag_of(kind, name), reason=f"tinker {kind}")
      folder = "weights" if kind == "state" else "sampler_weights"
      out.append({"path": f"tinker://{t.model_id}/{folder}/{name}",
                  "revision": rev.ref})
    return out
