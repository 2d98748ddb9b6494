"""`EngineConfig`: the shapes and policies of one serving engine.

Owns the config dataclass, its validation, the bank spec it implies and
`sized_for` (max_rank / targets sized from the adapters to serve). The
engine itself is `mintjax.serve.engine.Engine`, which re-exports this.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
from jax.sharding import Mesh

from cpu_kernels import amx
from mintjax.adapters.spec import ALL_TARGETS, KNOWN_TARGETS, BankSpec
from mintjax.serve import residency as residency_lib

# Bank rank of an engine with nothing to size it from (no adapters yet).
DEFAULT_MAX_RANK = 8


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Shapes and policies of one engine (all fixed at construction).

  Attributes:
    num_slots: adapters the device bank holds at once; the bank spec adds
      the null slot 0 (`spec()` is the one place it is converted, via
      `BankSpec.for_adapters`, so `spec().num_slots == num_slots + 1`).
    max_batch: B, sequences decoded together.
    max_len: S, the longest prompt + generation.
    host_cache_bytes: host adapter cache budget.
    steps_per_call: decode steps per device call.
    prefill_batch: prompts prefilled per device call.
    min_bucket: shortest prompt bucket (buckets double up to max_len).
    max_rank: bank rank (adapters are zero padded to it); None sizes it
      from the adapters to serve (`Engine` refs, else the whole source).
    targets: projections the bank adapts; None sizes them likewise.
    adapter_dtype: bank dtype.
    lora_impl: gather-LoRA implementation ('auto' picks per backend).
    lookahead: queued requests considered for admission and prefetch.
    dtype: base weight, activation and KV cache dtype: 'float32' (the
      exactness mode) or 'bfloat16' (half the bytes; every matmul still
      accumulates in f32). See docs/BENCHMARKS.md for the XLA:CPU flags
      that make bf16 dots fast on AMX/avx512_bf16 CPUs.
    fuse_projections: serve q/k/v and gate/up as one matmul each
      (`mintjax.model.fused`; exact in f32).
    layer_layout: 'stacked' (weights stacked [L, ...], a scanned layer loop,
      LoRA gathered per row: compile time independent of depth; the TPU/GPU
      and mesh layout), 'per_layer' (per-layer weight buffers, an unrolled
      layer loop, and the slot-dense LoRA view when the bank allows it: the
      fast XLA:CPU decode, docs/BENCHMARKS.md) or 'auto' (per_layer for
      bf16 serving on CPU without a mesh, else stacked).
    cpu_matmul: the per-layer layout's matmuls: 'amx' (bf16 weights
      pre-packed for the AMX op `cpu_kernels.amx`, ~1.7x XLA:CPU's decode
      GEMMs on AMX hosts; an error where the op is unavailable), 'xla'
      (XLA's dots) or 'auto' (amx for the per-layer bf16 layout when
      `cpu_kernels.amx.available()`, else xla).
  """

  num_slots: int = 16
  max_batch: int = 8
  max_len: int = 256
  host_cache_bytes: int = 1 << 30
  steps_per_call: int = 8
  prefill_batch: int = 4
  min_bucket: int = 16
  max_rank: int | None = None
  targets: tuple[str, ...] | None = None
  adapter_dtype: str = "float32"
  lora_impl: str = "auto"
  lookahead: int = 64
  dtype: str = "float32"
  fuse_projections: bool = True
  layer_layout: str = "auto"
  cpu_matmul: str = "auto"

  def __post_init__(self):
    for name in ("num_slots", "max_batch", "max_len", "steps_per_call",
                 "prefill_batch", "min_bucket", "max_rank", "lookahead"):
      v = getattr(self, name)
      if name == "max_rank" and v is None:
        continue
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {v!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"EngineConfig.dtype must be 'float32' or 'bfloat16', got "
          f"{self.dtype!r}")
    if self.layer_layout not in ("auto", "stacked", "per_layer"):
      raise ValueError(
          f"EngineConfig.layer_layout must be 'auto', 'stacked' or "
          f"'per_layer', got {self.layer_layout!r}")
    if self.cpu_matmul not in ("auto", "amx", "xla"):
      raise ValueError(
          f"EngineConfig.cpu_matmul must be 'auto', 'amx' or 'xla', got "
          f"{self.cpu_matmul!r}")
    if self.prefill_batch > self.max_batch:
      raise ValueError(
          f"prefill_batch ({self.prefill_batch}) must not exceed max_batch "
          f"({self.max_batch})")

  @property
  def buckets(self) -> tuple[int, ...]:
    """Prompt bucket lengths: min_bucket doubling, capped at max_len."""
    out, b = [], min(self.min_bucket, self.max_len)
    while b < self.max_len:
      out.append(b)
      b *= 2
    return tuple(out) + (self.max_len,)

  def per_layer(self, mesh: Mesh | None) -> bool:
    """Whether an engine on `mesh` runs the per-layer layout."""
    if self.layer_layout == "auto":
      # In f32 the per-layer layout measured slower than the scan
      # (docs/BENCHMARKS.md), and f32 is the exactness mode anyway.
      return (mesh is None and jax.default_backend() == "cpu"
              and self.dtype == "bfloat16")
    return self.layer_layout == "per_layer"

  def matmul(self, per_layer: bool) -> str:
    """'amx' or 'xla': the matmul an engine with this layout runs."""
    if self.cpu_matmul == "xla":
      return "xla"
    if self.cpu_matmul == "amx":
      if not per_layer or self.dtype != "bfloat16":
        raise ValueError(
            "EngineConfig.cpu_matmul='amx' needs dtype='bfloat16' and the "
            "per-layer layout (layer_layout='per_layer' or 'auto' on CPU "
            "without a mesh); use cpu_matmul='auto' or 'xla'")
      if not amx.available():
        raise ValueError(
            f"EngineConfig.cpu_matmul='amx' is unavailable here: "
            f"{amx.why_unavailable()}; use cpu_matmul='auto' or 'xla'")
      return "amx"
    use = (per_layer and self.dtype == "bfloat16"
           and jax.default_backend() == "cpu" and amx.available())
    return "amx" if use else "xla"

  def spec(self) -> BankSpec:
    """The serving bank's spec: `num_slots` adapters plus the null slot."""
    return BankSpec.for_adapters(
        self.num_slots, targets=tuple(self.targets or ALL_TARGETS),
        max_rank=self.max_rank or DEFAULT_MAX_RANK, dtype=self.adapter_dtype)

  def sized_for(self, source, refs: Iterable[str] | None = None
                ) -> "EngineConfig":
    """This config with max_rank / targets sized from the adapters to serve.

    Unset (None) fields take the largest rank and the union of the targets
    of `refs` (None: every adapter of `source`); set ones are checked
    against those adapters. Without adapters to look at, unset fields take
    DEFAULT_MAX_RANK and every target.

    Raises:
      ValueError: an adapter needs a larger rank or a target the config
        leaves out (naming the fix), or a ref names no adapter.
    """
    shapes = (residency_lib.served_shapes(
        source, None if refs is None else list(refs))
              if source is not None else None) or {}
    rank = self.max_rank or max((k for k, _ in shapes.values()),
                                default=DEFAULT_MAX_RANK)
    used = {t for _, ts in shapes.values() for t in ts}
    # KNOWN_TARGETS: MoE/MLA adapters' targets count too (canonical order).
    targets = self.targets or (tuple(t for t in KNOWN_TARGETS if t in used)
                               or ALL_TARGETS)
    residency_lib.check_fits(shapes, rank, targets)
    return dataclasses.replace(self, max_rank=rank, targets=tuple(targets))
