"""Importing the library does no work beyond definitions.

In particular no `jax.monitoring` listener is registered at import: the
serving engine's compile counter starts on its first use
(`mintjax.serve.steps.backend_compiles`), and it then counts real compiles.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from mintjax.serve import steps as steps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every library module in a fresh interpreter and prints how many
# duration listeners JAX holds before and after.
_SCRIPT = r"""
import importlib, pkgutil
from jax._src import monitoring
before = len(monitoring.get_event_duration_listeners())
import mintjax
names = [m.name for m in pkgutil.walk_packages(mintjax.__path__, "mintjax.")
         if not m.name.startswith("mintjax.apps")]
for n in names:
  importlib.import_module(n)
print(len(names), before, len(monitoring.get_event_duration_listeners()))
"""


def test_importing_every_library_module_registers_no_listener():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  modules, before, after = map(int, out.stdout.split()[-3:])
  assert modules > 40  # the walk really imported the library
  assert after == before, f"{after - before} listener(s) registered at import"


def test_backend_compiles_counts_a_fresh_compile():
  start = steps_lib.backend_compiles()  # the first call starts the count
  # A shape no other test uses, so this jit really compiles now.
  jax.jit(lambda x: x * 3 + 1)(jnp.zeros((7, 13, 3))).block_until_ready()
  assert steps_lib.backend_compiles() > start
