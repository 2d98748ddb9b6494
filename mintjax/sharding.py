"""Device mesh, logical axis rules and the shardings derived from them.

Owns the one table (`DEFAULT_RULES`, plus the named variants in
`RULE_SETS`) mapping logical axis names (carried by
every base parameter, adapter-bank tensor, cache and activation) to the mesh
axes `data`, `fsdp`, `tensor`; mesh construction; and the helpers that turn
logical axes into `NamedSharding`s (`logical_sharding`, `shard_tree`) and
constrain activations inside a jitted step (`constrain`, active only under
`use_mesh_rules`).

A mesh axis is dropped from a dimension it does not divide (the dimension is
then replicated over that axis), so small test models shard on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh of an expert-parallel mixture-of-experts model (`make_mesh(expert=n)`).
EXPERT_MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # mixture-of-experts: the expert axis of expert weights [E, D, F] is
    # split over the `expert` mesh axis (expert parallelism; meshes without
    # that axis replicate it, see `logical_to_spec`).
    "experts": "expert",
    "layers": None,
    "norm": None,
    # multi-head latent attention's low ranks (q_lora, kv_lora + rope):
    # small, replicated.
    "latent": None,
    # adapter bank: slots are replicated so any row can gather any adapter;
    # the input/output widths follow the base projection they adapt.
    "slot": None,
    "lora_rank": None,
    # activations and caches
    # tokens are also split over `expert` where a mesh has it: outside the
    # expert FFN that axis is one more data-parallel axis.
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed_act": None,
    "cache_len": None,
    "kv_heads_n": "tensor",
    "head_dim": None,
}

# Large adapter banks. With "slot" replicated every chip holds every adapter:
# 1,024 rank-16 adapters on Llama-3.1-8B's seven projections are 86 GB in
# bf16, more than a v5e-8's 8 x 16 GiB, and the deviceless TPU compile of the
# decode step fails with CompileTimeHbmOom (docs/SCALE_UP.md). Splitting the
# slot axis over fsdp and tensor spreads the bank over every chip of those
# axes (the factor dims are then left whole, since a mesh axis shards one
# dim of an array); a row's gather reads its adapter where it lives and XLA
# all-reduces the [B, d, R] result, which is small next to the bank.
# On an expert-parallel mesh the slots spread over `expert` too.
SLOT_SHARDED_RULES: dict[str, Any] = {**DEFAULT_RULES,
                                      "slot": ("fsdp", "expert", "tensor")}

# Named rule sets, selectable by configs and the AOT tool (`mintjax.aot`).
RULE_SETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT_RULES,
    "slot_sharded": SLOT_SHARDED_RULES,
}

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar(
    "mintjax_mesh_rules", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *,
              expert: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 (= the rest).

  With `expert` > 1 the mesh is (data, fsdp, expert, tensor) instead
  (`EXPERT_MESH_AXES`): mixture-of-experts weights are split over `expert`
  (mintjax.model.expert_parallel); everything else treats it as data.

  Raises:
    ValueError: if the sizes do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  if expert != 1:
    return _make(devices, dict(data=data, fsdp=fsdp, expert=expert,
                               tensor=tensor))
  return _make(devices, dict(data=data, fsdp=fsdp, tensor=tensor))


def _make(devices: list, named: dict[str, int]) -> Mesh:
  sizes = list(named.values())
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"cannot fill mesh {named} with {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(named, sizes))} needs {int(np.prod(sizes))} "
        f"devices, found {len(devices)}")
  arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, tuple(named))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Mapping[str, Any] | None = None
                    ) -> PartitionSpec:
  """PartitionSpec for an array of `shape` with the given logical axes."""
  rules = DEFAULT_RULES if rules is None else rules
  if len(logical_axes) != len(shape):
    raise ValueError(
        f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise KeyError(f"no sharding rule for logical axis {name!r}")
    target = rules.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in mesh_axes:
      if ax not in mesh.shape:  # e.g. `expert` on a (data, fsdp, tensor) mesh
        continue
      size = mesh.shape[ax]
      if ax in used or size == 1:
        continue
      if dim % (size * int(np.prod([mesh.shape[k] for k in kept]))):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None)))
                                      for a in x)


def logical_sharding(logical_tree, shape_tree, mesh: Mesh,
                     rules: Mapping[str, Any] | None = None):
  """A tree of `NamedSharding` from matching trees of axes and shapes."""
  return jax.tree.map(
      lambda axes, s: NamedSharding(mesh, logical_to_spec(axes, s.shape, mesh,
                                                          rules)),
      logical_tree, shape_tree, is_leaf=_is_axes)


def shard_tree(tree, logical_tree, mesh: Mesh,
               rules: Mapping[str, Any] | None = None):
  """Places every array of `tree` on the mesh by its logical axes."""
  shardings = logical_sharding(logical_tree, tree, mesh, rules)
  return jax.device_put(tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Mapping[str, Any] | None = None):
  """Activates `constrain` for code traced inside this context."""
  token = _ACTIVE.set((mesh, DEFAULT_RULES if rules is None else rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh_rules():
  """(mesh, rules) of the enclosing `use_mesh_rules`, or None outside one
  (the gather-LoRA op shard_maps its kernels with them)."""
  return _ACTIVE.get()


def constrain(x, logical_axes: Sequence[str | None]):
  """Sharding constraint on an activation by logical axes (no-op off-mesh)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
