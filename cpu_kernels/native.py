"""The native CPU ops' build and registration: compiles `*.cc` beside this
file into one shared library and registers its XLA FFI targets for the CPU
platform.

Owns `available()` / `why_unavailable()` (whether this process can run the
ops: an x86 host with AMX (amx_bf16, amx_tile; it also has AVX-512), Linux
granting the tile state, a C++ compiler and jaxlib's FFI headers) and
`build()`. The library is compiled once per (sources, jaxlib, compiler) into
`$MINTJAX_CACHE_DIR` (default `~/.cache/mintjax`) the first time
`available()` is asked (about 10 s), atomically, so concurrent processes
never load a half-written file. `MINTJAX_CPU_AMX=0` turns the ops off; code
that would use them then keeps XLA's own ops.

Targets: `mintjax_amx_matmul` and `mintjax_lora_group` (`cpu_kernels.amx`),
`mintjax_decode_attention` (`cpu_kernels.attention`) and
`mintjax_swiglu[_deltas]` (`cpu_kernels.swiglu`).
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

import jax

_DIR = pathlib.Path(__file__).parent
_SOURCES = ("amx_matmul.cc", "decode_attention.cc", "swiglu.cc",
            "lora_group.cc")
_HEADERS = ("parallel.h", "amx_gemm.h", "simd.h")
TARGETS = {"mintjax_amx_matmul": "MintjaxAmxMatmul",
           "mintjax_decode_attention": "MintjaxDecodeAttention",
           "mintjax_swiglu": "MintjaxSwiGlu",
           "mintjax_swiglu_deltas": "MintjaxSwiGluDeltas",
           "mintjax_lora_group": "MintjaxLoraGroup"}
_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


def _host_has_amx() -> bool:
  try:
    flags = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False
  return " amx_bf16" in flags and " amx_tile" in flags


def host_can_build() -> bool:
  """An AMX host with a C++ compiler, the ops not turned off: here
  `available()` is False only if the build or the kernel's AMX request
  failed (a bug to report, not a host limit)."""
  return (os.environ.get("MINTJAX_CPU_AMX", "1") != "0" and _host_has_amx()
          and _compiler() is not None)


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("MINTJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "mintjax")
  return pathlib.Path(root)


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(force: bool = False) -> pathlib.Path:
  """Compile the sources into the cache (atomically); return the library.

  Raises RuntimeError with the compiler's output when the build fails.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  import jaxlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(jaxlib.__version__.encode() + cxx.encode())
  for name in _SOURCES + _HEADERS:
    h.update((_DIR / name).read_bytes())
  out = _cache_dir() / f"mintjax_cpu_kernels-{h.hexdigest()[:16]}.so"
  if out.exists() and not force:
    return out
  log.info("building the native CPU kernels into %s (once)", out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, "-O3", "-std=c++17", "-march=sapphirerapids", "-fPIC",
           "-shared", "-w", "-I", jax.ffi.include_dir(), "-I", str(_DIR),
           *[str(_DIR / s) for s in _SOURCES], "-o", str(tmp_so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):"
                         f"\n{proc.stderr[-4000:]}")
    os.replace(tmp_so, out)  # concurrent builders: last one wins, same bytes
  return out


def available() -> bool:
  """Whether the native ops can run here; builds and registers them on the
  first call. False (the reason logged once, see `why_unavailable`) on
  hosts without AMX, without a compiler, when `MINTJAX_CPU_AMX=0`, or when
  the build fails."""
  with _lock:
    if "ok" not in _state:
      _state["ok"], _state["why"] = _try_enable()
      if not _state["ok"]:
        log.info("native CPU kernels off: %s", _state["why"])
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
  except (RuntimeError, OSError) as e:  # a failed compile, an unwritable cache
    return False, f"{type(e).__name__}: {e}"
  lib = ctypes.CDLL(str(so))
  if lib.mintjax_amx_init() != 0:
    return False, "Linux refused AMX tile state (arch_prctl XTILEDATA)"
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  _state["lib"] = lib  # keep the library loaded
  return True, ""


if __name__ == "__main__":
  # `python -m cpu_kernels.native`: build now (make install) and report.
  logging.basicConfig(level=logging.INFO)
  print("native CPU kernels:", "available" if available() else
        f"off ({why_unavailable()})")
