"""Adapter families: the one interface every kind of adapter implements.

Owns `AdapterFamily` (what a family must say: how a new adapter starts, what
a stored row holds, which leaves of the trainer's bank are trained and their
per-slot optimizer mask, how the bank materialises into the LoRA factors the
op runs, and how it maps to PEFT) and the family registry: `get_family(name)`
and `register_family(family)`.

A family is looked up once, by the name an adapter spec records (its
`variant`: 'lora', 'vera'); every package then calls the family instead of
branching on the name. The built-in families are found by name, like the
op's kernels: their modules load on the first `get_family` call, so
importing this module (or the specs) does no work beyond definitions.
Adding a family is one module with an `AdapterFamily` subclass and
`register_family(...)` (or an entry in `_BUILTIN`); see docs/ARCHITECTURE.md,
"Adding an adapter family".

Shapes. L = layers, d_in/d_out = a target projection's input/output width,
r = an adapter's true rank, R = the bank's max_rank, S = bank slots.
"""

from __future__ import annotations

import abc
import importlib
import math
from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:  # Annotations only: spec imports this module.
  from mintjax.adapters.bank import AdapterBank
  from mintjax.adapters.spec import AdapterInfo, AdapterWeights, BankSpec
  from mintjax.config import ModelConfig

# name -> module defining `FAMILY`. Looked up by name so neither this module
# nor the specs import the families (which import the specs).
_BUILTIN = {"lora": "mintjax.adapters.lora", "vera": "mintjax.adapters.vera"}
_FAMILIES: dict[str, "AdapterFamily"] = {}


class HostWeights(Protocol):
  """One adapter on the host, of any family (what the store keeps and the
  host cache holds): LoRA's `AdapterWeights`, VeRA's `VeraWeights`, ..."""

  rank: int
  alpha: float
  use_rslora: bool
  variant: str  # the family's name

  @property
  def targets(self) -> tuple[str, ...]: ...

  @property
  def scale(self) -> float: ...

  @property
  def nbytes(self) -> int: ...

  def validate(self, config: "ModelConfig", spec: "BankSpec | None" = None
               ) -> "HostWeights": ...

  def to_lora(self, config: "ModelConfig") -> "AdapterWeights": ...


class TrainerBank(Protocol):
  """The trainer's stacked bank of any family: a pytree with [S, ...] leaves
  (LoRA's `AdapterBank`, VeRA's `VeraBank`, ...)."""

  scale: Any  # [S] float32
  rank: Any  # [S] int32, 0 = empty slot

  @property
  def num_slots(self) -> int: ...

  @property
  def max_rank(self) -> int: ...

  def replace(self, **changes) -> "TrainerBank": ...


class FamilyError(ValueError):
  """An adapter family name is unknown, or a family is registered twice."""


class AdapterFamily(abc.ABC):
  """One kind of adapter (LoRA, VeRA, ...) behind one interface.

  Class attributes:
    name: the name specs record ('lora').
    tensor_names: names of the two tensors a stored row holds per target,
      in row order (LoRA: ('lora_a', 'lora_b')).
    weights_type: the host type of one adapter (what the store returns), a
      `HostWeights`.
    bank_type: the trainer's stacked bank type, a `TrainerBank` (a flax
      struct); for LoRA the serving `AdapterBank` itself.
    supports_rslora: whether alpha / sqrt(r) scaling is allowed.
    extras: the family's own adapter-spec fields and their defaults (VeRA:
      {'basis_seed': 0}); `AdapterInfo` refuses them for other families.
  """

  name: str
  tensor_names: tuple[str, str]
  weights_type: type
  bank_type: type
  supports_rslora: bool = True
  extras: Mapping[str, Any] = {}

  # ------------------------------------------------------ one adapter (host)

  @abc.abstractmethod
  def init(self, config: "ModelConfig", info: "AdapterInfo", *, user: str,
           seed: int) -> Any:
    """A fresh adapter of spec `info` (seeded by seed and user) that leaves
    the base model's outputs unchanged until it is trained."""

  @abc.abstractmethod
  def stored_shapes(self, rank: int, shape: tuple[int, ...]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of a row's two tensors for one target of `shape` (L, d_in,
    d_out), or (L, E, d_in, d_out) for a routed-expert target
    (`spec.target_shape`), at rank `rank` (in `tensor_names` order)."""

  @abc.abstractmethod
  def tensors(self, weights) -> tuple[Mapping, Mapping]:
    """The two {target: array} dicts a stored row holds, in row order."""

  @abc.abstractmethod
  def from_tensors(self, info: "AdapterInfo", first: Mapping, second: Mapping,
                   meta: Mapping) -> Any:
    """Host weights from a row's tensors (inverse of `tensors`); `meta` is
    the revision's storage metadata (PEFT's per-layer B scales are already
    folded into `second` by the loader: `mintjax.store.peft_io`)."""

  @abc.abstractmethod
  def to_lora(self, weights, shapes: Mapping[str, tuple[int, int, int]]
              ) -> "AdapterWeights":
    """The equivalent LoRA factors A [L, d_in, r], B [L, r, d_out]; `shapes`
    maps each target to (L, d_in, d_out)."""

  def shapes_of(self, weights) -> dict[str, tuple[int, int, int]] | None:
    """{target: (L, d_in, d_out)} read off one adapter's weights, or None
    when they do not determine them (VeRA vectors hold no d_in: the store
    must then be given the shapes when the adapter is created).

    Raises:
      AdapterError: the weights' tensors disagree with each other.
    """
    del weights
    return None

  def check_weights(self, adapter_id: str, info: "AdapterInfo", weights
                    ) -> str | None:
    """Family-specific mismatch between `weights` and `info`, as a message
    (None when they agree). Type, rank and alpha are checked by the caller."""
    del adapter_id, info, weights
    return None

  def check_info(self, info: "AdapterInfo") -> str | None:
    """Family-specific problem with an adapter spec (None when fine)."""
    del info
    return None

  def params_per_adapter(self, shapes: Mapping[str, tuple[int, ...]],
                         rank: int) -> int:
    """Numbers one stored adapter of rank `rank` holds, given each target's
    (L, d_in, d_out) or (L, E, d_in, d_out) (`spec.target_shape`; shared
    state such as VeRA's basis is not counted)."""
    return sum(math.prod(s) for shape in shapes.values()
               for s in self.stored_shapes(rank, shape))

  # ------------------------------------------------ the trainer's bank

  @abc.abstractmethod
  def bank_shapes(self, config: "ModelConfig", spec: "BankSpec") -> Any:
    """The trainer's bank as `jax.ShapeDtypeStruct` leaves."""

  @abc.abstractmethod
  def bank_logical_axes(self, spec: "BankSpec") -> Any:
    """Logical axis names of every leaf (same tree as `bank_shapes`)."""

  @abc.abstractmethod
  def bank_from_weights(self, config: "ModelConfig", spec: "BankSpec",
                        weights: Mapping[int, Any]) -> Any:
    """A host-built trainer's bank with the given slots filled (others
    null)."""

  @abc.abstractmethod
  def read_slot(self, bank, slot: int, info: "AdapterInfo") -> Any:
    """One slot of a (host) trainer's bank as this family's host weights,
    carrying `info`'s alpha and scale rule."""

  @abc.abstractmethod
  def trainable(self, bank) -> dict:
    """The differentiated leaves, keyed by bank field names, so that
    `bank.replace(**trainable)` puts updated values back."""

  @abc.abstractmethod
  def rank_mask(self, bank) -> dict:
    """Per-slot gradient mask, the same tree as `trainable(bank)` with
    leaves broadcastable to it: 1.0 where a slot's true rank reaches, 0.0 on
    padding (and on empty slots), so padding stays exactly zero."""

  @abc.abstractmethod
  def to_lora_bank(self, bank) -> "AdapterBank":
    """The LoRA bank (A [S, L, d_in, R], B [S, L, R, d_out], scale, rank)
    the model runs (jit-able; differentiable in the trained leaves)."""

  # ------------------------------------------------------------- PEFT

  def peft_factors(self, info: "AdapterInfo", first: Mapping,
                   second: Mapping, shapes: Mapping
                   ) -> tuple["AdapterInfo", Mapping, Mapping]:
    """(LoRA adapter spec, A, B) to write as a PEFT LoRA folder from a
    stored row's tensors. The default materialises through `to_lora`."""
    w = self.to_lora(self.from_tensors(info, first, second, {}), shapes)
    return info.as_lora(), w.lora_a, w.lora_b


def register_family(family: AdapterFamily) -> AdapterFamily:
  """Makes `family` available to `get_family(family.name)`; returns it.

  Raises:
    FamilyError: another family already has that name.
  """
  if not isinstance(family, AdapterFamily):
    raise FamilyError(
        f"register_family needs an AdapterFamily instance, got "
        f"{type(family).__name__}")
  old = _FAMILIES.get(family.name)
  if old is not None and old is not family:
    raise FamilyError(
        f"adapter family {family.name!r} is already registered "
        f"({type(old).__name__}); pick another name")
  _FAMILIES[family.name] = family
  return family


def unregister_family(name: str) -> None:
  """Removes a registered family (tests); built-ins come back on lookup."""
  _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
  """Every family `get_family` can return (built-ins first)."""
  return tuple(_BUILTIN) + tuple(n for n in _FAMILIES if n not in _BUILTIN)


def get_family(name: str) -> AdapterFamily:
  """The family called `name`.

  Raises:
    FamilyError: no such family, naming the known ones.
  """
  family = _FAMILIES.get(name) if isinstance(name, str) else None
  if family is None and name in _BUILTIN:
    family = register_family(importlib.import_module(_BUILTIN[name]).FAMILY)
  if family is None:
    raise FamilyError(
        f"unknown adapter family {name!r}; known families: "
        f"{list(family_names())} (register a new one with "
        "mintjax.adapters.family.register_family)")
  return family


def family_of_bank(bank) -> AdapterFamily:
  """The family whose trainer's bank type `bank` is.

  Raises:
    FamilyError: `bank` is no registered family's bank.
  """
  for name in family_names():
    family = get_family(name)
    if type(bank) is family.bank_type:  # pylint: disable=unidiomatic-typecheck
      return family
  raise FamilyError(
      f"{type(bank).__name__} is not the bank of any adapter family "
      f"{list(family_names())}")
