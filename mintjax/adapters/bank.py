"""The adapter bank: every resident adapter stacked along a leading slot axis.

Owns `AdapterBank` (a pytree of device arrays, an ordinary argument of every
compiled step), its construction, slot writes and reads, and the logical axis
names of its tensors. Layout per target projection:

  lora_a[t]: [S, L, d_in, R]    lora_b[t]: [S, L, R, d_out]
  (routed-expert targets add an expert axis after L: [S, L, E, d_in, R],
  [S, L, E, R, d_out]; `mintjax.adapters.expert_lora` runs them)
  scale:     [S] float32        rank:      [S] int32 (true rank, 0 = empty)

S = num_slots (slot 0 is the null adapter, all zeros), L = layers,
R = max_rank. Lower-rank adapters are zero padded to R, which is exact:
padded columns of A meet padded rows of B and contribute nothing.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters.spec import (AdapterError, AdapterWeights, BankSpec,
                                   factor_shapes)
from mintjax.config import ModelConfig

# Logical axis names per bank tensor; `mintjax.sharding` maps them to a mesh.
_IN_AXIS = {"q": "embed", "k": "embed", "v": "embed", "o": "q_heads",
            "gate": "embed", "up": "embed", "down": "mlp",
            "q_a": "embed", "q_b": "latent", "kv_a": "embed",
            "kv_b": "latent", "shared_gate": "embed", "shared_up": "embed",
            "shared_down": "mlp", "experts_gate_up": "embed",
            "experts_down": "mlp", "router": "embed"}
_OUT_AXIS = {"q": "q_heads", "k": "kv_heads", "v": "kv_heads", "o": "embed",
             "gate": "mlp", "up": "mlp", "down": "embed",
             "q_a": "latent", "q_b": "q_heads", "kv_a": "latent",
             "kv_b": "q_heads", "shared_gate": "mlp", "shared_up": "mlp",
             "shared_down": "embed", "experts_gate_up": "mlp",
             "experts_down": "embed", "router": None}
# Routed-expert targets carry an expert axis after the layer axis.
_EXPERT_AXIS = {"experts_gate_up": ("experts",), "experts_down": ("experts",)}


@flax.struct.dataclass
class AdapterBank:
  """Stacked LoRA factors of all slots (see the module docstring)."""

  lora_a: dict[str, jax.Array]
  lora_b: dict[str, jax.Array]
  scale: jax.Array
  rank: jax.Array

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(self.lora_a)

  @property
  def num_slots(self) -> int:
    return int(self.scale.shape[0])

  @property
  def max_rank(self) -> int:
    return int(next(iter(self.lora_a.values())).shape[-1])

  def layer(self, layer_idx, rank: int | None = None) -> "LayerBank":
    """The bank of one layer; `layer_idx` may be traced (inside a scan).

    `rank` (static) keeps only the first `rank` rank columns: exact when
    every slot the batch reads has a true rank <= `rank` (the columns
    beyond are zero padding), and the gather-LoRA work then scales with
    `rank`, not with the bank's max_rank (the serving engine picks it per
    call from the rows' true ranks, see `rank_buckets`).
    """
    take = lambda x: jax.lax.dynamic_index_in_dim(x, layer_idx, 1, False)
    if rank is None or rank >= self.max_rank:
      cut_a = cut_b = lambda x: x
    else:
      cut_a = lambda x: x[..., :rank]
      cut_b = lambda x: x[..., :rank, :]
    return LayerBank(
        lora_a={t: cut_a(take(a)) for t, a in self.lora_a.items()},
        lora_b={t: cut_b(take(b)) for t, b in self.lora_b.items()},
        scale=self.scale, rank=self.rank)

  def nbytes(self) -> int:
    return sum(int(x.size) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(self))


@flax.struct.dataclass
class LayerBank:
  """One layer's slice of the bank: A[t]: [S, d_in, R], B[t]: [S, R, d_out],
  scale [S] and the true rank [S] (kernels skip padded rank beyond it)."""

  lora_a: dict[str, jax.Array]
  lora_b: dict[str, jax.Array]
  scale: jax.Array
  rank: jax.Array

  def lora(self, target: str):
    """(A, B, scale, rank) of one target: `lora_op.lora_project`'s `lora`."""
    return (self.lora_a[target], self.lora_b[target], self.scale, self.rank)


def rank_buckets(max_rank: int, smallest: int = 8) -> tuple[int, ...]:
  """Static rank widths a step is compiled for: max_rank halving down to
  `smallest` (one width when max_rank <= smallest), ascending."""
  out = [max_rank]
  while out[-1] // 2 >= smallest and out[-1] % 2 == 0:
    out.append(out[-1] // 2)
  return tuple(sorted(out))


def rank_bucket(buckets: tuple[int, ...], ranks) -> int:
  """The smallest bucket holding every true rank in `ranks` (host ints)."""
  need = max((int(r) for r in ranks), default=0)
  return next(b for b in buckets if b >= need)


def activation_axes(target: str) -> tuple[str, str]:
  """Logical axes of a target's input and output *activations* (where the
  gather-LoRA kernel's shards live): the bank's axes, with the fsdp-sharded
  parameter axis 'embed' read as the activation axis 'embed_act'."""
  act = lambda name: "embed_act" if name == "embed" else name
  return act(_IN_AXIS[target]), act(_OUT_AXIS[target])


def bank_shapes(config: ModelConfig, spec: BankSpec
                ) -> AdapterBank:
  """The bank's shapes as `jax.ShapeDtypeStruct` leaves."""
  dtype = jnp.dtype(spec.dtype)
  s, r = spec.num_slots, spec.max_rank
  a, b = {}, {}
  for t in spec.targets:
    shape_a, shape_b = factor_shapes(config, t, r)
    a[t] = jax.ShapeDtypeStruct((s, *shape_a), dtype)
    b[t] = jax.ShapeDtypeStruct((s, *shape_b), dtype)
  return AdapterBank(a, b, jax.ShapeDtypeStruct((s,), jnp.float32),
                     jax.ShapeDtypeStruct((s,), jnp.int32))


def bank_logical_axes(spec: BankSpec) -> AdapterBank:
  """Logical axis names of every bank tensor (same tree as the bank)."""
  e = lambda t: _EXPERT_AXIS.get(t, ())
  a = {t: ("slot", "layers", *e(t), _IN_AXIS[t], "lora_rank")
       for t in spec.targets}
  b = {t: ("slot", "layers", *e(t), "lora_rank", _OUT_AXIS[t])
       for t in spec.targets}
  return AdapterBank(a, b, ("slot",), ("slot",))


def init_bank(config: ModelConfig, spec: BankSpec, sharding=None
              ) -> AdapterBank:
  """An all-zero bank: every slot is the null adapter.

  Args:
    config: base model config.
    spec: bank shape class.
    sharding: optional pytree of shardings matching the bank (see
      `mintjax.sharding.bank_shardings`).
  """
  shapes = bank_shapes(config, spec)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  if sharding is None:
    return jax.tree.map(zeros, shapes)
  return jax.jit(lambda: jax.tree.map(zeros, shapes), out_shardings=sharding)()


def pad_weights(weights: AdapterWeights, config: ModelConfig,
                spec: BankSpec) -> dict:
  """Host-side padded slot contents: the arrays `write_slot` stores.

  Targets the adapter does not have are zeros. Validates first, so bad
  weights never reach the bank. VeRA adapters (`mintjax.adapters.vera`)
  arrive as `VeraWeights` and are materialised to LoRA factors here.
  """
  weights.validate(config, spec)
  weights = weights.to_lora(config)
  dtype = np.dtype(jnp.dtype(spec.dtype))
  r, big_r = weights.rank, spec.max_rank
  a, b = {}, {}
  for t in spec.targets:
    shape_a, shape_b = factor_shapes(config, t, big_r)
    a[t] = np.zeros(shape_a, dtype)
    b[t] = np.zeros(shape_b, dtype)
    if t in weights.lora_a:
      a[t][..., :r] = weights.lora_a[t]
      b[t][..., :r, :] = weights.lora_b[t]
  return dict(lora_a=a, lora_b=b, scale=np.float32(weights.scale),
              rank=np.int32(r))


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(bank: AdapterBank, slot, contents) -> AdapterBank:
  put = lambda x, v: jax.lax.dynamic_update_index_in_dim(
      x, v.astype(x.dtype), slot, 0)
  return AdapterBank(
      lora_a={t: put(x, contents["lora_a"][t]) for t, x in bank.lora_a.items()},
      lora_b={t: put(x, contents["lora_b"][t]) for t, x in bank.lora_b.items()},
      scale=put(bank.scale, contents["scale"]),
      rank=put(bank.rank, contents["rank"]))


def write_slot(bank: AdapterBank, slot: int, weights: AdapterWeights | None,
               config: ModelConfig, spec: BankSpec) -> AdapterBank:
  """Returns the bank with `slot` holding `weights` (None clears the slot).

  The old bank is donated: do not use it afterwards. The slot index is a
  traced argument, so writing any slot reuses one compiled program.

  Raises:
    AdapterError: slot 0 (the null adapter), a slot out of range, or weights
      that do not fit the spec.
  """
  if not 0 < slot < bank.num_slots:
    raise AdapterError(
        f"slot {slot} is not writable: slots 1..{bank.num_slots - 1} hold "
        "adapters and slot 0 is the null adapter")
  if weights is None:
    contents = jax.tree.map(
        lambda x: np.zeros(x.shape[1:], x.dtype),
        dict(lora_a=bank.lora_a, lora_b=bank.lora_b, scale=bank.scale,
             rank=bank.rank))
  else:
    contents = pad_weights(weights, config, spec)
  return _write_slot(bank, jnp.int32(slot), contents)


def read_slot(bank: AdapterBank, slot: int, alpha: float | None = None,
              use_rslora: bool = False) -> AdapterWeights:
  """Reads a slot back to host as unpadded `AdapterWeights`.

  The true rank comes from the bank; `alpha` defaults to scale * rank (so the
  round trip preserves the scale).
  """
  rank = int(bank.rank[slot])
  if rank <= 0:
    raise AdapterError(f"slot {slot} is empty")
  a = {t: np.asarray(x[slot, ..., :rank]) for t, x in bank.lora_a.items()}
  b = {t: np.asarray(x[slot, ..., :rank, :]) for t, x in bank.lora_b.items()}
  scale = float(bank.scale[slot])
  if alpha is None:
    alpha = scale * (np.sqrt(rank) if use_rslora else rank)
  return AdapterWeights(a, b, rank=rank, alpha=float(alpha),
                        use_rslora=use_rslora)


def bank_from_weights(config: ModelConfig, spec: BankSpec,
                      weights: Mapping[int, AdapterWeights]) -> AdapterBank:
  """A bank with the given slots filled (others null); built on the host."""
  shapes = bank_shapes(config, spec)
  host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  for slot, w in weights.items():
    if not 0 < slot < spec.num_slots:
      raise AdapterError(f"slot {slot} out of range 1..{spec.num_slots - 1}")
    c = pad_weights(w, config, spec)
    for t in spec.targets:
      host.lora_a[t][slot] = c["lora_a"][t]
      host.lora_b[t][slot] = c["lora_b"][t]
    host.scale[slot] = c["scale"]
    host.rank[slot] = c["rank"]
  return jax.tree.map(jnp.asarray, host)
