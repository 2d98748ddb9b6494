"""The console behaviour every launcher shares (launch/console.py).

Config help covers every field of every variant; a missing required field
names its flag; configs are found from any directory; INFO logs are quiet
unless --verbosity is given; `mintjax-eval` finds the base in provenance;
`mint create-adapter` registers an adapter. Cheap: no model is compiled.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import subprocess
import sys

from absl import flags
from absl import logging
import pytest

from launch import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "configs.smollm2_personal": ("tiny", "smollm2", "demo", "demo_tiny"),
    "configs.serve": ("tiny", "smollm2"),
    "configs.openai_server": ("tiny", "smollm2"),
}


@pytest.mark.parametrize("module", sorted(CONFIGS))
def test_every_config_field_has_help(module):
  mod = importlib.import_module(module)
  for variant in CONFIGS[module]:
    fields = console.flatten(mod.get_config(variant))
    undocumented = sorted(set(fields) - set(mod.HELP))
    assert not undocumented, (
        f"{module}:{variant} fields without a HELP entry: {undocumented}")
    stale = sorted(set(mod.HELP) - set(fields))
    assert not stale, f"{module} HELP names no field: {stale}"
    assert set(mod.REQUIRED) <= set(fields)


def test_help_text_lists_flag_default_and_meaning():
  mod = importlib.import_module("configs.smollm2_personal")
  text = console.format_config_help(mod.get_config("tiny"), mod.HELP,
                                    mod.REQUIRED)
  line = next(l for l in text.splitlines() if "--config.lora.rank " in l)
  assert "4" in line and "LoRA rank" in line
  line = next(l for l in text.splitlines() if "--config.train_data " in l)
  assert "REQUIRED" in line


def test_smollm2_presets_need_no_path():
  for module, variants in CONFIGS.items():
    mod = importlib.import_module(module)
    if "smollm2" in variants:
      assert mod.get_config("smollm2").base == "smollm2", module


def test_config_found_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = console.resolve_config_arg(["prog", "--config=serve.py:smollm2"],
                                    "serve.py:tiny")
  assert argv[1] == "--config=" + os.path.join(ROOT, "configs",
                                               "serve.py") + ":smollm2"
  argv = console.resolve_config_arg(["prog", "--config", "serve:tiny", "-x"],
                                    "serve.py:tiny")
  assert argv[1:] == ["--config=" + os.path.join(ROOT, "configs", "serve.py")
                      + ":tiny", "-x"]
  argv = console.resolve_config_arg(["prog", "--x=1"], "serve.py:tiny")
  assert argv == ["prog", "--config=" + os.path.join(
      ROOT, "configs", "serve.py") + ":tiny", "--x=1"]
  # A path that exists where the user is wins over the installed config.
  (tmp_path / "serve.py").write_text("")
  argv = console.resolve_config_arg(["prog", "--config=serve.py:a"], "x")
  assert argv[1] == "--config=serve.py:a"


def test_logs_quiet_unless_verbosity_given():
  verbosity = flags.FLAGS["verbosity"]
  before = (logging.get_verbosity(), verbosity.present,
            py_logging.getLogger("jax._src.xla_bridge").level)
  try:
    logging.set_verbosity(logging.INFO)
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.INFO)
    verbosity.present = 1
    console.quiet_logs()
    assert logging.get_verbosity() == logging.INFO  # asked for: kept
    verbosity.present = 0
    console.quiet_logs()
    assert logging.get_verbosity() == logging.WARNING
    assert py_logging.getLogger(
        "jax._src.xla_bridge").getEffectiveLevel() == py_logging.WARNING
  finally:
    logging.set_verbosity(before[0])
    verbosity.present = before[1]
    py_logging.getLogger("jax._src.xla_bridge").setLevel(before[2])


def _run(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_missing_required_field_names_the_flag(tmp_path):
  proc = _run(["-m", "launch.train", "--config=smollm2_personal.py:tiny",
               f"--config.registry={tmp_path}/reg", f"--workdir={tmp_path}"],
              tmp_path)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --config.train_data is required"), last
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "reg"), "nothing may be created"


def test_config_help_flag_prints_every_field(tmp_path):
  proc = _run(["-m", "launch.serve", "--config=serve.py:smollm2",
               "--config_help"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  mod = importlib.import_module("configs.serve")
  for field in console.flatten(mod.get_config("smollm2")):
    assert f"--config.{field} " in proc.stdout, field
  assert "'smollm2'" in proc.stdout


def test_eval_base_from_provenance_and_create_adapter(tmp_path):
  proc = _run(["-m", "tools.mint", f"--registry={tmp_path}/reg",
               "create-adapter", "carol", "--base=random:tiny", "--rank=4",
               "--targets=q,v"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("created carol (rank 4, alpha 8, targets q,v)")
  from mintjax.adapters import AdapterWeights
  from mintjax.model.sources import load_base_source
  from mintjax.store.registry import Registry
  from mintjax.eval.evaluate import recorded_base_source
  reg = Registry.open(str(tmp_path / "reg"), create=False)
  base = load_base_source("random:tiny")
  w = AdapterWeights.random(base.config, ("q", "v"), rank=4, alpha=8.0)
  with pytest.raises(ValueError, match="pass --base"):
    recorded_base_source(reg, [])  # nothing recorded yet
  reg.publish("carol", w, {"training_config": {"base": "random:tiny"}})
  assert recorded_base_source(reg, []) == "random:tiny"
  assert recorded_base_source(reg, ["carol@1"]) == "random:tiny"
  reg.publish("carol", w, {"training_config": {"base": "other.gguf"}})
  with pytest.raises(ValueError, match="several bases"):
    recorded_base_source(reg, ["carol@1", "carol@2"])
