"""Two processes on localhost CPU train the same adapters as one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from mintjax.apps.personal_data import write_personal_data
from mintjax.store.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(tmp, name, ncpu, extra=()):
  return [sys.executable, "-m", "launch.train",
          "--config=configs/smollm2_personal.py:tiny",
          f"--config.train_data={tmp}/data/train",
          f"--config.heldout_data={tmp}/data/heldout",
          f"--config.registry={tmp}/{name}/reg", f"--workdir={tmp}/{name}/work",
          "--config.steps_per_cohort=4", "--config.checkpoint_every=2",
          "--config.batch_size=8", "--config.lora.rank=2",
          "--config.lora_impl=gather", f"--num_cpu_devices={ncpu}", *extra]


def test_two_processes_match_one_process(tmp_path):
  tmp = str(tmp_path)
  write_personal_data(os.path.join(tmp, "data"), num_users=3, seed=1)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(tmp, "multi", 2, [f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}"]),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  single = subprocess.run(_cmd(tmp, "single", 4), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  outs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
  assert single.returncode == 0, single.stderr[-3000:]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  one, two = Registry.open(f"{tmp}/single/reg"), Registry.open(
      f"{tmp}/multi/reg")
  for u in ("user0000", "user0001", "user0002"):
    _, w1 = one.load(u)
    _, w2 = two.load(u)
    for t in w1.lora_a:
      np.testing.assert_allclose(w1.lora_a[t], w2.lora_a[t], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(w1.lora_b[t], w2.lora_b[t], rtol=1e-5,
                                 atol=1e-6)
    assert np.abs(w2.lora_b["q"]).max() > 0  # it trained
