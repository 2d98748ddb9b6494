"""Multi-host flags shared by the launchers and the call that uses them.

Owns `--coordinator_address`, `--num_processes`, `--process_id`,
`--num_cpu_devices` and `initialize()`, which calls
`jax.distributed.initialize` before any JAX computation when they are set.
"""

from absl import flags

_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_NCPU = flags.DEFINE_integer(
    "num_cpu_devices", None, "Fake CPU devices per process (CPU testing).")


def define_flags() -> None:
  """Flags are defined at import; this makes the dependency explicit."""


def initialize() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if _NCPU.value:
    jax.config.update("jax_num_cpu_devices", _NCPU.value)
  if _COORD.value or _NPROC.value:
    if not (_COORD.value and _NPROC.value and _PID.value is not None):
      raise flags.ValidationError(
          "multi-host needs all of --coordinator_address, --num_processes "
          "and --process_id")
    jax.distributed.initialize(coordinator_address=_COORD.value,
                               num_processes=_NPROC.value,
                               process_id=_PID.value)
