"""Ahead-of-time compilation of mintjax's real steps for a target topology.

Owns `AotRequest` (what to compile: model, topology and mesh, step, bank
shape, batch), `compile_step` (one deviceless compile and its report) and
`compile_report` (the step with adapters and the same step without them,
the LoRA overhead between them). `CHIPS` (per-chip HBM, peak bf16 FLOP/s
and HBM bandwidth with their public sources) lives in `mintjax.aot.chips`.

It compiles the very step functions the launchers run: the train step of
`mintjax.train.step.make_train_step` and the prefill/decode steps of
`mintjax.serve.steps.make_step_fns` (what `Engine` runs), over abstract
inputs (`jax.ShapeDtypeStruct` carrying the shardings the logical-axis rules
give), so no weights are needed. On a CPU host with libtpu installed,
`topology='v5e:2x4'` runs the real TPU compiler (deviceless);
`topology='cpu:N'` compiles for this host's CPU devices (tests).

Cost model. XLA's `cost_analysis()` counts the body of a `lax.scan` (the
layer stack) once, not once per layer, so its FLOP and byte totals are
reported raw and the roofline uses an analytic count of the same step
instead (`step_cost`): matmul FLOPs of the base projections, attention over
the keys the implementation actually visits, the LM head and the LoRA
shrink/expand, times the passes the step makes (train: forward, remat
recompute, backward data gradients; the base gets no weight gradient), and
the bytes of parameters, KV cache, the adapters rows read, and for training
the optimizer's read-modify-write of every slot (the per-slot AdamW touches
the whole bank each step). Step time is max(FLOPs / peak, bytes /
bandwidth) per chip for the forward/backward, plus the optimizer phase's
bytes / bandwidth (it runs after the backward pass, so it cannot overlap
its matmuls); activations' traffic and collectives are not counted.

The library never imports `launch/` or `tools/`; `tools/aot.py` is its CLI.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import lora_op
from mintjax.adapters.spec import ALL_TARGETS, BankSpec
from mintjax.aot.chips import CHIPS, GIB, Chip  # noqa: F401  (re-exported)
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model import presets
from mintjax.model.kv_cache import cache_shapes
from mintjax.serve import sampling as sampling_lib
from mintjax.serve import steps as serve_steps
from mintjax.train import optimizer as opt_lib
from mintjax.train import step as train_lib

STEPS = ("train", "prefill", "decode")


class AotError(ValueError):
  """An AOT request is invalid (bad topology, mesh, step or bank shape)."""


@dataclasses.dataclass(frozen=True)
class AotRequest:
  """One step to compile for one topology.

  Attributes:
    model: a preset name (`mintjax.model.presets`) or an HF config.json path.
    topology: 'v5e:2x4', 'v5p:4x4x4', 'v6e:4x4', 'v4:2x2x1', ... (TPU,
      deviceless; needs libtpu) or 'cpu:N' (N of this host's CPU devices).
    mesh: (data, fsdp, tensor) sizes, or (data, fsdp, expert, tensor) for
      an expert-parallel MoE model; one may be -1 (the rest).
    step: 'train', 'prefill' or 'decode'.
    slots: bank slots S (slot 0 is the null adapter).
    rank: bank max rank R.
    targets: projections carrying LoRA.
    batch: rows B (train rows, prefill prompts, decode sequences).
    seq_len: tokens per train row / prefill bucket length T.
    cache_len: serving KV cache length (prefill and decode).
    distinct: distinct adapters per batch (0: min(batch, slots - 1)); only
      the byte estimate depends on it.
    dtype: base parameter / compute dtype.
    bank_dtype: adapter factor dtype ('' = float32 to train, else `dtype`).
    remat: rematerialise layers in the train step's backward pass.
    lora_impl: gather-LoRA implementation; 'auto' = what `select_impl` picks
      for the target platform (the Pallas kernel on TPU/GPU).
    rule_set: a named rule set of `sharding.RULE_SETS` ('default',
      'slot_sharded').
    rules: logical-axis rule overrides on top of the rule set, as
      ((logical_axis, mesh_axis_or_axes), ...).
    hbm_gib: per-chip HBM override in GiB (0 = the chip table's).
  """

  model: str = "llama-3.1-8b"
  topology: str = "v5e:2x4"
  mesh: tuple[int, ...] = (1, 1, -1)
  step: str = "decode"
  slots: int = 64
  rank: int = 16
  targets: tuple[str, ...] = ALL_TARGETS
  batch: int = 64
  seq_len: int = 256
  cache_len: int = 2048
  distinct: int = 0
  dtype: str = "bfloat16"
  bank_dtype: str = ""
  remat: bool = True
  lora_impl: str = "auto"
  rule_set: str = "default"
  rules: tuple = ()
  hbm_gib: float = 0.0

  def __post_init__(self):
    if self.step not in STEPS:
      raise AotError(f"step must be one of {STEPS}, got {self.step!r}")
    if self.slots < 2 or self.rank < 1 or self.batch < 1:
      raise AotError(
          f"need slots >= 2 (slot 0 is the null adapter), rank >= 1 and "
          f"batch >= 1; got slots={self.slots}, rank={self.rank}, "
          f"batch={self.batch}")
    if len(self.mesh) not in (3, 4):
      raise AotError(f"mesh must be (data, fsdp, tensor) or (data, fsdp, "
                     f"expert, tensor), got {self.mesh}")

  def replace(self, **changes) -> "AotRequest":
    return dataclasses.replace(self, **changes)

  @property
  def chip_key(self) -> str:
    return self.topology.split(":", 1)[0].lower()

  def chip(self) -> Chip:
    try:
      chip = CHIPS[self.chip_key]
    except KeyError:
      raise AotError(
          f"unknown chip {self.chip_key!r} in topology {self.topology!r}; "
          f"known: {', '.join(CHIPS)}") from None
    if self.hbm_gib:
      chip = dataclasses.replace(chip, hbm_bytes=self.hbm_gib * GIB)
    return chip

  def model_config(self) -> ModelConfig:
    return presets.get_config(self.model, dtype=self.dtype)

  def spec(self) -> BankSpec:
    bank_dtype = self.bank_dtype or (
        "float32" if self.step == "train" else self.dtype)
    return BankSpec(targets=self.targets, max_rank=self.rank,
                    num_slots=self.slots, dtype=bank_dtype)

  def rules_dict(self) -> dict[str, Any]:
    if self.rule_set not in sharding.RULE_SETS:
      raise AotError(f"unknown rule set {self.rule_set!r}; choose one of "
                     f"{', '.join(sharding.RULE_SETS)}")
    out = dict(sharding.RULE_SETS[self.rule_set])
    for name, target in self.rules:
      if name not in out:
        raise AotError(f"rule override for unknown logical axis {name!r}; "
                       f"known: {', '.join(out)}")
      out[name] = tuple(target) if isinstance(target, list) else target
    return out

  def num_distinct(self) -> int:
    return min(self.distinct or self.batch, self.slots - 1)


def topology_devices(topology: str) -> list:
  """Devices of a topology: deviceless TPU ('v5e:2x4') or 'cpu:N'."""
  kind, _, shape = topology.partition(":")
  if kind.lower() == "cpu":
    n = int(shape or 1)
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise AotError(
          f"topology {topology!r} needs {n} CPU devices, this process has "
          f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_"
          f"count={n} before JAX starts")
    return devices[:n]
  if kind.lower() not in ("v4", "v5e", "v5p", "v6e"):
    raise AotError(
        f"topology {topology!r}: expected v4/v5e/v5p/v6e:AxB[xC] or cpu:N")
  # libtpu takes a machine-wide lock file on start-up, so a second process
  # (a test run beside a sweep) would fail; a deviceless compile never
  # touches a chip, so sharing libtpu between processes is safe here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(topology_name=topology,
                                        platform="tpu")
  except Exception as e:  # pylint: disable=broad-except  # libtpu's errors
    raise AotError(
        f"cannot describe TPU topology {topology!r} ({str(e).splitlines()[0]}"
        "); TPU compiles need libtpu: use .venv-tpu (`make tpu-venv`)"
    ) from None
  return list(topo.devices)


def _platform(devices) -> str:
  return devices[0].platform


# --- abstract inputs --------------------------------------------------------

def _abstract(shapes, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def _bytes_per_device(tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _rows(batch: int, sh) -> sampling_lib.RowSampling:
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return sampling_lib.RowSampling(
      temperature_b=s((batch,), jnp.float32), top_k_b=s((batch,), jnp.int32),
      top_p_b=s((batch,), jnp.float32), seed_b=s((batch,), jnp.uint32),
      stop_bk=s((batch, sampling_lib.MAX_STOP_TOKENS), jnp.int32),
      top_logprobs_b=s((batch,), jnp.int32))


def _train_args(req: AotRequest, cfg: ModelConfig, spec: BankSpec, mesh,
                rules, impl: str):
  step_fn = train_lib.make_train_step(
      cfg, spec, opt_lib.OptimizerConfig(), mesh,
      train_lib.StepConfig(lora_impl=impl, remat=req.remat), rules=rules)
  params_sh, bank_sh, opt_sh = step_fn.state_shardings
  bank_shapes = opt_lib.train_bank_shapes(cfg, spec)
  params = _abstract(llama.param_shapes(cfg), params_sh)
  bank = _abstract(bank_shapes, bank_sh)
  trainable = opt_lib.trainable_params(bank_shapes)
  opt = _abstract(opt_lib.SlotOptState(mu=trainable, nu=trainable,
                                       count=bank_shapes.rank), opt_sh)
  b, t = req.batch, req.seq_len
  if b % step_fn.row_multiple:
    raise AotError(f"batch {b} must be a multiple of {step_fn.row_multiple} "
                   "(the devices rows are split over)")
  i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = train_lib.Batch(tokens=i32((b, t)), targets=i32((b, t)),
                          loss_mask=f32((b, t)), positions=i32((b, t)),
                          segment_ids=i32((b, t)), adapter_idx=i32((b,)),
                          weight=f32((b,)))
  batch = _abstract(batch, step_fn.batch_sharding)
  groups = dict(params=params, bank=bank, optimizer=opt)
  return step_fn.jitted, (params, bank, opt, batch), groups


def _serve_args(req: AotRequest, cfg: ModelConfig, spec: BankSpec | None,
                mesh, rules, impl: str):
  fns = serve_steps.make_step_fns(
      cfg, batch=req.batch, max_len=req.cache_len, steps_per_call=1,
      lora_impl=impl, mesh=mesh, rules=rules)
  params = _abstract(llama.param_shapes(cfg), sharding.logical_sharding(
      llama.param_logical_axes(cfg), llama.param_shapes(cfg), mesh, rules))
  bank = None
  if spec is not None:
    shapes = bank_lib.bank_shapes(cfg, spec)
    bank = _abstract(shapes, sharding.logical_sharding(
        bank_lib.bank_logical_axes(spec), shapes, mesh, rules))
  cache = _abstract(cache_shapes(cfg, req.batch, req.cache_len),
                    serve_steps.cache_sharding(cfg, req.batch, req.cache_len,
                                               mesh, rules=rules))
  rep = sharding.replicated(mesh)
  vec = lambda dt, n=req.batch: jax.ShapeDtypeStruct((n,), dt, sharding=rep)
  groups = dict(params=params, bank=bank, kv_cache=cache)
  if req.step == "decode":
    state = serve_steps.DecodeState(
        token_b=vec(jnp.int32), pos_b=vec(jnp.int32),
        remaining_b=vec(jnp.int32), active_b=vec(jnp.bool_),
        adapter_idx_b=vec(jnp.int32))
    return fns.decode, (params, bank, cache, state, _rows(req.batch, rep)), \
        groups
  tokens = jax.ShapeDtypeStruct((req.batch, req.seq_len), jnp.int32,
                                sharding=rep)
  return fns.prefill, (params, bank, cache, tokens, vec(jnp.int32),
                       vec(jnp.int32), vec(jnp.int32),
                       _rows(req.batch, rep)), groups


# --- analytic cost ------------------------------------------------------------

def _token_macs_per_layer(c: ModelConfig) -> float:
  """Base matmul MACs per token per layer: the attention projections plus
  the feed-forward, which on an MoE model counts the *active* experts (k
  routed + shared + the router), averaged over dense and MoE layers."""
  attn = sum(a * b for a, b in (c.projection_shape(t) for t in
                                c.projection_names()
                                if t not in ("gate", "up", "down")))
  dense = 3 * c.hidden_size * c.intermediate_size
  if not c.num_moe_layers:
    return attn + dense
  moe = (c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
         + 3 * c.hidden_size * c.shared_expert_size
         + c.hidden_size * c.num_experts)
  return attn + (c.num_dense_layers * dense + c.num_moe_layers * moe
                 ) / c.num_layers


def step_cost(req: AotRequest, cfg: ModelConfig, spec: BankSpec | None,
              n_devices: int, bytes_per_device: Mapping[str, int]) -> dict:
  """Analytic FLOPs and HBM bytes per device for one step (module doc).

  Args:
    req: the request (step, batch, lengths, remat).
    cfg: model config.
    spec: bank spec, or None for the base-only step.
    n_devices: chips the work is split over.
    bytes_per_device: resident bytes per device by group ('params', 'bank',
      'optimizer', 'kv_cache').
  """
  c = cfg
  base_mm = _token_macs_per_layer(c)
  head = c.hidden_size * c.vocab_size
  lora_mm = 0
  if spec is not None:
    lora_mm = sum(spec.max_rank * (a + b) for a, b in
                  (c.projection_shape(t) for t in spec.targets))
  if req.step == "train":
    tokens, keys, head_tokens = req.batch * req.seq_len, req.seq_len, None
  elif req.step == "prefill":
    tokens, keys = req.batch * req.seq_len, req.seq_len
    head_tokens = req.batch  # the LM head runs on each prompt's last token
  else:
    tokens, keys, head_tokens = req.batch, req.cache_len, req.batch
  head_tokens = tokens if head_tokens is None else head_tokens
  attn = 4 * c.q_dim * keys  # q.k and p.v per token per layer (full mask)
  fwd_layer = 2 * base_mm + attn
  fwd_lora = 2 * lora_mm
  if req.step == "train":
    passes = 3 if req.remat else 2      # forward (+ recompute) + dx
    base = tokens * c.num_layers * (passes * 2 * base_mm + (passes + 1) * attn)
    base += head_tokens * 2 * 2 * head  # head forward + dx
    lora = tokens * c.num_layers * (passes + 1) * fwd_lora  # + dA, dB
  else:
    base = tokens * c.num_layers * fwd_layer + head_tokens * 2 * head
    lora = tokens * c.num_layers * fwd_lora
  flops = (base + lora) / n_devices
  bpd = dict(bytes_per_device)
  reads = bpd.get("params", 0) * (3 if req.step == "train" and req.remat
                                  else 2 if req.step == "train" else 1)
  reads += bpd.get("kv_cache", 0) * (1 if req.step == "decode" else 0)
  bank_dev = bpd.get("bank") or 0
  if spec is not None and bank_dev:
    # Rows of the distinct adapters in the batch, per pass over the layers.
    frac = min(1.0, req.num_distinct() / spec.num_slots)
    reads += bank_dev * frac * (3 if req.step == "train" else 1)
  optimizer = 0.0
  if req.step == "train":
    # AdamW's jnp.where over every slot: read bank, grad, mu, nu; write
    # bank, mu, nu (grad is bank-sized). A separate, purely memory-bound
    # phase after the backward pass: it cannot hide under its matmuls.
    optimizer = bank_dev * 3 + bpd.get("optimizer", 0) * 2
    cap = None if spec is None else opt_lib.present_capacity(
        opt_lib.OptimizerConfig(), spec.num_slots, req.batch)
    if cap is not None:
      # The present-slot path (`optimizer` module doc): one read of the
      # whole gradient for the per-slot norms, then the same traffic on the
      # P gathered slots, twice over (gather copies, then the scatter).
      optimizer = bank_dev + 2 * optimizer * cap / spec.num_slots
  return dict(step_flops=float(flops), lora_flops_fraction=float(
      lora / max(base + lora, 1)), step_bytes=float(reads),
              optimizer_bytes=float(optimizer), tokens_per_step=int(tokens))


def _base_train_spec(req: AotRequest) -> BankSpec:
  # A trainable step needs a bank; the base-only step trains the least there
  # is (one rank-1 adapter on q), i.e. the base's forward + backward.
  return BankSpec(targets=("q",), max_rank=1, num_slots=2,
                  dtype=req.spec().dtype)


def add_estimates(req: AotRequest, out: dict) -> dict:
  """Adds the analytic cost and roofline fields to a compile result.

  est_step_s = max(FLOPs / peak, bytes / bandwidth) of the forward/backward
  plus, for training, the optimizer phase's bytes / bandwidth. Recomputable
  from a cached result (it needs only the request and resident bytes).
  """
  if "total_per_device" not in out:
    return out
  chip = req.chip()
  spec = req.spec() if out["with_adapters"] else (
      _base_train_spec(req) if req.step == "train" else None)
  cost = step_cost(req, req.model_config(), spec, out["devices"],
                   out["resident_bytes"])
  t_flops = cost["step_flops"] / chip.bf16_flops
  t_bytes = cost["step_bytes"] / chip.hbm_bandwidth
  t_opt = cost["optimizer_bytes"] / chip.hbm_bandwidth
  est = max(t_flops, t_bytes) + t_opt
  out.update(cost, est_step_s=est, optimizer_s=t_opt,
             bound="compute" if t_flops >= t_bytes else "memory",
             tokens_per_s=cost["tokens_per_step"] / est)
  return out


# --- compile ------------------------------------------------------------------

_OOM = re.compile(r"(RESOURCE_EXHAUSTED|HbmOom|out of memory|exceeds.*memory)",
                  re.IGNORECASE)


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(xla_flops_raw=float(cost.get("flops", 0.0)),
              xla_bytes_accessed_raw=float(cost.get("bytes accessed", 0.0)))


def compile_step(req: AotRequest, *, with_adapters: bool = True) -> dict:
  """Compiles one step for the request's topology and reports its footprint.

  Returns a dict: devices, mesh, 'resident_bytes' per device by group
  ('params', 'bank', 'optimizer', 'kv_cache', XLA's 'temporaries'), 'total_per_device', 'hbm',
  'fits', 'compile_s', XLA's raw cost (scan bodies counted once), the
  analytic per-device 'step_flops' / 'step_bytes' and the roofline
  'est_step_s' / 'tokens_per_s', or 'error' (the
  first lines of the compiler's message) when the compile failed.
  """
  cfg = req.model_config()
  devices = topology_devices(req.topology)
  try:
    if len(req.mesh) == 4:
      data, fsdp, expert, tensor = req.mesh
      mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices,
                                expert=expert)
    else:
      mesh = sharding.make_mesh(*req.mesh, devices=devices)
  except ValueError as e:
    raise AotError(f"{e} (topology {req.topology})") from None
  rules = req.rules_dict()
  platform = _platform(devices)
  impl = req.lora_impl
  if impl == "auto":
    impl = lora_op.select_impl(platform, req.batch, req.batch, req.slots)
  if req.step == "train":
    spec = req.spec() if with_adapters else _base_train_spec(req)
    fn, args, groups = _train_args(req, cfg, spec, mesh, rules, impl)
  else:
    spec = req.spec() if with_adapters else None
    fn, args, groups = _serve_args(req, cfg, spec, mesh, rules, impl)
  chip = req.chip()
  per_dev = {k: (_bytes_per_device(v) if v is not None else 0)
             for k, v in groups.items()}
  out = dict(step=req.step, with_adapters=with_adapters, lora_impl=impl,
             platform=platform, devices=len(devices), chip=chip.name,
             mesh={a: int(mesh.shape[a]) for a in mesh.axis_names},
             resident_bytes=per_dev, hbm=float(chip.hbm_bytes))
  t0 = time.perf_counter()
  try:
    compiled = fn.trace(*args).lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # compiler errors
    msg = str(e)
    out.update(compile_s=round(time.perf_counter() - t0, 2), fits=False,
               error=" ".join(msg.split())[:600],
               oom=bool(_OOM.search(msg)))
    return out
  out["compile_s"] = round(time.perf_counter() - t0, 2)
  mem = compiled.memory_analysis()
  if mem is not None:
    temp = int(mem.temp_size_in_bytes)
    arg = int(mem.argument_size_in_bytes)
    outb = int(mem.output_size_in_bytes)
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    per_dev["temporaries"] = temp
    total = arg + temp + outb - alias
  else:  # pragma: no cover  (every backend used here reports it)
    total = sum(per_dev.values())
  out["total_per_device"] = float(total)
  out["fits"] = bool(total <= chip.hbm_bytes)
  out.update(_cost(compiled))
  return add_estimates(req, out)


def compile_report(req: AotRequest) -> dict:
  """The step with adapters, the same step without them, and the overhead.

  Returns:
    {'request': ..., 'lora': compile_step(...), 'base': compile_step(...,
    with_adapters=False), 'lora_overhead': est_step_s ratio - 1 (None when
    either failed)}.
  """
  lora = compile_step(req)
  base = compile_step(req, with_adapters=False)
  overhead = None
  if "est_step_s" in lora and "est_step_s" in base:
    overhead = lora["est_step_s"] / base["est_step_s"] - 1.0
  return dict(request=_request_dict(req), lora=lora, base=base,
              lora_overhead=overhead)


def _request_dict(req: AotRequest) -> dict:
  d = dataclasses.asdict(req)
  d["targets"] = list(req.targets)
  d["rules"] = [[k, list(v) if isinstance(v, tuple) else v]
                for k, v in req.rules]
  return d


def request_from_dict(d: Mapping) -> AotRequest:
  """Inverse of `_request_dict` (JSON lists back to tuples)."""
  d = dict(d)
  d["targets"] = tuple(d["targets"])
  d["mesh"] = tuple(d["mesh"])
  d["rules"] = tuple((k, tuple(v) if isinstance(v, list) else v)
                     for k, v in d.get("rules", ()))
  return AotRequest(**d)


def format_report(report: Mapping) -> str:
  """A short human-readable summary of `compile_report`'s result."""
  r = report["request"]
  lines = [f"{r['model']} {r['step']} on {r['topology']} mesh "
           f"{report['lora']['mesh']}: {r['slots']} slots x rank {r['rank']} "
           f"({','.join(r['targets'])}), batch {r['batch']}"]
  for key in ("lora", "base"):
    s = report[key]
    gb = {k: round(v / 1e9, 3) for k, v in s["resident_bytes"].items()}
    if "error" in s:
      lines.append(f"  {key:4s}: FAILED after {s['compile_s']} s "
                   f"(oom={s['oom']}): {s['error'][:300]}")
      continue
    lines.append(
        f"  {key:4s}: {s['total_per_device'] / 1e9:.2f} GB/device of "
        f"{s['hbm'] / 1e9:.2f} ({'fits' if s['fits'] else 'DOES NOT FIT'}) "
        f"{gb}; compile {s['compile_s']} s; est {s['est_step_s'] * 1e3:.2f} "
        f"ms/step ({s['bound']}-bound), {s['tokens_per_s']:.0f} tokens/s; "
        f"XLA raw flops {s.get('xla_flops_raw', 0):.3g} (scan counted once)"
        f", analytic {s['step_flops']:.3g}/device")
  if report["lora_overhead"] is not None:
    lines.append(f"  LoRA overhead (est. step time): "
                 f"{report['lora_overhead'] * 100:.1f}%")
  return "\n".join(lines)


def parse_rules(text: str) -> tuple:
  """'slot=fsdp+tensor,lora_rank=' -> (('slot', ('fsdp', 'tensor')), ...)."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, target = item.partition("=")
    if not sep:
      raise AotError(f"rule {item!r} is not logical_axis=mesh_axis[+axis]")
    axes = tuple(a for a in target.split("+") if a)
    bad = [a for a in axes if a not in sharding.EXPERT_MESH_AXES]
    if bad:
      raise AotError(f"rule {item!r}: unknown mesh axes {bad}; use "
                     f"{'/'.join(sharding.EXPERT_MESH_AXES)}")
    out.append((name, axes[0] if len(axes) == 1 else (axes or None)))
  return tuple(out)


def mesh_sizes(text: str) -> tuple[int, ...]:
  """'1,1,8' or 'data=1,fsdp=1,tensor=8' -> (1, 1, 8); four sizes or an
  `expert=` key give (data, fsdp, expert, tensor)."""
  if "=" in text:
    kv = dict(p.split("=") for p in text.split(","))
    axes = (sharding.EXPERT_MESH_AXES if "expert" in kv
            else sharding.MESH_AXES)
    return tuple(int(kv.get(a, 1)) for a in axes)
  sizes = tuple(int(x) for x in text.split(","))
  if len(sizes) not in (3, 4):
    raise AotError(f"mesh {text!r}: give data,fsdp,tensor or "
                   "data,fsdp,expert,tensor sizes")
  return sizes


def mixed_rank_saving(req: AotRequest, ranks: Sequence[int]) -> dict:
  """What the SGMV kernel's rank skip saves for a bank of mixed true ranks.

  The kernel skips the padded rank of each slot only if the model path hands
  it the per-slot true rank (`LayerBank.rank`); the LoRA FLOPs then scale
  with the mean true rank of the batch's adapters instead of `max_rank`.

  Args:
    req: the request (its rank is the bank's max rank).
    ranks: true ranks of the resident adapters, cycled over the batch rows.

  Returns:
    {'mean_rank', 'lora_flops_saving' (fraction of the LoRA FLOPs skipped),
    'rank_reaches_kernel' (whether this checkout plumbs the rank)}.
  """
  bad = [r for r in ranks if not 1 <= r <= req.rank]
  if bad:
    raise AotError(f"mixed ranks {bad} are outside 1..{req.rank} (the bank's "
                   "max rank)")
  rows = [ranks[i % len(ranks)] for i in range(req.num_distinct())]
  mean = float(np.mean(rows))
  plumbed = "rank" in {f.name for f in dataclasses.fields(bank_lib.LayerBank)}
  return dict(mean_rank=mean, lora_flops_saving=1.0 - mean / req.rank,
              rank_reaches_kernel=plumbed)
