"""bf16 matmuls on Intel AMX for XLA:CPU: the pre-packed kernel layout, its
FFI op, and the build that makes the op available.

Owns `PackedKernel` (a [d_out, d_in] weight pre-packed into AMX tiles),
`pack`, `matmul` (x [..., d_in] bf16 @ W^T -> [..., d_out] f32) and
`available()` (whether this process can run the op: an x86 host with
amx_bf16, Linux granting the tile state, a C++ compiler and jaxlib's FFI
headers). The C++ source is `amx_matmul.cc` beside this file; it is compiled
once per (source, jaxlib, compiler) into `$MINTJAX_CACHE_DIR` (default
`~/.cache/mintjax`) the first time `available()` is asked, and registered as
the XLA FFI target `mintjax_amx_matmul` for the CPU platform.

Why it exists: on this project's 2-core AMX host XLA:CPU runs the M = 16
decode GEMMs of a bf16 model at ~7 GB/s of weight streaming; this op streams
pre-packed weights at ~23 GB/s (docs/BENCHMARKS.md, issue 18). It is a
serving op (no VJP) and only the CPU backend has it; the Engine uses it for
the per-layer bf16 CPU layout (`EngineConfig.cpu_matmul`), everything else
keeps XLA's dots. `MINTJAX_CPU_AMX=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import flax
import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("amx_matmul.cc")
_TARGET = "mintjax_amx_matmul"
_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


@flax.struct.dataclass
class PackedKernel:
  """A [d_out, d_in] weight packed for `matmul`: [NB, KC, 4, 16, 32] bf16,
  zero-padded to d_out % 64 == 0 and d_in % 32 == 0.

  packed[nb, kc, t, r, 2 j + p] = W[64 nb + 16 t + j, 32 kc + 2 r + p]: one
  AMX B tile (16 pairs of d_in by 16 outputs) per [t] slice, contiguous, so
  the op reads the weight once, in order.
  """

  packed: jax.Array
  d_out: int = flax.struct.field(pytree_node=False)
  d_in: int = flax.struct.field(pytree_node=False)

  @property
  def dtype(self):
    return self.packed.dtype

  @property
  def shape(self) -> tuple[int, int]:
    """(d_out, d_in) of the weight it holds."""
    return (self.d_out, self.d_in)


def pack(w_out_in) -> PackedKernel:
  """Pack a [d_out, d_in] weight (cast to bf16) for `matmul`. Traceable."""
  w = jnp.asarray(w_out_in)
  if w.ndim != 2:
    raise ValueError(f"pack expects a [d_out, d_in] weight, got shape {w.shape}")
  d_out, d_in = w.shape
  n_pad, k_pad = -d_out % 64, -d_in % 32
  w = jnp.pad(w.astype(jnp.bfloat16), ((0, n_pad), (0, k_pad)))
  nb, kc = w.shape[0] // 64, w.shape[1] // 32
  # [nb, t, j, kc, r, p] -> [nb, kc, t, r, j, p]
  w = w.reshape(nb, 4, 16, kc, 16, 2).transpose(0, 3, 1, 4, 2, 5)
  return PackedKernel(w.reshape(nb, kc, 4, 16, 32), d_out, d_in)


def unpack(kernel: PackedKernel) -> jax.Array:
  """The [d_out, d_in] bf16 weight back (tests, debugging)."""
  nb, kc = kernel.packed.shape[:2]
  w = kernel.packed.reshape(nb, kc, 4, 16, 16, 2).transpose(0, 2, 4, 1, 3, 5)
  return w.reshape(nb * 64, kc * 32)[:kernel.d_out, :kernel.d_in]


def matmul(x, kernel: PackedKernel):
  """x [..., d_in] @ W^T -> [..., d_out] float32 (bf16 products, f32 sums).

  Needs `available()`; x is cast to bf16. Only the CPU backend has the op.
  """
  if x.shape[-1] != kernel.d_in:
    raise ValueError(f"matmul: x has d_in {x.shape[-1]}, the packed kernel "
                     f"{kernel.d_in}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, kernel.d_in).astype(jnp.bfloat16)
  k_pad = kernel.packed.shape[1] * 32 - kernel.d_in
  if k_pad:
    x2 = jnp.pad(x2, ((0, 0), (0, k_pad)))
  out = jax.ShapeDtypeStruct((x2.shape[0], kernel.d_out), jnp.float32)
  y = jax.ffi.ffi_call(_TARGET, out)(x2, kernel.packed)
  return y.reshape(*lead, kernel.d_out)


def _host_has_amx() -> bool:
  try:
    flags = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False
  return " amx_bf16" in flags and " amx_tile" in flags


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("MINTJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "mintjax")
  return pathlib.Path(root)


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(force: bool = False) -> pathlib.Path:
  """Compile `amx_matmul.cc` into the cache (atomically) and return the .so.

  Raises RuntimeError with the compiler's output when the build fails.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  import jaxlib
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + cxx.encode()
                       ).hexdigest()[:16]
  out = _cache_dir() / f"amx_matmul-{key}.so"
  if out.exists() and not force:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, "-O2", "-std=c++17", "-mamx-tile", "-mamx-bf16", "-fPIC",
           "-shared", "-w", "-I", jax.ffi.include_dir(), str(_SOURCE), "-o",
           str(tmp_so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"building {_SOURCE.name} failed ({' '.join(cmd)}):\n"
                         f"{proc.stderr[-4000:]}")
    os.replace(tmp_so, out)  # concurrent builders: last one wins, same bytes
  return out


def available() -> bool:
  """Whether `matmul` can run here; builds and registers the op on first
  call. False (with the reason logged once) on hosts without AMX, without a
  compiler, when `MINTJAX_CPU_AMX=0`, or when the build fails."""
  with _lock:
    if "ok" in _state:
      return _state["ok"]
    _state["ok"], _state["why"] = _try_enable()
    if not _state["ok"]:
      log.info("AMX matmul off: %s", _state["why"])
    return _state["ok"]


def why_unavailable() -> str | None:
  """The reason `available()` returned False (None when it is available)."""
  available()
  return None if _state["ok"] else _state["why"]


def _try_enable() -> tuple[bool, str]:
  if os.environ.get("MINTJAX_CPU_AMX", "1") == "0":
    return False, "MINTJAX_CPU_AMX=0"
  if not _host_has_amx():
    return False, "this CPU has no amx_bf16/amx_tile (see /proc/cpuinfo)"
  try:
    so = build()
  except RuntimeError as e:
    return False, str(e)
  lib = ctypes.CDLL(str(so))
  if lib.mintjax_amx_init() != 0:
    return False, "the kernel refused AMX tile state (arch_prctl XTILEDATA)"
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.MintjaxAmxMatmul),
                              platform="cpu")
  _state["lib"] = lib  # keep the library loaded
  return True, ""


if __name__ == "__main__":
  # `python -m cpu_kernels.amx`: build now (make install) and report.
  logging.basicConfig(level=logging.INFO)
  print("AMX matmul:", "available" if available() else
        f"off ({why_unavailable()})")
