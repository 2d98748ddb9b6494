"""A user's first hour, driven only through console scripts and documented API.

convert the embedded SmolLM2 -> import two PEFT adapters -> train two users
from chat JSONL -> evaluate -> promote -> serve a mixed batch -> export, in a
scratch directory, with the installed console scripts (`mintjax-convert`,
`mint`, `mintjax-train`, `mintjax-eval`, `mintjax-serve`) run from that
directory, as docs/API.md shows them. The two PEFT folders are made with the
documented Python calls (`Registry.publish` + `peft_io.export_peft`), as a
stand-in for folders a user brings from Hugging Face PEFT.

Each step's wall time and the time to its first line of output are written
to $FIRST_HOUR_TIMINGS when set (and printed); every console script must
speak within 2 s. Marker `first_hour` (`make test-first-hour`): it runs the
real 135M model on CPU for a few minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
FIRST_OUTPUT_LIMIT_S = 2.0  # the issue: "says within 2 s" (measured <= 0.6 s)

pytestmark = pytest.mark.first_hour

MAKE_PEFT = """
from mintjax.adapters import AdapterInfo, AdapterWeights
from mintjax.model.sources import load_base_source
from mintjax.store import peft_io
from mintjax.store.registry import Registry

base = load_base_source("bases/smollm2")
scratch = Registry.open("scratch_registry")
for i, name in enumerate(["peft_a", "peft_b"]):
  scratch.create_adapter(name, spec=AdapterInfo(targets=("q", "v"), rank=8,
                                                alpha=16.0),
                         base_fingerprint=base.fingerprint,
                         config=base.config)
  scratch.publish(name, AdapterWeights.random(base.config, ("q", "v"), rank=8,
                                              alpha=16.0, seed=i))
  peft_io.export_peft(scratch, name, "peft/" + name)
"""


class Steps:
  """Runs console scripts in one scratch directory and times each one."""

  def __init__(self, cwd):
    self.cwd = str(cwd)
    self.timings = {}
    self.env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.env.pop("XLA_FLAGS", None)  # one CPU device, as a user has

  def run(self, step: str, script: str, *args: str, timeout: float = 900
          ) -> tuple[str, str]:
    exe = os.path.join(BIN, script)
    if not os.path.exists(exe):
      pytest.fail(f"console script {script} is not installed next to "
                  f"{sys.executable}; run `pip install -e .`")
    return self._run(step, [exe, *args], timeout, console=True)

  def python(self, step: str, code: str) -> tuple[str, str]:
    return self._run(step, [sys.executable, "-c", code], 900, console=False)

  def _run(self, step, argv, timeout, console):
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read both pipes through their file objects (communicate() after a
    # readline() would skip what readline() buffered); stdout in a thread
    # so neither pipe can fill and stall the process.
    stdout = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()))
    reader.start()
    first_line = proc.stderr.readline()  # launchers speak on stderr first
    first = time.perf_counter() - t0
    err = first_line + proc.stderr.read()
    proc.wait(timeout=timeout)
    reader.join()
    out = stdout[0]
    total = time.perf_counter() - t0
    self.timings[step] = dict(seconds=round(total, 1))
    if console:  # a plain script prints nothing until it ends
      self.timings[step]["first_output_s"] = round(first, 2)
    assert proc.returncode == 0, f"{step} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def test_first_hour(tmp_path):
  shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
  s = Steps(tmp_path)

  out, err = s.run("convert", "mintjax-convert", "--out=bases/smollm2")
  assert "fingerprint" in out and "mintjax-convert: loading" in err

  s.python("make two PEFT folders (documented API)", MAKE_PEFT)
  out, _ = s.run("import two PEFT adapters", "mint",
                 "--registry=registry", "import-peft", "peft/peft_a",
                 "peft/peft_b", "--ids=peft_a,peft_b",
                 "--base=bases/smollm2")
  assert "as peft_a@1" in out and "as peft_b@1" in out

  out, err = s.run(
      "train two users (chat JSONL)", "mintjax-train",
      "--config=smollm2_personal.py:smollm2",
      "--config.base=bases/smollm2",
      "--config.train_data=examples/train_chat.jsonl",
      "--config.heldout_data=examples/heldout_chat.jsonl",
      "--config.registry=registry", "--config.steps_per_cohort=4",
      "--config.batch_size=8", "--config.log_every=2",
      "--config.max_length=128", "--config.buckets=(128,)",
      "--config.checkpoint_every=1000", "--workdir=runs/first")
  assert "'alice': 'alice@1'" in err and "'bob': 'bob@1'" in err
  assert "train cohort" in err  # the progress bar
  assert "orbax" not in err.lower(), "INFO logs leak without --verbosity"

  out, err = s.run("eval + promote", "mintjax-eval", "--registry=registry",
                   "--heldout=examples/heldout_chat.jsonl",
                   "--refs=alice,bob", "--promote=prod")
  assert "| alice@1 | chat" in out and "| bob@1 | chat" in out, out
  assert "bases/smollm2" in err  # --base came from the provenance
  assert "promoted to 'prod'" in out

  requests = [
      {"prompt": "The capital of France is", "max_new_tokens": 6},
      {"messages": [{"role": "user", "content": "What is my cat called?"}],
       "adapter": "alice", "max_new_tokens": 8},
      {"messages": [{"role": "user", "content": "Where did I grow up?"}],
       "adapter": "bob", "max_new_tokens": 8, "top_logprobs": 2},
      {"prompt": "Hello", "adapter": "peft_a@1", "max_new_tokens": 4},
      {"prompt": "Hello", "adapter": "peft_b", "max_new_tokens": 4,
       "prompt_logprobs": 0},
  ]
  with open(tmp_path / "requests.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in requests)
  out, err = s.run(
      "serve a mixed batch", "mintjax-serve", "--config=serve.py:smollm2",
      "--config.base=bases/smollm2", "--config.registry=registry",
      "--config.input=requests.jsonl", "--config.output=results.jsonl",
      "--config.engine.num_slots=4", "--config.engine.max_batch=8",
      "--config.engine.min_bucket=64", "--config.engine.max_len=256")
  results = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  assert [r["error"] for r in results] == [None] * len(requests), results
  assert [r["revision"] for r in results] == [
      None, "alice@1", "bob@1", "peft_a@1", "peft_b@1"]
  assert "Paris" in results[0]["text"], results[0]
  assert results[2]["top_logprobs"] and results[4]["prompt_logprobs"]
  assert "warm-up compiles" in err

  out, _ = s.run("export", "mint", "--registry=registry", "export-peft",
                 "alice@1", "exported/alice")
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    mode = stat.S_IMODE(os.stat(tmp_path / "exported" / "alice" / name)
                        .st_mode)
    assert mode & 0o044, f"{name} is mode {oct(mode)}: not readable by others"

  report = json.dumps(s.timings, indent=2)
  print(report)
  if os.environ.get("FIRST_HOUR_TIMINGS"):
    with open(os.environ["FIRST_HOUR_TIMINGS"], "w") as f:
      f.write(report + "\n")
  slow = {k: v["first_output_s"] for k, v in s.timings.items()
          if v.get("first_output_s", 0) > FIRST_OUTPUT_LIMIT_S}
  assert not slow, f"silent for too long before the first line: {slow}"
