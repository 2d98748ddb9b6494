"""What an adapter is and what a bank holds: one spec per concept.

Owns
  `AdapterInfo`     the *adapter spec*: what one adapter is (family, targets,
                    rank, alpha and scale rule, dtype, family extras such as
                    VeRA's basis_seed). It is the adapter's identity in the
                    store (`mintjax.store` records its `to_dict()`), and the
                    store's row layout is derived from it.
  `BankSpec`        the *bank spec*: what a compiled step holds (family,
                    targets, max_rank, num_slots, dtype); every compiled shape
                    follows from it. `num_slots` always counts the null slot
                    0, so a bank serves num_slots - 1 adapters
                    (`BankSpec.for_adapters` converts from that count).
  `AdapterWeights`  one adapter's LoRA factors as numpy (the form every
                    family materialises to), with the LoRA scale rules
                    (alpha / r, rsLoRA alpha / sqrt(r)) and validation.
`AdapterSpec` is the bank spec's old name, kept while callers move over.
The family behind a spec's `variant` name is `spec.family`
(`mintjax.adapters.family`); the device-side bank is `mintjax.adapters.bank`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from mintjax.adapters.family import AdapterFamily, FamilyError, get_family
from mintjax.config import ModelConfig

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = ("q", "k", "v", "o")
# Targets of the MoE/MLA architectures (`mintjax.model.mla`, `.moe`). They
# stay out of ALL_TARGETS, which callers use as "every projection of a dense
# Llama-family base". MLA's output projection is 'o'. Shared experts are
# ordinary [L, d_in, r] rows (zero on dense layers). The routed experts'
# rows gain an expert axis, [L, E, d_in, r] / [L, E, r, d_out]; gate and up
# are one fused target, like transformers 5's `mlp.experts.gate_up_proj`
# (d_out = 2 * Fe, gate columns first), so PEFT's `target_parameters` maps
# onto them one to one. The router ([L, D, E] logits projection) is adapted
# only when a spec names 'router'; no default target set includes it.
MLA_TARGETS = ("q_a", "q_b", "kv_a", "kv_b")
SHARED_EXPERT_TARGETS = ("shared_gate", "shared_up", "shared_down")
EXPERT_TARGETS = ("experts_gate_up", "experts_down")
ROUTER_TARGET = "router"
KNOWN_TARGETS = (ALL_TARGETS[:1] + MLA_TARGETS + ALL_TARGETS[1:] +
                 SHARED_EXPERT_TARGETS + EXPERT_TARGETS + (ROUTER_TARGET,))
DTYPES = ("float32", "bfloat16", "float16")


class AdapterError(ValueError):
  """An adapter's weights or spec are invalid for the bank or base model."""


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
  """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  if rank <= 0:
    raise AdapterError(f"LoRA rank must be positive, got {rank}")
  return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _check_targets(targets) -> tuple[str, ...]:
  targets = tuple(targets)
  if not targets:
    raise AdapterError("an adapter needs at least one target projection")
  bad = [t for t in targets if t not in KNOWN_TARGETS]
  if bad:
    raise AdapterError(
        f"unknown target projections {bad}; expected a subset of "
        f"{KNOWN_TARGETS}")
  if len(set(targets)) != len(targets):
    raise AdapterError(f"duplicate target projections in {targets}")
  # Canonical order keeps pytrees and fingerprints stable.
  return tuple(t for t in KNOWN_TARGETS if t in targets)


def target_shape(config: ModelConfig, target: str) -> tuple[int, ...]:
  """(*lead, d_in, d_out) of one target's LoRA: lead is (L,) for a
  per-layer projection and (L, E) for a routed-expert target.

  Raises:
    AdapterError: the target does not exist in this architecture.
  """
  c = config
  if target == ROUTER_TARGET:
    if not c.num_moe_layers:
      raise AdapterError(
          f"target 'router' needs routed experts, but {c.architecture} has "
          "none; drop it from the targets")
    return (c.num_layers, c.hidden_size, c.num_experts)
  if target in EXPERT_TARGETS:
    if not c.num_moe_layers:
      raise AdapterError(
          f"target {target!r} needs routed experts, but {c.architecture} has "
          "none; drop it from the targets")
    d, f = c.hidden_size, c.moe_intermediate_size
    shape = (d, 2 * f) if target == "experts_gate_up" else (f, d)
    return (c.num_layers, c.num_experts, *shape)
  if target in SHARED_EXPERT_TARGETS:
    if not (c.num_moe_layers and c.n_shared_experts):
      raise AdapterError(
          f"target {target!r} needs shared experts, but {c.architecture} has "
          "none; drop it from the targets")
    d, f = c.hidden_size, c.shared_expert_size
    return (c.num_layers, *((f, d) if target == "shared_down" else (d, f)))
  if target not in c.projection_names():
    raise AdapterError(
        f"target {target!r} is not a projection of {c.architecture}"
        f"{' (multi-head latent attention)' if c.uses_mla else ''}; expected "
        f"a subset of {c.projection_names()}")
  return (c.num_layers, *c.projection_shape(target))


def factor_shapes(config: ModelConfig, target: str, rank: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of one target's A [*lead, d_in, r] and B [*lead, r, d_out]."""
  *lead, d_in, d_out = target_shape(config, target)
  return (*lead, d_in, rank), (*lead, rank, d_out)


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return ml_dtypes.bfloat16
  return np.dtype(name)


def _lookup_family(name) -> AdapterFamily:
  try:
    return get_family(name)
  except FamilyError as e:
    raise AdapterError(str(e)) from None


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class BankSpec:
  """The bank spec: what a compiled step holds; fixes every compiled shape.

  Attributes:
    targets: projections carrying adapters, a subset of ALL_TARGETS.
    max_rank: R, the rank every slot is zero-padded to.
    num_slots: S, bank slots *including* the null slot 0 (so S - 1 adapters
      fit); `for_adapters` builds a spec from the adapter count.
    dtype: dtype of the bank's factors.
    variant: the adapter family's name ('lora', 'vera', or any registered
      family); `family` is its implementation.
    basis_seed: seed of a shared frozen basis (part of the shape class of
      families that have one, e.g. 'vera'; unused by 'lora').
  """

  targets: tuple[str, ...] = ("q", "v")
  max_rank: int = 8
  num_slots: int = 8
  dtype: str = "float32"
  variant: str = "lora"
  basis_seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "targets", _check_targets(self.targets))
    if not _is_int(self.max_rank) or self.max_rank <= 0:
      raise AdapterError(f"max_rank must be positive, got {self.max_rank}")
    if not _is_int(self.num_slots) or self.num_slots < 2:
      raise AdapterError(
          f"num_slots must be >= 2 (slot 0 is the null adapter), got "
          f"{self.num_slots}")
    if self.dtype not in DTYPES:
      raise AdapterError(f"unsupported adapter dtype {self.dtype!r}")
    _lookup_family(self.variant)
    if not _is_int(self.basis_seed) or self.basis_seed < 0:
      raise AdapterError(
          f"basis_seed must be an int >= 0, got {self.basis_seed!r}")

  @classmethod
  def for_adapters(cls, num_adapters: int, **fields) -> "BankSpec":
    """A bank holding `num_adapters` adapters plus the null slot 0: the one
    place an adapter count becomes `num_slots`."""
    if not _is_int(num_adapters) or num_adapters < 1:
      raise AdapterError(
          f"a bank needs room for at least one adapter, got {num_adapters!r}")
    return cls(num_slots=int(num_adapters) + 1, **fields)

  @property
  def family(self) -> AdapterFamily:
    """The adapter family implementing this spec's `variant`."""
    return get_family(self.variant)

  def replace(self, **changes) -> "BankSpec":
    return dataclasses.replace(self, **changes)

  def params_per_adapter(self, config: ModelConfig, rank: int | None = None
                         ) -> int:
    """Numbers one stored adapter of rank `rank` (default max_rank) owns
    (LoRA: L * r * (d_in + d_out) per target; VeRA: L * (r + d_out), its
    shared basis not counted)."""
    return self.family.params_per_adapter(
        {t: target_shape(config, t) for t in self.targets},
        self.max_rank if rank is None else rank)

  def stored_bytes(self, config: ModelConfig, rank: int | None = None) -> int:
    """Bytes one adapter occupies in the store (`params_per_adapter` times
    the dtype size): the per-user size the scaling study plots against."""
    return self.params_per_adapter(config, rank) * np.dtype(
        _np_dtype(self.dtype)).itemsize

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "BankSpec":
    d = dict(d)
    d["targets"] = tuple(d["targets"])
    return cls(**d)


# The bank spec's old name; converted callers say BankSpec.
AdapterSpec = BankSpec


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
  """The adapter spec: what one adapter is (fixed when it is created; every
  revision in the store must match it).

  Attributes:
    targets: projections carrying the adapter, subset of ALL_TARGETS.
    rank: true rank r (rows are stored at exactly this rank).
    alpha: scale = alpha / r (or alpha / sqrt(r) with rsLoRA). Never
      invented: `from_dict` fills a missing alpha with r (scale 1) only as
      the documented rule of the stored-JSON format.
    use_rslora: rank-stabilised scale rule (families that allow it).
    variant: the adapter family's name ('lora', 'vera', ...).
    dtype: stored dtype ('float32', 'bfloat16', 'float16').
    basis_seed: a family extra: the shared basis seed of families that have
      one (VeRA, default 0); None for the others.
  """

  targets: tuple[str, ...]
  rank: int
  alpha: float
  use_rslora: bool = False
  variant: str = "lora"
  dtype: str = "float32"
  basis_seed: int | None = None

  def __post_init__(self):
    family = _lookup_family(self.variant)
    object.__setattr__(self, "targets", _check_targets(self.targets))
    if not _is_int(self.rank) or self.rank <= 0:
      raise AdapterError(f"rank must be a positive int, got {self.rank!r}")
    object.__setattr__(self, "rank", int(self.rank))
    if self.dtype not in DTYPES:
      raise AdapterError(
          f"unsupported adapter dtype {self.dtype!r}; expected one of "
          f"{DTYPES}")
    if "basis_seed" in family.extras:
      if self.basis_seed is None:
        object.__setattr__(self, "basis_seed", family.extras["basis_seed"])
      if not _is_int(self.basis_seed) or self.basis_seed < 0:
        raise AdapterError(
            f"basis_seed must be an int >= 0, got {self.basis_seed!r}")
    elif self.basis_seed is not None:
      raise AdapterError(
          f"basis_seed={self.basis_seed!r} is only meaningful for families "
          f"with a shared basis (e.g. 'vera'), got variant {self.variant!r}")
    if (isinstance(self.alpha, bool) or
        not isinstance(self.alpha, (int, float, np.floating, np.integer)) or
        not math.isfinite(self.alpha) or self.alpha <= 0):
      raise AdapterError(
          f"alpha must be a positive finite number, got {self.alpha!r}")
    object.__setattr__(self, "alpha", float(self.alpha))
    if not isinstance(self.use_rslora, (bool, np.bool_)):
      raise AdapterError(
          f"use_rslora must be True or False, got {self.use_rslora!r}")
    object.__setattr__(self, "use_rslora", bool(self.use_rslora))
    if self.use_rslora and not family.supports_rslora:
      raise AdapterError(
          f"{self.variant} adapters use scale alpha / r; use_rslora must be "
          "False")
    problem = family.check_info(self)
    if problem:
      raise AdapterError(problem)

  @property
  def family(self) -> AdapterFamily:
    """The adapter family implementing this spec's `variant`."""
    return get_family(self.variant)

  @property
  def scale(self) -> float:
    return lora_scale(self.rank, self.alpha, self.use_rslora)

  @classmethod
  def for_bank(cls, spec: BankSpec, *, alpha: float, rank: int | None = None,
               use_rslora: bool = False) -> "AdapterInfo":
    """The adapter spec of an adapter trained in bank `spec` (rank defaults
    to the bank's max_rank; alpha is always given)."""
    family = spec.family
    return cls(spec.targets, spec.max_rank if rank is None else rank, alpha,
               use_rslora, spec.variant, spec.dtype,
               spec.basis_seed if "basis_seed" in family.extras else None)

  def as_lora(self) -> "AdapterInfo":
    """The same adapter described as plain LoRA (what a materialised copy
    of it is, e.g. a PEFT export)."""
    return AdapterInfo(self.targets, self.rank, self.alpha, self.use_rslora,
                       "lora", self.dtype)

  def to_dict(self) -> dict:
    """The stored JSON form (unchanged since the first registries: LoRA specs
    carry no basis_seed key)."""
    d = dataclasses.asdict(self)
    d["targets"] = list(self.targets)
    if d["basis_seed"] is None:
      del d["basis_seed"]
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "AdapterInfo":
    """Parses a stored or user-written spec dict.

    Keys: targets, rank, alpha, use_rslora, variant, dtype, basis_seed.
    A missing alpha means alpha = rank (scale 1): the rule of the stored
    format, which has always written alpha, and of hand-written specs.

    Raises:
      AdapterError: unknown keys or invalid values, naming them.
    """
    if not isinstance(d, Mapping):
      raise AdapterError(
          f"an adapter spec must be a dict with targets and rank, got "
          f"{type(d).__name__}")
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise AdapterError(
          f"unknown keys {sorted(unknown)}; expected targets, rank, alpha, "
          "use_rslora, variant, dtype, basis_seed")
    missing = [k for k in ("targets", "rank") if k not in d]
    if missing:
      raise AdapterError(f"missing keys {missing}")
    if isinstance(d["targets"], str):
      raise AdapterError(
          f"targets must be a list of projections, got {d['targets']!r}")
    d.setdefault("alpha", d["rank"])
    return cls(**d)


def check_factor(name: str, arr, want: tuple[int, ...], config: ModelConfig,
                 rank: int) -> None:
  """Raises AdapterError unless `arr` has shape `want` and is all finite."""
  if tuple(np.shape(arr)) != tuple(want):
    raise AdapterError(
        f"{name} has shape {tuple(np.shape(arr))}, expected {tuple(want)} "
        f"for {config.architecture} with {config.num_layers} layers and rank "
        f"{rank}")
  if not np.all(np.isfinite(np.asarray(arr, dtype=np.float32))):
    raise AdapterError(f"{name} contains NaN or Inf values; refusing to use it")


def check_fits_spec(targets, rank, spec: "BankSpec | None") -> None:
  """Raises AdapterError unless rank > 0 and (targets, rank) fit `spec`."""
  if not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise AdapterError(f"rank must be a positive int, got {rank!r}")
  if spec is None:
    return
  extra = set(targets) - set(spec.targets)
  if extra:
    raise AdapterError(
        f"adapter targets {sorted(extra)} are not in the bank's targets "
        f"{spec.targets}; use a bank spec that includes them")
  if rank > spec.max_rank:
    raise AdapterError(
        f"adapter rank {rank} exceeds the bank's max_rank {spec.max_rank}; "
        "raise max_rank or use a smaller adapter")


@dataclasses.dataclass(frozen=True)
class AdapterWeights:
  """One adapter's weights on the host, unpadded.

  Attributes:
    lora_a: target -> float array [L, d_in, rank] ([L, E, d_in, rank] for
      a routed-expert target, see `target_shape`).
    lora_b: target -> float array [L, rank, d_out] ([L, E, rank, d_out]).
    rank: true LoRA rank r.
    alpha: LoRA alpha.
    use_rslora: scale is alpha / sqrt(r) instead of alpha / r.
  """

  lora_a: Mapping[str, np.ndarray]
  lora_b: Mapping[str, np.ndarray]
  rank: int
  alpha: float
  use_rslora: bool = False

  @property
  def targets(self) -> tuple[str, ...]:
    return _check_targets(self.lora_a)

  @property
  def scale(self) -> float:
    return lora_scale(self.rank, self.alpha, self.use_rslora)

  variant = "lora"

  def num_params(self) -> int:
    return sum(int(a.size) for a in self.lora_a.values()) + sum(
        int(b.size) for b in self.lora_b.values())

  @property
  def nbytes(self) -> int:
    """Host bytes of the factors (what a host cache holds)."""
    return sum(int(np.asarray(x).nbytes) for x in self.lora_a.values()) + sum(
        int(np.asarray(x).nbytes) for x in self.lora_b.values())

  def to_lora(self, config: ModelConfig | None = None) -> "AdapterWeights":
    """These LoRA factors (VeRA weights materialise here; LoRA is itself)."""
    del config
    return self

  def validate(self, config: ModelConfig, spec: BankSpec | None = None
               ) -> "AdapterWeights":
    """Checks shapes, targets, rank and finiteness; returns self.

    Raises:
      AdapterError: naming the tensor, what was expected and what was found.
    """
    if set(self.lora_a) != set(self.lora_b):
      raise AdapterError(
          f"lora_a targets {sorted(self.lora_a)} differ from lora_b targets "
          f"{sorted(self.lora_b)}")
    targets = self.targets
    check_fits_spec(targets, self.rank, spec)
    for t in targets:
      want_a, want_b = factor_shapes(config, t, self.rank)
      for name, arr, want in (("lora_a", self.lora_a[t], want_a),
                              ("lora_b", self.lora_b[t], want_b)):
        check_factor(f"{name}[{t!r}]", arr, want, config, self.rank)
    if not math.isfinite(self.alpha):
      raise AdapterError(f"alpha must be finite, got {self.alpha}")
    return self

  @classmethod
  def random(cls, config: ModelConfig, targets, rank: int, *,
             alpha: float | None = None, seed: int = 0, std: float = 0.02,
             dtype=np.float32) -> "AdapterWeights":
    """A random adapter with both factors non-zero (for tests and demos).

    PEFT initialises B to zero, which makes a fresh adapter a no-op; here both
    factors are random so that the adapter visibly changes the output.
    """
    rng = np.random.default_rng(seed)
    targets = _check_targets(targets)
    a, b = {}, {}
    for t in targets:
      shape_a, shape_b = factor_shapes(config, t, rank)
      a[t] = (rng.standard_normal(shape_a) /
              math.sqrt(shape_a[-2])).astype(dtype)
      b[t] = (rng.standard_normal(shape_b) *
              std * math.sqrt(rank)).astype(dtype)
    return cls(a, b, rank=rank, alpha=float(alpha if alpha is not None else
                                            rank))
