"""docs/API.md is true: its Python blocks run, its example files are valid.

Default suite (cheap): every ```python block parses and every name it
imports exists; every data file under examples/ is linked from API.md and reads
through the library's own reader (training/held-out JSONL, serving requests)
or matches the library's result type (results.jsonl).

`first_hour` marker (`make test-first-hour`): the blocks run, in order, as
one script in a fresh process, in a scratch directory holding a copy of
examples/. Two substitutions (`SUBSTITUTIONS`) swap the embedded SmolLM2
for the tiny random base so the run takes seconds, not minutes; everything
else runs as written.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "API.md")
EXAMPLES = os.path.join(ROOT, "examples")

SUBSTITUTIONS = {
    'load_base_source("smollm2")': 'load_base_source("random:tiny")',
    'get_config("smollm2")': 'get_config("tiny")',
}


def python_blocks(text: str | None = None) -> list[str]:
  """The ```python blocks of API.md, in order."""
  if text is None:
    with open(DOC, encoding="utf-8") as f:
      text = f.read()
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def imported_names(block: str) -> list[tuple[str, str]]:
  """(module, name) of every `from module import name` in a block."""
  out = []
  for node in ast.walk(ast.parse(block)):
    if isinstance(node, ast.ImportFrom):
      out += [(node.module, a.name) for a in node.names]
  return out


def test_blocks_parse_and_import_real_names():
  blocks = python_blocks()
  assert len(blocks) >= 8, "API.md lost its examples"
  missing = []
  for block in blocks:
    for module, name in imported_names(block):
      mod = importlib.import_module(module)
      if not hasattr(mod, name):
        try:
          importlib.import_module(f"{module}.{name}")
        except ImportError:
          missing.append(f"{module}.{name}")
  assert not missing, f"API.md imports names that do not exist: {missing}"


def test_block_extraction_sees_every_block():
  # A planted second block and a non-python block: only python ones count.
  text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n"
  assert python_blocks(text) == ["a = 1\n", "b = 2\n"]


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_every_example_file_is_documented_and_valid():
  from mintjax.serve.requests import GenerationRequest, GenerationResult
  from mintjax.train import data
  with open(DOC, encoding="utf-8") as f:
    doc = f.read()
  # The data files (other examples, e.g. scripts, are documented where
  # their feature is).
  names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".jsonl"))
  assert names, "examples/ has no data files"
  for name in names:
    path = os.path.join(EXAMPLES, name)
    assert f"examples/{name}" in doc, f"examples/{name} is not in API.md"
    if name.startswith(("train_", "heldout_")):
      records = data.read_jsonl(path)  # raises file:line on a bad record
      assert records and all(r["user"] for r in records)
    elif name == "requests.jsonl":
      reqs = [GenerationRequest.from_dict(r) for r in _jsonl(path)]
      assert any(r.messages for r in reqs) and any(r.adapter for r in reqs)
    elif name == "results.jsonl":
      fields = {f.name for f in dataclasses.fields(GenerationResult)}
      for r in _jsonl(path):
        assert set(r) == fields, (name, set(r) ^ fields)
    else:
      pytest.fail(f"examples/{name}: no check knows this file; add one")


def test_console_scripts_named_in_api_md_exist():
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  with open(DOC, encoding="utf-8") as f:
    doc = f.read()
  for name, target in scripts.items():
    assert f"`{name}`" in doc, f"console script {name} is not in API.md"
    # Parsed, not imported: each launcher defines absl flags at import
    # (several would clash in one process).
    module, func = target.split(":")
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    assert func in {n.name for n in tree.body
                    if isinstance(n, ast.FunctionDef)}, target


@pytest.mark.first_hour
def test_api_md_runs_in_order(tmp_path):
  script = "\n".join(python_blocks())
  for old, new in SUBSTITUTIONS.items():
    assert old in script, f"API.md no longer contains {old!r}"
    script = script.replace(old, new)
  shutil.copytree(EXAMPLES, tmp_path / "examples")
  env = dict(os.environ, JAX_PLATFORMS="cpu", MINTJAX_PROGRESS="0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  for expected in ("carol@1", "['erin@1', 'frank@1']",
                   "{'alice': 'alice@1', 'bob': 'bob@1'}", "done:"):
    assert expected in out, (expected, out[-3000:])
