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

Saving: `save_state` and `save_weights_for_sampler` publish a registry
revision of the tenant's adapter (provenance: kind, name, session, optimizer
steps) and point a tag at it ('state-<name>' / 'sampler-<name>'). A state
also writes the slot's Adam moments and step counter beside the registry
(`<state_dir>/optimizer/<id>@<rev>.npz`, its sha256 in the provenance), so
`load_state_with_optimizer` resumes bit for bit. Tinker paths name them:
'tinker://<model_id>/weights/<name>' and '.../sampler_weights/<name>'.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import ALL_TARGETS, AdapterInfo, AdapterWeights, BankSpec
from mintjax.model.base import BaseModel
from mintjax.store.registry import Registry
from mintjax.train import losses
from mintjax.train import optimizer as opt_lib
from mintjax.train import split_step
from mintjax.train.cohort import init_adapter

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


class UserError(ValueError):
  """A request the service refuses; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Shapes and policies of the trainer.

  Attributes:
    num_slots: training adapters held at once (the bank adds slot 0).
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
  """One training client: its Tinker model id, registry id and bank slot."""

  model_id: str
  adapter_id: str
  slot: int
  rank: int
  targets: tuple[str, ...]
  session_id: str
  optim_steps: int = 0


@dataclasses.dataclass
class _Op:
  kind: str
  tenant: Tenant
  payload: Any
  future: concurrent.futures.Future


def parse_tinker_path(path: str) -> tuple[str, str, str]:
  """'tinker://<id>/weights/<name>' -> (id, 'state' | 'sampler', name)."""
  if not isinstance(path, str) or not path.startswith("tinker://"):
    raise UserError(f"checkpoint path {path!r} must look like "
                    "'tinker://<model_id>/weights/<name>'")
  parts = path[len("tinker://"):].split("/")
  kinds = {"weights": "state", "sampler_weights": "sampler"}
  if len(parts) != 3 or parts[1] not in kinds or not parts[2]:
    raise UserError(f"checkpoint path {path!r} must look like "
                    "'tinker://<model_id>/weights/<name>' or "
                    "'tinker://<model_id>/sampler_weights/<name>'")
  return parts[0], kinds[parts[1]], parts[2]


def tag_of(kind: str, name: str) -> str:
  return f"{kind}-{name}"


def adapter_id_of(model_id: str) -> str:
  """Tinker model id ('<session>:train:<n>') -> registry adapter id."""
  return model_id.replace(":", ".")


def registry_ref(path: str) -> str:
  """A tinker:// checkpoint path -> the registry ref of its revision."""
  model_id, kind, name = parse_tinker_path(path)
  return f"{adapter_id_of(model_id)}:{tag_of(kind, name)}"


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
    self._free = list(range(1, self.spec.num_slots))
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
      if not self._free:
        raise UserError(
            f"all {self.config.num_slots} training slots are taken; unload a "
            "model or restart the service with a larger "
            "--config.trainer.num_slots")
      if model_id in self.tenants:
        raise UserError(f"model {model_id!r} already exists")
      self.registry.create_adapter(adapter_id_of(model_id), spec=info,
                                   base_fingerprint=self.base.fingerprint,
                                   owner=owner, config=self.base.config)
      t = Tenant(model_id, adapter_id_of(model_id), self._free.pop(0), rank,
                 tuple(targets), session_id)
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

  # --- operations (worker thread only) --------------------------------------

  def _write_tenant(self, t: Tenant, weights: AdapterWeights,
                    opt_slot: dict | None) -> None:
    """Puts weights (and optimizer state, or zeros) into the tenant's slot."""
    self.bank = bank_lib.write_slot(self.bank, t.slot, weights,
                                    self.base.config, self.spec)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype),
                         (self.opt.mu, self.opt.nu))
    mu, nu = (opt_slot["mu"], opt_slot["nu"]) if opt_slot else zeros
    count = np.int32(opt_slot["count"] if opt_slot else 0)
    self.opt = opt_lib.SlotOptState(
        mu=_put_slot(self.opt.mu, jnp.int32(t.slot), mu),
        nu=_put_slot(self.opt.nu, jnp.int32(t.slot), nu),
        count=self.opt.count.at[t.slot].set(count))
    self.grads = _put_slot(self.grads, jnp.int32(t.slot), zeros[0])
    for tgt in ALL_TARGETS:
      self.target_mask[tgt][t.slot] = float(tgt in weights.targets)

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
        opt_slot = self._read_optimizer(loaded.revision)
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
      w = bank_lib.read_slot(jax.device_get(self.bank), t.slot,
                             alpha=self.config.alpha)
      w = AdapterWeights({k: w.lora_a[k] for k in t.targets},
                         {k: w.lora_b[k] for k in t.targets}, rank=w.rank,
                         alpha=w.alpha)
      prov = dict(provenance, tinker_kind=kind, tinker_name=name,
                  session_id=t.session_id, steps=t.optim_steps,
                  model_id=t.model_id,
                  data_fingerprint=f"tinker:{t.model_id}:{t.optim_steps}")
      extra = None
      if kind == "state":
        extra = self._optimizer_slot(t.slot)
      rev = self.registry.publish(t.adapter_id, w, provenance=prov)
      if extra is not None:
        self._write_optimizer(rev, extra)
      self.registry.tag(rev.ref, tag_of(kind, name), reason=f"tinker {kind}")
      folder = "weights" if kind == "state" else "sampler_weights"
      out.append({"path": f"tinker://{t.model_id}/{folder}/{name}",
                  "revision": rev.ref})
    return out

  # --- optimizer state files ------------------------------------------------

  def _optimizer_slot(self, slot: int) -> dict:
    host = jax.device_get((self.opt.mu, self.opt.nu, self.opt.count))
    pick = lambda tree: jax.tree.map(lambda x: np.asarray(x[slot]), tree)
    return {"mu": pick(host[0]), "nu": pick(host[1]),
            "count": int(host[2][slot])}

  def _optimizer_file(self, ref: str) -> str:
    return os.path.join(self.state_dir, "optimizer",
                        ref.replace("@", "_at_") + ".npz")

  def _write_optimizer(self, rev, slot_state: dict) -> None:
    flat = {"count": np.int64(slot_state["count"])}
    for which in ("mu", "nu"):
      for side, tree in slot_state[which].items():
        for tgt, x in tree.items():
          flat[f"{which}/{side}/{tgt}"] = x
    path = self._optimizer_file(rev.ref)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    with open(path + ".sha256", "w", encoding="utf-8") as f:
      f.write(digest)

  def _read_optimizer(self, rev) -> dict:
    path = self._optimizer_file(rev.ref)
    if not os.path.exists(path):
      raise UserError(f"checkpoint {rev.ref} has no optimizer state (it was "
                      "saved for sampling); use load_state without optimizer")
    with open(path, "rb") as f:
      data = f.read()
    with open(path + ".sha256", encoding="utf-8") as f:
      want = f.read().strip()
    if hashlib.sha256(data).hexdigest() != want:
      raise RuntimeError(f"optimizer state of {rev.ref} fails its checksum "
                         f"({path}); it was modified after saving")
    with np.load(path) as z:
      out = {"mu": {}, "nu": {}, "count": int(z["count"])}
      for key in z.files:
        if key == "count":
          continue
        which, side, tgt = key.split("/")
        out[which].setdefault(side, {})[tgt] = z[key]
    return out


def adam_payload(params: dict) -> dict:
  """The SDK's AdamParams JSON -> the per-slot fields `_do_optim` sets."""
  names = {"learning_rate": "learning_rate", "beta1": "beta1",
           "beta2": "beta2", "eps": "eps", "weight_decay": "weight_decay",
           "grad_clip_norm": "grad_clip_norm"}
  out = {}
  for k, v in params.items():
    if k == "type":
      if v not in ("adam", "adamw"):
        raise UserError(f"optimizer {v!r} is not supported; use AdamParams")
      continue
    if k not in names:
      raise UserError(f"unknown Adam parameter {k!r}; known: {sorted(names)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
      raise UserError(f"Adam parameter {k} must be a finite number, got {v!r}")
    out[names[k]] = float(v)
  if out.get("learning_rate", 0.0) < 0:
    raise UserError("learning_rate must be >= 0")
  for k in ("beta1", "beta2"):
    if k in out and not 0 <= out[k] < 1:
      raise UserError(f"{k} must be in [0, 1), got {out[k]}")
  return out


def datum_rows(data, loss_fn: str, config: dict, *, vocab: int, max_len: int,
               forward_only: bool) -> list[dict]:
  """Decoded datums -> per-row host arrays; refuses bad input (UserError)."""
  try:
    kind = losses.loss_code(loss_fn)
  except ValueError as e:
    raise UserError(f"{e} (custom losses run client-side through "
                    "forward_backward_custom)") from None
  lo_default = config.get("clip_low_threshold", losses.PPO_CLIP_DEFAULT[0])
  hi_default = config.get("clip_high_threshold", losses.PPO_CLIP_DEFAULT[1])
  unknown = set(config) - {"clip_low_threshold", "clip_high_threshold"}
  if unknown:
    raise UserError(f"unknown loss_fn_config keys {sorted(unknown)}; known: "
                    "clip_low_threshold, clip_high_threshold")
  if not data:
    raise UserError("forward_backward got no data; send at least one Datum")
  rows = []
  for i, d in enumerate(data):
    tokens = np.asarray(d.tokens).astype(np.int64)
    m = len(tokens)
    if not 0 < m <= max_len:
      raise UserError(f"datum {i} has {m} input tokens; this service takes "
                      f"1..{max_len} (--config.trainer.max_len)")
    if tokens.min() < 0 or tokens.max() >= vocab:
      raise UserError(f"datum {i} has token ids outside [0, {vocab})")
    inp = d.inputs

    def get(name, default=None, _i=i, _inp=inp, _m=m):
      x = _inp.get(name)
      if x is None:
        if default is None:
          raise UserError(f"datum {_i}: loss_fn {loss_fn!r} needs "
                          f"loss_fn_inputs[{name!r}]")
        return np.full(_m, default, np.float32)
      x = np.asarray(x).reshape(-1)
      if len(x) != _m:
        raise UserError(f"datum {_i}: loss_fn_inputs[{name!r}] has {len(x)} "
                        f"entries but model_input has {_m} tokens; give one "
                        "per input token")
      return x
    targets = get("target_tokens")
    if targets.min() < 0 or targets.max() >= vocab:
      raise UserError(f"datum {i}: target_tokens outside [0, {vocab})")
    known = {"target_tokens", "weights", "advantages", "logprobs",
             "clip_low_threshold", "clip_high_threshold", "mask"}
    extra = set(inp) - known
    if extra:
      raise UserError(f"datum {i}: unknown loss_fn_inputs {sorted(extra)}; "
                      f"known: {sorted(known)}")
    rl = kind != 0
    rows.append(dict(
        tokens=tokens.astype(np.int32), targets=targets.astype(np.int32),
        weights=get("weights", 1.0).astype(np.float32),
        advantages=(get("advantages") if rl else get("advantages", 0.0)
                    ).astype(np.float32),
        sampling_logprobs=(get("logprobs") if rl else get("logprobs", 0.0)
                           ).astype(np.float32),
        clip_low=get("clip_low_threshold", lo_default).astype(np.float32),
        clip_high=get("clip_high_threshold", hi_default).astype(np.float32),
        kind=kind, forward_only=forward_only))
  return rows
