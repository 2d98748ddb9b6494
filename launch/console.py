"""What every launcher does at the console, in one place.

Owns the behaviour the console scripts (`mintjax-train`, `mintjax-serve`,
`mintjax-eval`, `mintjax-convert`, `mint`, `mintjax-openai-server`) share:

  - `say(...)`: one line on stderr at once, before heavy imports, so a
    launcher tells the user what it is doing within a second or two;
  - `resolve_config_arg(...)`: `--config=NAME[:variant]` finds the config
    in the installed `configs/` package when NAME is not a file here, and a
    missing `--config` defaults to the launcher's own config file; so the
    scripts work from any directory;
  - `quiet_logs()`: absl/orbax/jax INFO logs are hidden unless
    `--verbosity` (absl's flag: 0 shows INFO, 1 debug) is given;
  - `--config_help`: every config field with its default and meaning
    (from the config module's `HELP` table), then exit;
  - `require(...)`: a missing required field names its flag;
  - `user_errors(...)`: bad input ends in one `error: ...` line, exit 1.

Importing this module costs only absl (no jax), so `say` runs early.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from absl import logging

_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False,
    "Print every --config.* field with its default and meaning, then exit.")



def _process_start() -> float:
  """perf_counter() at this process's start (Linux /proc), else now."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
      uptime = float(f.read().split()[0])
    age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return time.perf_counter() - max(age, 0.0)
  except (OSError, ValueError, IndexError):
    return time.perf_counter()


# say() stamps seconds since the process started (interpreter start-up
# and imports included), so "[0.4s]" is what the user waited.
_T0 = _process_start()

# Third-party loggers that speak at INFO on every run (backend probing,
# checkpoint I/O): quiet unless --verbosity is given.
_NOISY = ("jax", "jax._src.xla_bridge", "orbax", "absl", "tensorstore",
          "grain")


def say(msg: str) -> None:
  """Prints one progress line to stderr now (stdout stays for results)."""
  print(f"[{time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
        flush=True)


def configs_dir() -> str:
  """The directory of the installed `configs` package (its .py files)."""
  return os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs")


def resolve_config_arg(argv: list[str], default: str) -> list[str]:
  """Returns argv with `--config` made to name an existing config file.

  `default` is a file name in `configs/` with an optional ':variant'
  (e.g. 'serve.py:tiny'); it is used when argv has no `--config`. A value
  whose file part does not exist relative to the working directory is
  looked up in the installed `configs/` (with or without '.py'), so
  `--config=serve.py:smollm2`, `--config=serve:smollm2` and
  `--config=configs/serve.py:smollm2` all work from any directory.
  """
  argv = list(argv)
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      argv[i:i + 2] = [f"--config={argv[i + 1]}"]
      break
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      argv[i] = "--config=" + _find_config(a[len("--config="):])
      return argv
  return [argv[0], "--config=" + _find_config(default)] + argv[1:]


def _find_config(value: str) -> str:
  path, sep, variant = value.partition(":")
  if os.path.isfile(path):
    return value
  name = os.path.basename(path)
  for candidate in (name, name + ".py"):
    full = os.path.join(configs_dir(), candidate)
    if os.path.isfile(full):
      return full + sep + variant
  return value  # config_flags reports the missing file


def quiet_logs() -> None:
  """Hides INFO logs of absl, orbax and jax unless --verbosity was given."""
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  for name in _NOISY:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def help_table(module_name: str) -> Mapping[str, str]:
  """The `HELP` table (dotted field -> meaning) of a config module."""
  return importlib.import_module(module_name).HELP


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """ConfigDict -> {'lora.rank': 4, ...} (leaves only)."""
  out = {}
  for k, v in cfg.items():
    if hasattr(v, "items"):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def format_config_help(cfg: Any, help_: Mapping[str, str],
                       required: Sequence[str] = ()) -> str:
  """Every field of `cfg`: flag, default and meaning, one per line."""
  fields = flatten(cfg)
  width = max(len(k) for k in fields) + len("--config.")
  lines = []
  for k, v in fields.items():
    meaning = help_.get(k, "(undocumented)")
    if k in required:
      meaning = "REQUIRED. " + meaning
    lines.append(f"  {'--config.' + k:<{width}}  {v!r:<14}  {meaning}")
  return "\n".join(lines)


def maybe_config_help(cfg: Any, module_name: str,
                      required: Sequence[str] = ()) -> None:
  """With --config_help: prints the fields of `cfg` and exits 0."""
  if not _CONFIG_HELP.value:
    return
  print(f"config fields (set as --config.FIELD=VALUE; defaults of this "
        f"variant):\n{format_config_help(cfg, help_table(module_name), required)}")
  sys.exit(0)


def require(cfg: Any, fields: Sequence[str], module_name: str) -> None:
  """Exits with one line naming the flag of the first empty required field."""
  help_ = help_table(module_name)
  for f in fields:
    value = cfg
    for part in f.split("."):
      value = value[part]
    if value in ("", None):
      sys.exit(f"error: --config.{f} is required ({help_.get(f, '')}); "
               "see --config_help for every field")


def user_errors(fn: Callable[[], Any]) -> Any:
  """Runs `fn`; bad input (ValueError, LookupError, OSError) -> one line."""
  try:
    return fn()
  except (ValueError, LookupError, OSError) as e:
    sys.exit(f"error: {type(e).__name__}: {' '.join(str(e).split())}")
