"""The README's ten-line Python example runs and answers as documented."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README.md lost its Python example"
  example = blocks[0]
  assert len(example.strip().splitlines()) <= 10
  out = subprocess.run([sys.executable, "-c", example], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "Paris"
