"""Public per-chip figures (HBM, peak bf16 FLOP/s, HBM bandwidth) with their
sources: what the ahead-of-time compile tool checks fits against and builds
its roofline from."""

from __future__ import annotations

import dataclasses

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures used for the fits check and the roofline."""

  name: str
  hbm_bytes: float
  bf16_flops: float
  hbm_bandwidth: float
  source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GIB, 918e12, 1640e9,
                "https://cloud.google.com/tpu/docs/v6e"),
    # Dense (no 2:4 sparsity) bf16 tensor-core peaks, SXM parts.
    "h100": Chip("NVIDIA H100 SXM", 80e9, 989e12, 3350e9,
                 "https://www.nvidia.com/en-us/data-center/h100/"),
    "h200": Chip("NVIDIA H200 SXM", 141e9, 989e12, 4800e9,
                 "https://www.nvidia.com/en-us/data-center/h200/"),
    # This host's CPU devices: nominal figures so the same report is
    # produced in tests; not a performance claim.
    "cpu": Chip("host CPU (nominal)", 16 * GIB, 1e12, 30e9, "nominal"),
}
