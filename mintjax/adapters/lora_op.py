"""The gather-LoRA op: one interface, several implementations, one dispatcher.

Owns `lora_delta`, `lora_deltas` (targets sharing one input, e.g. q/k/v,
with one fused shrink), `lora_project` and its base matmul (`base_matmul`,
`OutInKernel`):

  y[b, t] = x[b, t] @ W (+ bias) + scale[s_b] * (x[b, t] @ A[s_b]) @ B[s_b]

with s_b = adapter_idx[b], A: [S, d_in, R], B: [S, R, d_out], scale: [S].
Slot 0 is the null adapter (zeros), so base rows ride in the same batch.

Implementations (all agree with `reference` up to float rounding):
  reference  per-token gather of A and B in float32 at HIGHEST precision; the
             oracle every other implementation and kernel is tested against.
  gather     per-example gather (A[idx]: [B, d_in, R]) + batched einsums.
  ragged     tokens stably sorted by slot, `jax.lax.ragged_dot` over the
             groups, then unsorted.
  onehot     dense over all slots: x @ A for every slot, masked by a one-hot
             row selector (what most JAX serving stacks do).
  pallas_*   Pallas kernels, found by name in `pallas_kernels.ops.KERNELS`
             the first time a kernel is selected or named (see `register`).

`select_impl` picks one per call from the backend and the static shapes; see
docs/BENCHMARKS.md for the measurements behind the CPU choice. Interpret-mode
kernels are never chosen automatically.

Kernels also receive the per-slot true rank (`rank_s`, from the bank), so the
TPU kernel skips rank chunks beyond it; the XLA formulations ignore it (zero
padding is exact). Inside `mintjax.sharding.use_mesh_rules`, a kernel runs
under `jax.shard_map` (Mosaic kernels cannot be partitioned automatically):
tokens split over the batch's mesh axes, the bank's d_in and d_out split
like the activations named by `axes`, and partial sums over a split d_in
added with a psum.
"""

from __future__ import annotations

import importlib
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cpu_kernels import amx
from mintjax import sharding
from pallas_kernels import reference as kernel_reference

# A token-level kernel: (x_td, a_sdr, b_sro, scale_s, slot_t, rank_s) -> y_to.
TokenImpl = Callable[..., jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def reference(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b):
  """The oracle. Shapes: x [B, T, d_in], a [S, d_in, R], b [S, R, d_out].

  Every token is its own example of the kernels' token-level oracle
  (`pallas_kernels.reference`), so the op and the kernels share one
  definition of the math.
  """
  bsz, t, d_in = x_btd.shape
  slot_t = jnp.repeat(adapter_idx_b, t)
  y_to = kernel_reference.reference_tokens(x_btd.reshape(bsz * t, d_in),
                                           a_sdr, b_sro, scale_s, slot_t)
  return y_to.reshape(bsz, t, -1)


def gather(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b):
  """Per-example gather: reads each row's adapter once for all its tokens."""
  a_bdr = a_sdr[adapter_idx_b].astype(x_btd.dtype)
  b_bro = b_sro[adapter_idx_b].astype(x_btd.dtype)
  h_btr = jnp.einsum("btd,bdr->btr", x_btd, a_bdr,
                     preferred_element_type=jnp.float32)
  h_btr = h_btr * scale_s[adapter_idx_b][:, None, None]
  y_bto = jnp.einsum("btr,bro->bto", h_btr.astype(x_btd.dtype), b_bro,
                     preferred_element_type=jnp.float32)
  return y_bto.astype(x_btd.dtype)


def ragged(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b):
  """Tokens grouped by slot, then `ragged_dot` (grouped matmul) per factor."""
  bsz, t, d_in = x_btd.shape
  num_slots = a_sdr.shape[0]
  slot_t = jnp.repeat(adapter_idx_b, t)
  order = jnp.argsort(slot_t, stable=True)
  group_sizes = jnp.bincount(slot_t, length=num_slots).astype(jnp.int32)
  x_td = x_btd.reshape(bsz * t, d_in)[order]
  h_tr = jax.lax.ragged_dot(x_td, a_sdr.astype(x_td.dtype), group_sizes,
                            preferred_element_type=jnp.float32)
  h_tr = h_tr * scale_s[slot_t[order]][:, None]
  y_to = jax.lax.ragged_dot(h_tr.astype(x_td.dtype), b_sro.astype(x_td.dtype),
                            group_sizes, preferred_element_type=jnp.float32)
  inverse = jnp.argsort(order)
  return y_to[inverse].reshape(bsz, t, -1).astype(x_btd.dtype)


def onehot(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b):
  """Dense over all slots with a one-hot selector (cost grows with S)."""
  num_slots, d_in, r = a_sdr.shape
  sel_bs = jax.nn.one_hot(adapter_idx_b, num_slots, dtype=jnp.float32)
  sel_bs = sel_bs * scale_s[None, :]
  # [d_in, S*R] and [S*R, d_out]: one wide matmul each instead of S small ones.
  a_dk = a_sdr.transpose(1, 0, 2).reshape(d_in, num_slots * r)
  b_ko = b_sro.reshape(num_slots * r, -1)
  h_btk = jnp.einsum("btd,dk->btk", x_btd, a_dk.astype(x_btd.dtype),
                     preferred_element_type=jnp.float32)
  mask_bk = jnp.repeat(sel_bs, r, axis=1)
  h_btk = h_btk * mask_bk[:, None, :]
  y_bto = jnp.einsum("btk,ko->bto", h_btk.astype(x_btd.dtype),
                     b_ko.astype(x_btd.dtype),
                     preferred_element_type=jnp.float32)
  return y_bto.astype(x_btd.dtype)


_IMPLS: dict[str, Callable] = {
    "reference": reference,
    "gather": gather,
    "ragged": ragged,
    "onehot": onehot,
}
# Kernels registered with `register(..., backends=...)` and the backends on
# which `select_impl` may choose them; `_KERNEL_SUPPORTS` says which feature
# widths (d_in, d_out) each kernel lowers for.
_KERNEL_BACKENDS: dict[str, tuple[str, ...]] = {}
_KERNEL_SUPPORTS: dict[str, Callable[[int, int], bool]] = {}


def register(name: str, token_impl: TokenImpl,
             backends: tuple[str, ...] = (),
             supports: Callable[[int, int], bool] = lambda d_in, d_out: True
             ) -> None:
  """Registers a token-level implementation (e.g. a Pallas kernel).

  Args:
    name: implementation name, usable as `impl=name`.
    token_impl: `(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s) -> y_to`;
      rank_s is [S] int32, the true rank of each slot.
    backends: backends ('tpu', 'gpu') where `select_impl` prefers it.
    supports: `(d_in, d_out) -> bool`, the widths the kernel lowers for;
      `select_impl` picks it only for those.
  """

  def batched(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b, rank_s):
    bsz, t, d_in = x_btd.shape
    slot_t = jnp.repeat(adapter_idx_b, t)
    y_to = token_impl(x_btd.reshape(bsz * t, d_in), a_sdr, b_sro, scale_s,
                      slot_t, rank_s)
    return y_to.reshape(bsz, t, -1).astype(x_btd.dtype)

  _IMPLS[name] = batched
  _KERNEL_BACKENDS[name] = tuple(backends)
  _KERNEL_SUPPORTS[name] = supports


# The module whose `KERNELS` table names the Pallas kernels. It is imported
# by name on first need, so importing the op (and running it on CPU) loads
# no kernel code, and the kernels import nothing from mintjax.
_KERNEL_MODULE = "pallas_kernels.ops"
_kernels_loaded = False


def _load_kernels() -> None:
  """Registers every kernel of `_KERNEL_MODULE.KERNELS` (once)."""
  global _kernels_loaded
  if _kernels_loaded:
    return
  kernels = importlib.import_module(_KERNEL_MODULE).KERNELS
  for name, entry in kernels.items():
    register(name, entry.token_impl, backends=entry.backends,
             supports=entry.supports)
  _kernels_loaded = True


def available_impls() -> tuple[str, ...]:
  _load_kernels()
  return tuple(_IMPLS)


def select_impl(backend: str, num_tokens: int, batch: int, num_slots: int,
                *, dims: tuple[int, int] | None = None) -> str:
  """Chooses an implementation for a target backend and static shapes.

  TPU/GPU use a registered Pallas kernel for that backend when one exists
  and supports the projection's (d_in, d_out) `dims` (when given; e.g. the
  Triton kernels need widths divisible by 16), else the per-example gather.
  On CPU the per-example gather measured fastest for decode and prefill
  shapes alike (tools/bench_lora_op.py; docs/BENCHMARKS.md). Interpret-mode
  kernels register for no backend, so they are never chosen here.
  """
  del num_tokens, batch, num_slots  # CPU choice is shape-independent so far.
  if backend in ("tpu", "gpu"):
    _load_kernels()
  for name, backends in _KERNEL_BACKENDS.items():
    if backend in backends and (dims is None or _KERNEL_SUPPORTS[name](*dims)):
      return name
  return "gather"


def _sharded(kernel, axes, x_btd, a_sdr, b_sro, scale_s, adapter_idx_b,
             rank_s):
  """Runs a batched kernel per shard under the active mesh rules.

  x [B, T, d_in] is split as the activation axes ('batch', 'length',
  axes[0]) say and y [B, T, d_out] as ('batch', 'length', axes[1]); A and B
  are split on d_in / d_out to match and are replicated over slots. A split
  d_in leaves each shard a partial sum, so y is psummed over those axes.

  The backward is explicit (a custom_vjp around two shard_maps) because
  Pallas calls carry no varying-axis types for shard_map's autodiff: each
  shard runs the kernel's own VJP (recomputing its forward), and every
  cotangent is psummed over the mesh axes its primal is not split over.
  """
  mesh, rules = sharding.active_mesh_rules()
  in_axis, out_axis = axes
  batch, _, d_in = sharding.logical_to_spec(
      ("batch", "length", in_axis), x_btd.shape, mesh, rules)
  d_out = sharding.logical_to_spec((out_axis,), b_sro.shape[2:], mesh,
                                   rules)[0]
  names = lambda spec: set((spec,) if isinstance(spec, str) else spec or ())
  if names(d_out) & (names(batch) | names(d_in)):
    d_out = None  # a mesh axis can split only one dim of y
  used = names(batch) | names(d_in) | names(d_out)
  specs = (P(batch, None, d_in), P(None, d_in, None), P(None, None, d_out),
           P(), P(batch), P())
  y_spec = P(batch, None, d_out)

  def psum_over(g, axes):
    axes = tuple(sorted(axes))
    if not axes:
      return g
    return jax.lax.psum(g.astype(jnp.float32), axes).astype(g.dtype)

  def smap(fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)

  def local_fwd(x, a, b, scale, idx, rank):
    return psum_over(kernel(x, a, b, scale, idx, rank), names(d_in))

  def local_bwd(x, a, b, scale, idx, rank, dy):
    _, vjp = jax.vjp(lambda *f: kernel(*f, idx, rank), x, a, b, scale)
    dx, da, db, dscale = vjp(dy)
    return (psum_over(dx, used - names(batch) - names(d_in)),
            psum_over(da, used - names(d_in)),
            psum_over(db, used - names(d_out)), psum_over(dscale, used))

  @jax.custom_vjp
  def op(x, a, b, scale, idx, rank):
    return smap(local_fwd, specs, y_spec)(x, a, b, scale, idx, rank)

  def op_fwd(*args):
    return op(*args), args

  def op_bwd(args, dy):
    grads = smap(local_bwd, specs + (y_spec,), specs[:4])(*args, dy)
    return (*grads, None, None)

  op.defvjp(op_fwd, op_bwd)
  return op(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b, rank_s)


def lora_delta(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b,
               impl: str = "auto", *, rank_s=None, axes=(None, None)):
  """scale[s] * (x @ A[s]) @ B[s] per example; shapes as in the module doc.

  Args:
    x_btd: [B, T, d_in] activations.
    a_sdr: [S, d_in, R] A factors of every slot (one layer).
    b_sro: [S, R, d_out] B factors of every slot.
    scale_s: [S] float32 per-slot scale.
    adapter_idx_b: [B] int32 slot of each example.
    impl: an implementation name or 'auto' (see `select_impl`).
    rank_s: optional [S] int32 true rank per slot (kernels skip the padded
      rank beyond it; default R everywhere).
    axes: logical activation axes of x's d_in and y's d_out (e.g.
      ('embed_act', 'q_heads')); they place a kernel's shards on a mesh.

  Returns:
    [B, T, d_out] in x's dtype.
  """
  # Public entry points reject out-of-range slots (they can see the values);
  # inside a trace they cannot, so a stray index reads the null slot 0 (the
  # base alone) instead of being clamped to another tenant's last slot.
  num_slots = a_sdr.shape[0]
  adapter_idx_b = jnp.where((adapter_idx_b >= 0) & (adapter_idx_b < num_slots),
                            adapter_idx_b, 0)
  if impl == "auto":
    impl = select_impl(jax.default_backend(), x_btd.shape[0] * x_btd.shape[1],
                       x_btd.shape[0], a_sdr.shape[0],
                       dims=(a_sdr.shape[1], b_sro.shape[2]))
  if impl not in _IMPLS:
    _load_kernels()
  try:
    fn = _IMPLS[impl]
  except KeyError:
    raise ValueError(
        f"unknown gather-LoRA implementation {impl!r}; available: "
        f"{available_impls()}") from None
  if impl not in _KERNEL_BACKENDS:
    return fn(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b)
  if rank_s is None:
    rank_s = jnp.full(scale_s.shape, a_sdr.shape[2], jnp.int32)
  if sharding.active_mesh_rules() is not None:
    return _sharded(fn, axes, x_btd, a_sdr, b_sro, scale_s, adapter_idx_b,
                    rank_s)
  return fn(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b, rank_s)


@flax.struct.dataclass
class OutInKernel:
  """A base kernel stored transposed, [d_out, d_in] (Hugging Face's order).

  The per-layer serving layout on CPU (`mintjax.model.fused.unstack_layers`)
  keeps its projections this way: XLA:CPU's M = 16 decode GEMMs read a
  [d_out, d_in] bf16 kernel 1.3-1.9x faster than the [d_in, d_out] one
  (docs/BENCHMARKS.md). `base_matmul` reads either.
  """

  w_od: jax.Array

  @property
  def dtype(self):
    return self.w_od.dtype


def base_matmul(x_btd, w):
  """x @ W [B, T, d_out] in f32, for W [d_in, d_out], an `OutInKernel` or
  an AMX `cpu_kernels.amx.PackedKernel`."""
  if isinstance(w, amx.PackedKernel):
    return amx.matmul(x_btd, w)
  if isinstance(w, OutInKernel):
    return jnp.einsum("btd,od->bto", x_btd, w.w_od.astype(x_btd.dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("btd,do->bto", x_btd, w.astype(x_btd.dtype),
                    preferred_element_type=jnp.float32)


def lora_project(x_btd, w_do, bias_o=None, lora=None, adapter_idx_b=None,
                 impl: str = "auto", *, axes=(None, None), delta=None):
  """x @ W (+ bias) (+ the gather-LoRA delta when `lora` is given).

  Args:
    x_btd: [B, T, d_in].
    w_do: [d_in, d_out] base kernel.
    bias_o: optional [d_out].
    lora: optional (a_sdr, b_sro, scale_s) or (a_sdr, b_sro, scale_s,
      rank_s) for this projection; rank_s [S] int32 is the true rank.
    adapter_idx_b: [B] int32, required with `lora`.
    impl: gather-LoRA implementation.
    axes: logical activation axes of d_in and d_out (see `lora_delta`).
    delta: a LoRA delta [B, T, d_out] computed elsewhere (the slot-dense
      view, `mintjax.adapters.slot_dense`), added like the op's own.
  """
  # bf16 operands accumulate in f32 (the fast XLA:CPU and TPU/GPU path);
  # the base output, bias and delta are summed in f32, then cast once.
  y = base_matmul(x_btd, w_do)
  if bias_o is not None:
    y = y + bias_o.astype(y.dtype)
  if lora is not None:
    a_sdr, b_sro, scale_s, *rank = lora
    y = y + lora_delta(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b, impl,
                       rank_s=rank[0] if rank else None, axes=axes)
  if delta is not None:
    y = y + delta
  return y.astype(x_btd.dtype)


def _gather_shared_input(x_btd, loras, adapter_idx_b):
  """The `gather` formulation for targets that share x: one shrink.

  The gathered A factors are concatenated on the rank axis, so x is read
  once by one [B, T, d_in] x [B, d_in, sum R] einsum instead of one per
  target; each target's expand stays its own einsum.
  """
  a_bdk = jnp.concatenate(
      [a[adapter_idx_b].astype(x_btd.dtype) for a, *_ in loras], axis=-1)
  h_btk = jnp.einsum("btd,bdk->btk", x_btd, a_bdk,
                     preferred_element_type=jnp.float32)
  out, start = [], 0
  for a_sdr, b_sro, scale_s, *_ in loras:
    r = a_sdr.shape[-1]
    h_btr = h_btk[..., start:start + r] * scale_s[adapter_idx_b][:, None, None]
    start += r
    y_bto = jnp.einsum("btr,bro->bto", h_btr.astype(x_btd.dtype),
                       b_sro[adapter_idx_b].astype(x_btd.dtype),
                       preferred_element_type=jnp.float32)
    out.append(y_bto.astype(x_btd.dtype))
  return out


def lora_deltas(x_btd, loras, adapter_idx_b, impl: str = "auto", *,
                axes=None):
  """The deltas of several targets that read the same input x (q/k/v,
  gate/up), with one shared shrink where the implementation allows.

  Args:
    x_btd: [B, T, d_in] the shared input.
    loras: per target, (a_sdr, b_sro, scale_s[, rank_s]) or None (target
      not adapted: its delta is None).
    adapter_idx_b: [B] int32 slot of each example.
    impl: an implementation name or 'auto'. The `gather` formulation fuses
      the shrinks; every other implementation (kernels included) runs
      `lora_delta` per target, so kernels keep their per-target contract.
    axes: per target, the logical activation axes (see `lora_delta`).

  Returns:
    a list aligned with `loras`: [B, T, d_out_t] in x's dtype, or None.
  """
  axes = axes or [(None, None)] * len(loras)
  present = [i for i, l in enumerate(loras) if l is not None]
  out = [None] * len(loras)
  if not present:
    return out
  if impl == "auto":
    a0, b0 = loras[present[0]][0], loras[present[0]][1]
    impl = select_impl(jax.default_backend(),
                       x_btd.shape[0] * x_btd.shape[1], x_btd.shape[0],
                       a0.shape[0], dims=(a0.shape[1], b0.shape[2]))
  if impl == "gather" and len(present) > 1:
    num_slots = loras[present[0]][0].shape[0]
    idx_b = jnp.where((adapter_idx_b >= 0) & (adapter_idx_b < num_slots),
                      adapter_idx_b, 0)  # as in `lora_delta`
    for i, y in zip(present, _gather_shared_input(
        x_btd, [loras[i] for i in present], idx_b)):
      out[i] = y
    return out
  for i in present:
    a_sdr, b_sro, scale_s, *rank = loras[i]
    out[i] = lora_delta(x_btd, a_sdr, b_sro, scale_s, adapter_idx_b, impl,
                        rank_s=rank[0] if rank else None, axes=axes[i])
  return out
