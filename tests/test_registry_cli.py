"""`python -m tools.mint`: every command through `run`, plus one real
subprocess invocation with --json."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags

from mintjax.store import records
from mintjax.store.errors import RegistryError, UnknownRefError
from mintjax.store.registry import Registry
from tools import crash_test, mint

PEFT_A1 = os.path.join(os.path.dirname(__file__), "fixtures", "parity",
                       "peft_llama", "a1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _flags():
  # Other test modules import launchers whose flags are required=True, so
  # parsing the global FLAGS here would fail their validators; mark them
  # parsed (defaults) instead and restore defaults afterwards.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield
  flags.FLAGS.unparse_flags()
  flags.FLAGS.mark_as_parsed()


@pytest.fixture
def reg(tmp_path):
  r = Registry.open(str(tmp_path / "reg"))
  crash_test.create(r, "alice")
  for s in range(3):
    r.publish("alice", crash_test.weights_for(s), {"seed": s, "steps": s})
  r.record_eval("alice@2", "loss", 0.5)
  yield r
  r.close()


def test_list_show_log(reg):
  out = mint.run(reg, ["list"])
  assert "alice" in out and "r2 q,v" in out
  reg.tag("alice@2", "prod")
  show = mint.run(reg, ["show", "alice:prod"])
  assert "alice@2" in show and "loss" in show and "prod" in show
  log = mint.run(reg, ["log", "alice"])
  assert "loss=0.5" in log and "prod" in log and len(log.splitlines()) >= 5
  data = json.loads(mint.run(reg, ["log", "alice"], as_json=True))
  assert [r["revision"] for r in data["revisions"]] == [1, 2, 3]


def test_tag_rollback_diff_verify_gc(reg):
  assert mint.run(reg, ["tag", "alice@3", "prod"]) == "alice:prod -> alice@3"
  flags.FLAGS.to = 1
  assert mint.run(reg, ["rollback", "alice"]) == "alice:prod -> alice@1"
  diff = json.loads(mint.run(reg, ["diff", "alice@1", "alice@3"], True))
  assert set(diff) == {"q", "v"} and diff["q"]["delta"] > 0
  assert "all OK" in mint.run(reg, ["verify"])
  assert json.loads(mint.run(reg, ["gc"], True))["reclaimed_rows"] == 0


def test_peft_commands(reg, tmp_path):
  flags.FLAGS.id = "imp"
  flags.FLAGS.base_fingerprint = "sha256:b"
  assert mint.run(reg, ["import-peft", PEFT_A1]) == (
      f"imported {PEFT_A1} as imp@1")
  out = str(tmp_path / "exp")
  assert mint.run(reg, ["export-peft", "imp", out]).startswith("exported")
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]


def test_errors(reg):
  with pytest.raises(UnknownRefError, match="names no revision"):
    mint.run(reg, ["show", "alice@7"])
  with pytest.raises(RegistryError, match="unknown command"):
    mint.run(reg, ["frobnicate"])
  with pytest.raises(RegistryError, match="takes REF TAG"):
    mint.run(reg, ["tag", "alice"])
  with pytest.raises(RegistryError, match="--id"):
    mint.run(reg, ["import-peft", PEFT_A1])


def test_subprocess_json(reg):
  path = os.path.dirname(reg.catalog.path)
  proc = subprocess.run(
      [sys.executable, "-m", "tools.mint", f"--registry={path}", "--json",
       "list"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)[0]["revisions"] == 3
  bad = subprocess.run(
      [sys.executable, "-m", "tools.mint", f"--registry={path}", "show",
       "nobody"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "unknown adapter 'nobody'" in bad.stderr


def _main(capsys, registry: str, *args: str) -> tuple[int, str, str]:
  """`python -m tools.mint --registry=REGISTRY ARGS` in this process."""
  flags.FLAGS.registry = registry
  rc = mint.main(["mint", *args])
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_verify_exits_nonzero_listing_every_bad_ref(reg, capsys):
  path = os.path.dirname(reg.catalog.path)
  assert _main(capsys, path, "verify")[0] == 0
  damaged = []
  for ref in ("alice@1", "alice@3"):
    rev = reg.resolve(ref)
    layout = records.layout_of(reg.adapter("alice"))
    damaged.append(reg.store.shard_location(rev.array_key, layout, rev.row))
  with open(damaged[0], "r+b") as f:  # Flip one data byte of alice@1.
    b = f.read(1)
    f.seek(0)
    f.write(bytes([b[0] ^ 0x01]))
  os.remove(damaged[1])  # Lose alice@3's shard.
  rc, out, _ = _main(capsys, path, "verify")
  assert rc == 1 and "2 CORRUPT" in out
  assert "alice@1" in out and "alice@3" in out and "alice@2" not in out
  with pytest.raises(mint.ProblemsFound, match="alice@1"):
    mint.run(reg, ["verify"], as_json=True)


@pytest.mark.parametrize("args", [("list",), ("show", "alice"),
                                  ("log", "alice"), ("verify",), ("gc",),
                                  ("tag", "alice@1", "prod")])
def test_a_mistyped_registry_is_refused_not_created(tmp_path, capsys, args):
  typo = str(tmp_path / "regsitry")
  rc, out, err = _main(capsys, typo, *args)
  assert rc == 1 and not out
  assert "is not a mintjax registry" in err and "import-peft" in err
  assert len(err.strip().splitlines()) == 1
  assert not os.path.exists(typo)
  (tmp_path / "empty_dir").mkdir()  # A directory, but not a registry.
  rc, _, err = _main(capsys, str(tmp_path / "empty_dir"), *args)
  assert rc == 1 and "is not a mintjax registry" in err
  assert os.listdir(tmp_path / "empty_dir") == []


def test_open_create_false_opens_existing_and_default_still_creates(tmp_path):
  with pytest.raises(RegistryError, match="not a mintjax registry"):
    Registry.open(str(tmp_path / "new"), create=False)
  assert not os.path.exists(tmp_path / "new")
  Registry.open(str(tmp_path / "new")).close()  # Library default: create.
  Registry.open(str(tmp_path / "new"), create=False).close()
