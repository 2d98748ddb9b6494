"""Expert parallelism: the routed-expert FFN split over an `expert` mesh axis.

Owns `experts_ffn_sharded`, the expert-parallel form of
`mintjax.model.moe.experts_ffn` (same arguments plus the mesh; same result
up to float summation order), and `expert_param_specs`, the placement of the
expert weights it expects.

How the tokens travel (no token is ever dropped):

  Tokens are split over the batch mesh axes (`data`, `fsdp`, `expert`) and
  expert weights [E, D, F] over `expert` (E / n experts a device; `F` may
  also be split over `tensor`). Inside `jax.shard_map` each device

  1. all-gathers its expert group's tokens, routes and weights over the
     `expert` axis ([n * T, D]: every token that any of the group's devices
     holds),
  2. sorts the (token, choice) pairs so those routed to its own experts come
     first, grouped by expert, and runs the three grouped matmuls of the
     SwiGLU FFN on them (`pallas_kernels.gmm`: ragged_dot on CPU/GPU, the
     megablox Pallas kernel on TPU); pairs routed elsewhere sit past the
     local groups and produce zeros,
  3. scatter-adds the weighted outputs per token and `psum_scatter`s the
     [n * T, D] partial sums over the `expert` axis, so each device gets
     back its own T tokens with the contributions of every expert summed
     (and `psum`s over `tensor` when F is split there).

  Why all-gather + reduce-scatter and not all_to_all: with no dropping, a
  static-shape all_to_all must size every device's receive buffer for the
  worst case, all n * T * k pairs landing on one device, which is the same
  [n * T * k, D] buffer this path holds, while all_to_all also needs a
  second exchange to send results back in order. The gather form moves the
  [n * T, D] tokens once each way (k times less than all_to_all's worst
  case), its collectives are the ones XLA overlaps best on TPU, and the
  grouped matmul computes only the rows of local experts (megablox skips
  other groups' tiles). `jax.lax.ragged_all_to_all` would cut the exchange
  to the routed pairs; it is the next step when tokens per device grow.

The adapter hook of `moe.experts_ffn` (per-tenant expert LoRA) gets the
same keyword arguments it gets unsharded, with token ids indexing the
gathered [n * T] rows; `adapter_rows` ships per-token data (e.g. each
token's adapter slot) through the same gather.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

EXPERT_AXIS = "expert"
_BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)
_FFN_KEYS = ("gate", "up", "down")


def _gmm():
  # The kernel package imports nothing from mintjax; it is found by name,
  # as the gather-LoRA op finds its kernels.
  return importlib.import_module("pallas_kernels.gmm")


def _axis_size(mesh: Mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.shape else 1


def token_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the token dim is split over (size > 1 ones only)."""
  return tuple(a for a in _BATCH_AXES if _axis_size(mesh, a) > 1)


def _tensor_split(mesh: Mesh, ffn_size: int) -> str | None:
  t = _axis_size(mesh, "tensor")
  return "tensor" if t > 1 and ffn_size % t == 0 else None


def expert_param_specs(mesh: Mesh, ffn_size: int) -> dict[str, P]:
  """PartitionSpecs of gate/up [E, D, F] and down [E, F, D] on `mesh`."""
  ex = EXPERT_AXIS if _axis_size(mesh, EXPERT_AXIS) > 1 else None
  tp = _tensor_split(mesh, ffn_size)
  return {"gate": P(ex, None, tp), "up": P(ex, None, tp),
          "down": P(ex, tp, None)}


def local_experts_ffn(x_td, expert_params: Mapping[str, Any], expert_ids_tk,
                      weights_tk, *, first_expert=0, num_experts=None,
                      adapter=None, impl: str = "auto",
                      interpret: bool = False):
  """The FFN of the experts [first_expert, first_expert + e) on their tokens.

  Args:
    x_td: [T, D] tokens.
    expert_params: gate/up [e, D, F], down [e, F, D] (x @ W layout).
    expert_ids_tk: [T, k] global expert ids in [0, E).
    weights_tk: [T, k] routing weights.
    first_expert: global id of expert_params' first expert (int or traced).
    num_experts: E, the global expert count (default: e, all local).
    adapter: optional `moe.ExpertAdapter`, called as `adapter(name, h_md, *,
      expert_m, token_m, group_sizes_e)` like `moe.experts_ffn` does, with
      global expert ids and group sizes over all E experts (zero for other
      devices' experts); its [M, d_out] delta (or None) is added to the
      grouped matmul's rows of local experts.
    impl, interpret: the grouped matmul implementation (pallas_kernels.gmm).

  Returns:
    [T, D] float32: sum over choices routed to these experts of
    weight * FFN_expert(x); choices routed elsewhere add nothing.
  """
  t, k = expert_ids_tk.shape
  e = expert_params["gate"].shape[0]
  local_m = expert_ids_tk.reshape(-1) - first_expert
  valid_m = (local_m >= 0) & (local_m < e)
  # Sort key: local expert id, and e for pairs of other devices' experts, so
  # they trail past the local groups (whose matmuls leave them zero).
  key_m = jnp.where(valid_m, local_m, e)
  order_m = jnp.argsort(key_m, stable=True)
  token_m = order_m // k
  sizes_g = jnp.bincount(key_m, length=e + 1).astype(jnp.int32)
  expert_m = jnp.take(expert_ids_tk.reshape(-1), order_m)
  gmm = functools.partial(_gmm().grouped_matmul, group_sizes_g=sizes_g,
                          impl=impl, interpret=interpret)

  # The hook's group sizes are over all E experts (zero for other devices'
  # experts): the rows [0, sum) are then exactly the local experts' rows in
  # expert order, and the trailing ones belong to no group.
  global_sizes_e = jnp.zeros((num_experts or e,), jnp.int32)
  global_sizes_e = jax.lax.dynamic_update_slice_in_dim(
      global_sizes_e, sizes_g[:e], first_expert, axis=0)

  def matmul(name, h_md):
    out = gmm(h_md, expert_params[name])
    if adapter is not None:
      delta = adapter(name, h_md, expert_m=expert_m, token_m=token_m,
                      group_sizes_e=global_sizes_e)
      if delta is not None:
        live = jnp.take(valid_m, order_m)[:, None]
        out = out + jnp.where(live, delta, 0).astype(out.dtype)
    return out

  xs_md = jnp.take(x_td, token_m, axis=0)
  h_mf = jax.nn.silu(matmul("gate", xs_md)) * matmul("up", xs_md)
  out_md = matmul("down", h_mf).astype(jnp.float32)
  w_m = jnp.take(jnp.where(valid_m, weights_tk.reshape(-1), 0), order_m)
  return jnp.zeros((t, x_td.shape[1]), jnp.float32).at[token_m].add(
      out_md * w_m[:, None].astype(jnp.float32))


def experts_ffn_sharded(x_td, expert_params: Mapping[str, Any], expert_ids_tk,
                        weights_tk, *, mesh: Mesh,
                        adapter: Callable | None = None, adapter_rows=None,
                        impl: str = "auto", interpret: bool = False):
  """Expert-parallel `moe.experts_ffn` (see the module docstring).

  Args:
    x_td: [T, D] tokens (T divisible by the product of `token_axes(mesh)`).
    expert_params: gate/up [E, D, F], down [E, F, D]; E divisible by the
      `expert` axis size. Placed as `expert_param_specs` (jit moves them
      there otherwise).
    expert_ids_tk: [T, k] int32 global expert ids.
    weights_tk: [T, k] routing weights.
    mesh: a mesh with an `expert` axis (sharding.make_mesh(expert=n)); a mesh
      without one runs every expert on every device, tokens still split.
    adapter: optional `moe.ExpertAdapter` as in `local_experts_ffn`; called
      inside the shard_map with token ids into the gathered [n * T_local]
      rows.
    adapter_rows: optional pytree of [T, ...] per-token arrays gathered like
      the tokens (e.g. each token's adapter slot); when given, `adapter` also
      gets `rows=` the gathered pytree.
    impl, interpret: grouped matmul implementation (pallas_kernels.gmm).

  Returns:
    [T, D] in x's dtype, split over the token axes like x.

  Raises:
    ValueError: E or T not divisible by the mesh axes that split them.
  """
  n = _axis_size(mesh, EXPERT_AXIS)
  e, _, f = expert_params["gate"].shape
  tok = token_axes(mesh)
  tok_devices = 1
  for a in tok:
    tok_devices *= _axis_size(mesh, a)
  if e % n:
    raise ValueError(
        f"{e} experts cannot be split over an expert axis of {n} devices; "
        "choose an expert mesh size that divides the expert count")
  if x_td.shape[0] % tok_devices:
    raise ValueError(
        f"{x_td.shape[0]} tokens cannot be split over the {tok} mesh axes "
        f"({tok_devices} devices); pad the batch to a multiple of "
        f"{tok_devices}")
  specs = expert_param_specs(mesh, f)
  tp = _tensor_split(mesh, f)
  params = {name: expert_params[name] for name in _FFN_KEYS}
  row_spec = P(tok or None)
  rows_spec = jax.tree.map(lambda _: row_spec, adapter_rows)

  def body(x_td, params, ids_tk, w_tk, rows):
    gathered = (x_td, ids_tk, w_tk, rows)
    if n > 1:
      gathered = jax.tree.map(
          lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True),
          gathered)
    x_all, ids_all, w_all, rows_all = gathered
    first = jax.lax.axis_index(EXPERT_AXIS) * (e // n) if n > 1 else 0
    hook = adapter
    if adapter is not None and rows_all is not None:
      hook = lambda name, h, **kw: adapter(name, h, rows=rows_all, **kw)
    y_all = local_experts_ffn(x_all, params, ids_all, w_all,
                              first_expert=first, num_experts=e,
                              adapter=hook, impl=impl, interpret=interpret)
    if n > 1:
      y_all = jax.lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0,
                                   tiled=True)
    if tp is not None:  # after the scatter: n times fewer rows to sum
      y_all = jax.lax.psum(y_all, tp)
    return y_all.astype(x_td.dtype)

  # check_vma off: an adapter hook may close over bank arrays whose
  # per-device variance shard_map cannot infer; the specs above are exact.
  fn = jax.shard_map(
      body, mesh=mesh,
      in_specs=(row_spec, specs, row_spec, row_spec, rows_spec),
      out_specs=row_spec, check_vma=False)
  return fn(x_td, params, expert_ids_tk, weights_tk, adapter_rows)
