"""VeRA adapters: a frozen shared random basis plus per-user scaling vectors.

Owns the smaller-than-LoRA adapter family (`BankSpec(variant="vera")`,
Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", 2024), all of
it behind `VeraFamily` (`FAMILY`, the 'vera' entry of
`mintjax.adapters.family`):

  `VeraBasis`      the frozen random factors every adapter of a shape class
                   shares, A_shared[t]: [L, d_in, R], B_shared[t]: [L, R, d_out],
                   generated deterministically by `vera_basis` from the
                   `basis_seed` and the model shapes (never stored per user).
  `VeraWeights`    one user's adapter on the host: lambda_d[t]: [L, r] and
                   lambda_b[t]: [L, d_out] only, i.e. L * (r + d_out) numbers
                   per target instead of LoRA's L * r * (d_in + d_out).
  `VeraBank`       the trainer's stacked state: the vectors of every slot with
                   a leading slot axis plus the frozen basis, and
                   `materialize_bank`, the jit-able map to an `AdapterBank`.

Materialisation. With A = A_shared[..., :r] and B = B_shared[:, :r, :],

  A' = A * lambda_d[:, None, :]      B' = B * lambda_b[:, None, :]

are ordinary LoRA factors (x @ A' @ B' = x A diag(lambda_d) B diag(lambda_b)),
so the bank layout, the gather-LoRA op, the Pallas kernels and the serving
steps run unchanged on VeRA adapters: serving writes `to_lora(config)` into a
slot, and training materialises the whole bank inside the loss so gradients
reach the vectors only. A slot's scale is alpha / r as for LoRA (alpha
defaults to r, scale 1, since VeRA has no alpha of its own).

The basis. Each target's A and B are drawn from their own numpy generator
seeded by sha256(basis_seed, target, factor), Kaiming-uniform like the VeRA
paper: A ~ U(+-1/sqrt(d_in)), B ~ U(+-1/sqrt(d_out)). Unlike PEFT, whose B
bound uses the basis rank, both bounds and the draw order (rank-major) are
independent of the bank's max_rank, so a rank-r adapter's basis is the first r
columns whatever R the bank uses, and a stored adapter means the same thing in
every bank. Init per the paper: lambda_b = 0 (a fresh adapter is exactly the
base model), lambda_d = `VERA_D_INIT`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mintjax.adapters.bank import AdapterBank
from mintjax.adapters.bank import _IN_AXIS, _OUT_AXIS  # pylint: disable=protected-access
from mintjax.adapters.family import AdapterFamily
from mintjax.adapters.spec import (AdapterError, AdapterInfo, BankSpec,
                                   AdapterWeights, check_factor,
                                   check_fits_spec, _check_targets,
                                   lora_scale)
from mintjax.config import ModelConfig

# The paper initialises lambda_d to a small constant (0.1 in its experiments).
VERA_D_INIT = 0.1


# ----------------------------------------------------------------- the basis


def _rng(basis_seed: int, target: str, factor: str) -> np.random.Generator:
  digest = hashlib.sha256(f"vera:{basis_seed}:{target}:{factor}".encode())
  return np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))


@functools.lru_cache(maxsize=64)
def basis_factors(basis_seed: int, target: str, num_layers: int, d_in: int,
                  d_out: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """The frozen basis of one target, first `rank` columns (float32, host).

  Drawn rank-major, so the result for rank r is exactly the first r columns
  of the result for any larger rank. Cached: every slot write of a VeRA
  adapter needs it. The returned arrays are read-only.

  Returns:
    (a_ldr [L, d_in, rank], b_lro [L, rank, d_out]).
  """
  if rank <= 0:
    raise AdapterError(f"VeRA basis rank must be positive, got {rank}")
  a_rld = _rng(basis_seed, target, "A").uniform(
      -1.0, 1.0, (rank, num_layers, d_in)) / math.sqrt(d_in)
  b_rlo = _rng(basis_seed, target, "B").uniform(
      -1.0, 1.0, (rank, num_layers, d_out)) / math.sqrt(d_out)
  a_ldr = np.ascontiguousarray(a_rld.transpose(1, 2, 0), np.float32)
  b_lro = np.ascontiguousarray(b_rlo.transpose(1, 0, 2), np.float32)
  a_ldr.flags.writeable = False
  b_lro.flags.writeable = False
  return a_ldr, b_lro


@flax.struct.dataclass
class VeraBasis:
  """Frozen shared factors: a[t]: [L, d_in, R], b[t]: [L, R, d_out]."""

  a: dict[str, jax.Array]
  b: dict[str, jax.Array]


def vera_basis(config: ModelConfig, targets, max_rank: int, basis_seed: int,
               dtype="float32") -> VeraBasis:
  """The shared basis of a shape class, as device arrays of `dtype`."""
  a, b = {}, {}
  for t in _check_targets(targets):
    d_in, d_out = config.projection_shape(t)
    a_np, b_np = basis_factors(int(basis_seed), t, config.num_layers, d_in,
                               d_out, int(max_rank))
    a[t] = jnp.asarray(a_np, dtype)
    b[t] = jnp.asarray(b_np, dtype)
  return VeraBasis(a, b)


# ------------------------------------------------------- one user's adapter


@dataclasses.dataclass(frozen=True)
class VeraWeights:
  """One VeRA adapter on the host (what the registry stores).

  Attributes:
    lambda_d: target -> float array [L, rank], scales the basis' rank axis.
    lambda_b: target -> float array [L, d_out], scales the output axis.
    rank: true rank r (the first r basis columns are used).
    basis_seed: seed of the shared basis these vectors belong to.
    alpha: scale = alpha / rank, as for LoRA; None means rank (scale 1).
  """

  lambda_d: Mapping[str, np.ndarray]
  lambda_b: Mapping[str, np.ndarray]
  rank: int
  basis_seed: int = 0
  alpha: float | None = None

  def __post_init__(self):
    if self.alpha is None:
      object.__setattr__(self, "alpha", float(self.rank))

  variant = "vera"
  use_rslora = False

  @property
  def targets(self) -> tuple[str, ...]:
    return _check_targets(self.lambda_d)

  @property
  def scale(self) -> float:
    return lora_scale(self.rank, self.alpha)

  def num_params(self) -> int:
    return sum(int(np.size(x)) for x in self.lambda_d.values()) + sum(
        int(np.size(x)) for x in self.lambda_b.values())

  @property
  def nbytes(self) -> int:
    """Host bytes of the vectors (the stored size, not the materialised)."""
    return sum(int(np.asarray(x).nbytes) for x in self.lambda_d.values()) + sum(
        int(np.asarray(x).nbytes) for x in self.lambda_b.values())

  def validate(self, config: ModelConfig, spec: BankSpec | None = None
               ) -> "VeraWeights":
    """Checks targets, rank, shapes and finiteness; returns self.

    A spec of variant 'lora' is a serving bank (VeRA adapters are written
    into it materialised); a 'vera' spec must also match the basis seed.

    Raises:
      AdapterError: naming the vector, what was expected and what was found.
    """
    if set(self.lambda_d) != set(self.lambda_b):
      raise AdapterError(
          f"lambda_d targets {sorted(self.lambda_d)} differ from lambda_b "
          f"targets {sorted(self.lambda_b)}")
    targets = self.targets
    check_fits_spec(targets, self.rank, spec)
    if spec is not None:
      if spec.variant == "vera" and spec.basis_seed != self.basis_seed:
        raise AdapterError(
            f"VeRA adapter uses basis_seed {self.basis_seed}, the bank's "
            f"basis is seed {spec.basis_seed}; the vectors only mean "
            "something on their own basis: use a bank with that basis_seed")
    for t in targets:
      _, d_out = config.projection_shape(t)
      for name, arr, want in (
          ("lambda_d", self.lambda_d[t], (config.num_layers, self.rank)),
          ("lambda_b", self.lambda_b[t], (config.num_layers, d_out))):
        check_factor(f"{name}[{t!r}]", arr, want, config, self.rank)
    if not math.isfinite(self.alpha):
      raise AdapterError(f"alpha must be finite, got {self.alpha}")
    return self

  def to_lora(self, config: ModelConfig) -> AdapterWeights:
    """The equivalent LoRA factors (validates first); see the module doc."""
    self.validate(config)
    return _to_lora(self, {t: (config.num_layers, *config.projection_shape(t))
                           for t in self.targets})

  @classmethod
  def init(cls, config: ModelConfig, targets, rank: int, basis_seed: int = 0,
           alpha: float | None = None, d_init: float = VERA_D_INIT
           ) -> "VeraWeights":
    """A fresh adapter per the paper: lambda_b = 0, lambda_d = d_init."""
    targets = _check_targets(targets)
    ld = {t: np.full((config.num_layers, rank), d_init, np.float32)
          for t in targets}
    lb = {t: np.zeros((config.num_layers, config.projection_shape(t)[1]),
                      np.float32) for t in targets}
    return cls(ld, lb, rank=rank, basis_seed=basis_seed, alpha=alpha)

  @classmethod
  def random(cls, config: ModelConfig, targets, rank: int, *,
             basis_seed: int = 0, seed: int = 0, alpha: float | None = None,
             std: float = 0.5) -> "VeraWeights":
    """Random non-zero vectors that visibly change the output (tests, demos).

    lambda_d ~ U(0.5, 1.5), lambda_b ~ N(0, std^2). The basis entries are
    ~1/sqrt(3 d), so a delta comparable to a LoRA adapter's needs std of
    order sqrt(d_in * d_out / r) / 10 or more.
    """
    rng = np.random.default_rng(seed)
    targets = _check_targets(targets)
    ld = {t: rng.uniform(0.5, 1.5, (config.num_layers, rank)
                         ).astype(np.float32) for t in targets}
    lb = {t: (rng.standard_normal((config.num_layers,
                                   config.projection_shape(t)[1])) * std
              ).astype(np.float32) for t in targets}
    return cls(ld, lb, rank=rank, basis_seed=basis_seed, alpha=alpha)


def _to_lora(w: VeraWeights, shapes: Mapping[str, tuple[int, int, int]]
             ) -> AdapterWeights:
  """LoRA factors of `w`; `shapes` maps each target to (L, d_in, d_out)."""
  a, b = {}, {}
  for t in w.targets:
    a_ldr, b_lro = basis_factors(int(w.basis_seed), t, *shapes[t],
                                 int(w.rank))
    ld = np.asarray(w.lambda_d[t], np.float32)
    lb = np.asarray(w.lambda_b[t], np.float32)
    a[t] = a_ldr * ld[:, None, :]
    b[t] = b_lro * lb[:, None, :]
  return AdapterWeights(a, b, rank=int(w.rank), alpha=float(w.alpha))


# --------------------------------------------------- the trainer's bank


@flax.struct.dataclass
class VeraBank:
  """Stacked VeRA state of every slot (the trainer's `bank` argument).

  Attributes:
    lambda_d: target -> [S, L, R] (zero past each slot's rank).
    lambda_b: target -> [S, L, d_out].
    scale: [S] float32 per-slot scale.
    rank: [S] int32 true rank (0 = empty slot).
    basis: the frozen shared basis (rank R). It rides along so the compiled
      step keeps its (base, bank, opt_state, batch) signature; it is never
      differentiated or given optimizer state, and donation returns it
      unchanged without a copy.
  """

  lambda_d: dict[str, jax.Array]
  lambda_b: dict[str, jax.Array]
  scale: jax.Array
  rank: jax.Array
  basis: VeraBasis

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(self.lambda_d)

  @property
  def num_slots(self) -> int:
    return int(self.scale.shape[0])

  @property
  def max_rank(self) -> int:
    return int(next(iter(self.lambda_d.values())).shape[-1])

  def materialize(self) -> AdapterBank:
    return materialize_bank(self.basis, self.lambda_d, self.lambda_b,
                            self.scale, self.rank)


def materialize_bank(basis: VeraBasis, lambda_d, lambda_b, scale_s, rank_s
                     ) -> AdapterBank:
  """The LoRA bank equivalent to stacked VeRA vectors (jit-able).

  Args:
    basis: shared factors, a[t]: [L, d_in, R], b[t]: [L, R, d_out].
    lambda_d: target -> [S, L, R].
    lambda_b: target -> [S, L, d_out].
    scale_s: [S] float32.
    rank_s: [S] int32.

  Returns:
    AdapterBank with lora_a[t]: [S, L, d_in, R], lora_b[t]: [S, L, R, d_out].
  """
  basis = jax.lax.stop_gradient(basis)
  # lambda_d is zero past each slot's rank, which already zeroes A' there;
  # B' is masked too so the bank keeps its invariant that padding is zero.
  r = next(iter(lambda_d.values())).shape[-1]
  keep_sr = jnp.arange(r)[None, :] < rank_s[:, None]
  a, b = {}, {}
  for t in lambda_d:
    dtype = basis.a[t].dtype
    a[t] = basis.a[t][None] * lambda_d[t][:, :, None, :].astype(dtype)
    b[t] = jnp.where(keep_sr[:, None, :, None], basis.b[t][None] *
                     lambda_b[t][:, :, None, :].astype(dtype), 0).astype(dtype)
  return AdapterBank(a, b, scale_s, rank_s)


def vera_bank_shapes(config: ModelConfig, spec: BankSpec) -> VeraBank:
  """The VeRA bank's shapes as `jax.ShapeDtypeStruct` leaves."""
  dtype = jnp.dtype(spec.dtype)
  s, l, r = spec.num_slots, config.num_layers, spec.max_rank
  ld, lb, ba, bb = {}, {}, {}, {}
  for t in spec.targets:
    d_in, d_out = config.projection_shape(t)
    ld[t] = jax.ShapeDtypeStruct((s, l, r), dtype)
    lb[t] = jax.ShapeDtypeStruct((s, l, d_out), dtype)
    ba[t] = jax.ShapeDtypeStruct((l, d_in, r), dtype)
    bb[t] = jax.ShapeDtypeStruct((l, r, d_out), dtype)
  return VeraBank(ld, lb, jax.ShapeDtypeStruct((s,), jnp.float32),
                  jax.ShapeDtypeStruct((s,), jnp.int32), VeraBasis(ba, bb))


def vera_bank_logical_axes(spec: BankSpec) -> VeraBank:
  """Logical axis names of every VeRA bank tensor (same tree as the bank)."""
  ts = spec.targets
  return VeraBank(
      lambda_d={t: ("slot", "layers", "lora_rank") for t in ts},
      lambda_b={t: ("slot", "layers", _OUT_AXIS[t]) for t in ts},
      scale=("slot",), rank=("slot",),
      basis=VeraBasis(
          a={t: ("layers", _IN_AXIS[t], "lora_rank") for t in ts},
          b={t: ("layers", "lora_rank", _OUT_AXIS[t]) for t in ts}))


def vera_bank_from_weights(config: ModelConfig, spec: BankSpec,
                           weights: Mapping[int, VeraWeights]) -> VeraBank:
  """A VeRA bank with the given slots filled (others empty), built on host.

  Raises:
    AdapterError: spec not 'vera', a slot out of range, or weights that do
      not fit the spec (wrong basis seed, rank, targets or shapes).
  """
  if spec.variant != "vera":
    raise AdapterError(
        f"a VeRA bank needs BankSpec(variant='vera'), got variant "
        f"{spec.variant!r}; LoRA banks are built by bank_from_weights")
  shapes = vera_bank_shapes(config, spec)
  host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  for slot, w in weights.items():
    if not 0 < slot < spec.num_slots:
      raise AdapterError(f"slot {slot} out of range 1..{spec.num_slots - 1}")
    if not isinstance(w, VeraWeights):
      raise AdapterError(
          f"slot {slot}: a VeRA bank holds VeraWeights, got "
          f"{type(w).__name__}")
    w.validate(config, spec)
    for t in w.targets:
      host.lambda_d[t][slot, :, :w.rank] = w.lambda_d[t]
      host.lambda_b[t][slot] = w.lambda_b[t]
    host.scale[slot] = w.scale
    host.rank[slot] = w.rank
  basis = vera_basis(config, spec.targets, spec.max_rank, spec.basis_seed,
                     spec.dtype)
  return VeraBank(
      lambda_d={t: jnp.asarray(x) for t, x in host.lambda_d.items()},
      lambda_b={t: jnp.asarray(x) for t, x in host.lambda_b.items()},
      scale=jnp.asarray(host.scale), rank=jnp.asarray(host.rank), basis=basis)


def read_vera_slot(bank: VeraBank, slot: int, basis_seed: int,
                   alpha: float | None = None) -> VeraWeights:
  """Reads a slot back to host as unpadded `VeraWeights`.

  `alpha` defaults to scale * rank, so the round trip preserves the scale.
  """
  rank = int(bank.rank[slot])
  if rank <= 0:
    raise AdapterError(f"slot {slot} is empty")
  ld = {t: np.asarray(x[slot, :, :rank]) for t, x in bank.lambda_d.items()}
  lb = {t: np.asarray(x[slot]) for t, x in bank.lambda_b.items()}
  if alpha is None:
    alpha = float(bank.scale[slot]) * rank
  return VeraWeights(ld, lb, rank=rank, basis_seed=int(basis_seed),
                     alpha=float(alpha))


# ------------------------------------------------------------ the family


class VeraFamily(AdapterFamily):
  """VeRA behind the family interface (see the module docstring)."""

  name = "vera"
  tensor_names = ("lambda_d", "lambda_b")
  weights_type = VeraWeights
  bank_type = VeraBank
  supports_rslora = False  # VeRA's scale is alpha / r.
  extras = {"basis_seed": 0}

  def init(self, config, info: AdapterInfo, *, user, seed):
    del user, seed  # The paper's init is the same for every user.
    return VeraWeights.init(config, info.targets, info.rank, info.basis_seed,
                            alpha=info.alpha)

  def stored_shapes(self, rank, shape):
    l, _, d_out = shape
    return (l, rank), (l, d_out)

  def tensors(self, weights):
    return weights.lambda_d, weights.lambda_b

  def from_tensors(self, info, first, second, meta):
    del meta  # Only the vectors: materialised by consumers.
    return VeraWeights(dict(first), dict(second), info.rank, info.basis_seed,
                       info.alpha)

  def to_lora(self, weights, shapes):
    return _to_lora(weights, shapes)

  def check_weights(self, adapter_id, info, weights):
    if weights.basis_seed != info.basis_seed or set(
        weights.lambda_d) != set(info.targets):
      return (f"VeRA weights for {adapter_id!r} have basis_seed "
              f"{weights.basis_seed}, targets {sorted(weights.lambda_d)}; "
              f"the adapter was created with basis_seed {info.basis_seed}, "
              f"targets {list(info.targets)}. The vectors only mean "
              "something on their own basis: publish to an adapter created "
              "with that spec")
    return None

  def bank_shapes(self, config, spec):
    return vera_bank_shapes(config, spec)

  def bank_logical_axes(self, spec):
    return vera_bank_logical_axes(spec)

  def bank_from_weights(self, config, spec, weights):
    return vera_bank_from_weights(config, spec, weights)

  def read_slot(self, bank, slot, info):
    return read_vera_slot(bank, slot, info.basis_seed, alpha=info.alpha)

  def trainable(self, bank):
    return {"lambda_d": bank.lambda_d, "lambda_b": bank.lambda_b}

  def rank_mask(self, bank):
    # Padding is lambda_d past the rank (the basis columns there are not
    # zero, so their gradient would be), and lambda_b of empty slots.
    keep_sr = (jnp.arange(bank.max_rank)[None, :] < bank.rank[:, None]
               ).astype(jnp.float32)
    used_s = (bank.rank > 0).astype(jnp.float32)
    return {"lambda_d": {t: keep_sr[:, None, :] for t in bank.lambda_d},
            "lambda_b": {t: used_s[:, None, None] for t in bank.lambda_b}}

  def to_lora_bank(self, bank):
    return bank.materialize()


FAMILY = VeraFamily()
