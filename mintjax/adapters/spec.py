"""What an adapter is: its spec (shape class) and one adapter's host weights.

Owns `AdapterSpec` (which projections carry LoRA, the bank's `max_rank` and
`num_slots`, dtype), `AdapterWeights` (one adapter's A/B factors as numpy,
true rank and scale), the LoRA scale rules (alpha / r, rsLoRA alpha / sqrt(r))
and validation of weights against a model config. The device-side stacked bank
lives in `mintjax.adapters.bank`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from mintjax.config import ModelConfig

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = ("q", "k", "v", "o")
# 'vera': frozen shared random basis + per-user scaling vectors
# (mintjax.adapters.vera); it materialises to LoRA factors for the bank.
VARIANTS = ("lora", "vera")


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
  bad = [t for t in targets if t not in ALL_TARGETS]
  if bad:
    raise AdapterError(
        f"unknown target projections {bad}; expected a subset of {ALL_TARGETS}")
  if len(set(targets)) != len(targets):
    raise AdapterError(f"duplicate target projections in {targets}")
  # Canonical order keeps pytrees and fingerprints stable.
  return tuple(t for t in ALL_TARGETS if t in targets)


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return ml_dtypes.bfloat16
  return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Shape class of an adapter bank: fixes every compiled shape.

  Attributes:
    targets: projections carrying LoRA, a subset of ALL_TARGETS.
    max_rank: rank every slot is zero-padded to.
    num_slots: bank slots including the null slot 0.
    dtype: dtype of the A/B factors.
    variant: adapter family ('lora', or 'vera': see mintjax.adapters.vera).
    basis_seed: seed of the frozen shared VeRA basis (part of the shape
      class of 'vera' banks; unused by 'lora').
  """

  targets: tuple[str, ...] = ("q", "v")
  max_rank: int = 8
  num_slots: int = 8
  dtype: str = "float32"
  variant: str = "lora"
  basis_seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "targets", _check_targets(self.targets))
    if self.max_rank <= 0:
      raise AdapterError(f"max_rank must be positive, got {self.max_rank}")
    if self.num_slots < 2:
      raise AdapterError(
          f"num_slots must be >= 2 (slot 0 is the null adapter), got "
          f"{self.num_slots}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise AdapterError(f"unsupported adapter dtype {self.dtype!r}")
    if self.variant not in VARIANTS:
      raise AdapterError(
          f"unknown adapter variant {self.variant!r}; supported: {VARIANTS}")
    if (not isinstance(self.basis_seed, (int, np.integer)) or
        isinstance(self.basis_seed, bool) or self.basis_seed < 0):
      raise AdapterError(
          f"basis_seed must be an int >= 0, got {self.basis_seed!r}")

  def replace(self, **changes) -> "AdapterSpec":
    return dataclasses.replace(self, **changes)

  def params_per_adapter(self, config: ModelConfig, rank: int | None = None
                         ) -> int:
    """Trainable numbers one adapter of rank `rank` (default max_rank) owns.

    LoRA: L * r * (d_in + d_out) per target; VeRA: L * (r + d_out) per
    target (its basis is shared by every adapter and not counted).
    """
    r = self.max_rank if rank is None else rank
    shapes = [config.projection_shape(t) for t in self.targets]
    if self.variant == "vera":
      return config.num_layers * sum(r + d_out for _, d_out in shapes)
    return config.num_layers * sum(r * (d_in + d_out) for d_in, d_out in shapes)

  def stored_bytes(self, config: ModelConfig, rank: int | None = None) -> int:
    """Bytes one adapter occupies in the store (`params_per_adapter` times
    the dtype size): the per-user size the scaling study plots against."""
    return self.params_per_adapter(config, rank) * np.dtype(
        _np_dtype(self.dtype)).itemsize

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "AdapterSpec":
    d = dict(d)
    d["targets"] = tuple(d["targets"])
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


def check_fits_spec(targets, rank, spec: "AdapterSpec | None") -> None:
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
    lora_a: target -> float array [L, d_in, rank].
    lora_b: target -> float array [L, rank, d_out].
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

  def to_lora(self, config: ModelConfig | None = None) -> "AdapterWeights":
    """These LoRA factors (VeRA weights materialise here; LoRA is itself)."""
    del config
    return self

  def validate(self, config: ModelConfig, spec: AdapterSpec | None = None
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
      d_in, d_out = config.projection_shape(t)
      want_a = (config.num_layers, d_in, self.rank)
      want_b = (config.num_layers, self.rank, d_out)
      for name, arr, want in (("lora_a", self.lora_a[t], want_a),
                              ("lora_b", self.lora_b[t], want_b)):
        check_factor(f"{name}[{t!r}]", arr, want, config, self.rank)
    if not math.isfinite(self.alpha):
      raise AdapterError(f"alpha must be finite, got {self.alpha}")
    return self

  @classmethod
  def random(cls, config: ModelConfig, targets, rank: int, alpha: float | None
             = None, seed: int = 0, std: float = 0.02, dtype=np.float32
             ) -> "AdapterWeights":
    """A random adapter with both factors non-zero (for tests and demos).

    PEFT initialises B to zero, which makes a fresh adapter a no-op; here both
    factors are random so that the adapter visibly changes the output.
    """
    rng = np.random.default_rng(seed)
    targets = _check_targets(targets)
    a, b = {}, {}
    for t in targets:
      d_in, d_out = config.projection_shape(t)
      a[t] = (rng.standard_normal((config.num_layers, d_in, rank)) /
              math.sqrt(d_in)).astype(dtype)
      b[t] = (rng.standard_normal((config.num_layers, rank, d_out)) *
              std * math.sqrt(rank)).astype(dtype)
    return cls(a, b, rank=rank, alpha=float(alpha if alpha is not None else
                                            rank))
