"""Bad-input corpus, store side: the registry API, PEFT import/export and the
`tools/mint` CLI (in process through `mint.main`, plus a few subprocesses).

Every case must give a one-line error naming the problem and the fix, and
leave the registry's files and catalog rows unchanged (see
`bad_input_corpus`). Cases that wait on the store rewrite are
xfail(strict=True) with a 'store:' reason.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from absl import flags

from bad_input_corpus import Case, Reported, captured_stderr, check, params
from mintjax.adapters.spec import AdapterWeights
from mintjax.model.hf import load_hf
from mintjax.store import peft_io
from mintjax.store.errors import RegistryError
from mintjax.store.registry import Registry
from tools import mint

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout whose code is under test (also when tallying an old one).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(mint.__file__)))
PEFT_A1 = os.path.join(HERE, "fixtures", "parity", "peft_llama", "a1")
BASE_DIR = os.path.join(HERE, "fixtures", "parity", "llama_gqa_llama3rope")
KEY_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
RE = RegistryError


class Ctx:
  """A registry with 'alice' (3 revisions, prod -> 2) and PEFT folders."""

  def __init__(self, tmp: str):
    self.tmp = tmp
    self.registry_dir = os.path.join(tmp, "reg")
    self.base = load_hf(BASE_DIR)
    self.config = self.base.config
    self.fp = self.base.fingerprint
    self.reg = Registry.open(self.registry_dir)
    self.spec = dict(targets=["q", "v"], rank=2, alpha=4.0)
    self.reg.create_adapter("alice", spec=self.spec, base_fingerprint=self.fp)
    for s in range(3):
      self.reg.publish("alice", self.weights(seed=s), {"seed": s})
    self.reg.tag("alice@2", "prod")
    self.reg.create_adapter("bob", spec=dict(targets=["q"], rank=4),
                            base_fingerprint=self.fp)
    self.reg.publish("bob", AdapterWeights.random(self.config, ("q",), 4,
                                                  seed=9), {})
    self.exported = os.path.join(tmp, "exported")
    peft_io.export_peft(self.reg, "alice@1", self.exported)
    self.a_file = os.path.join(tmp, "plain_file")
    with open(self.a_file, "w") as f:
      f.write("x")
    self._n = 0

  def weights(self, seed=0, rank=2, targets=("q", "v"), **kw):
    return AdapterWeights.random(self.config, targets, rank, alpha=4.0,
                                 seed=seed, **kw)

  def peft(self, cfg_edit=None, tensors_edit=None, raw_cfg=None,
           raw_weights=None) -> str:
    """A copy of fixture a1 with its config / tensors edited."""
    self._n += 1
    out = os.path.join(self.tmp, f"peft{self._n}")
    shutil.copytree(PEFT_A1, out)
    cfg_path = os.path.join(out, peft_io.CONFIG_FILE)
    w_path = os.path.join(out, peft_io.WEIGHTS_FILE)
    if cfg_edit or raw_cfg is not None:
      with open(cfg_path) as f:
        cfg = json.load(f)
      if cfg_edit:
        cfg_edit(cfg)
      with open(cfg_path, "wb") as f:
        raw = raw_cfg if raw_cfg is not None else json.dumps(cfg)
        f.write(raw if isinstance(raw, bytes) else raw.encode())
    if tensors_edit:
      t = safetensors.numpy.load_file(w_path)
      tensors_edit(t)
      safetensors.numpy.save_file(t, w_path)
    if raw_weights is not None:
      with open(w_path, "wb") as f:
        f.write(raw_weights(open(w_path, "rb").read()))
    return out

  def close(self):
    self.reg.close()


def build_context(tmp):
  return Ctx(tmp)


def _imp(ctx, folder, **kw):
  kw.setdefault("base_fingerprint", ctx.fp)
  if "config" not in inspect.signature(peft_io.import_peft_folder).parameters:
    # The tally of older code: its closest check is the layer count.
    if kw.pop("config", None) is not None:
      kw["num_layers"] = ctx.config.num_layers
  return peft_io.import_peft_folder(ctx.reg, folder,
                                    kw.pop("adapter_id", "newp"), **kw)


def _imp_cfg(**edit):
  def fn(ctx):
    return _imp(ctx, ctx.peft(cfg_edit=lambda c: c.update(edit)),
                config=ctx.config)
  return fn


def _imp_t(edit, **kw):
  def fn(ctx):
    return _imp(ctx, ctx.peft(tensors_edit=edit), **kw)
  return fn


def _set(key, arr):
  return lambda t: t.__setitem__(key, arr)


def _move_q_to(layer: str):
  """Moves layer 0's q_proj factors to layer `layer` (a string: any digits)."""
  def edit(t):
    for k in (KEY_Q_A, KEY_Q_B):
      t[k.replace("layers.0.", f"layers.{layer}.")] = t.pop(k)
  return edit


def _pattern(field, key, value=2):
  return _imp_cfg(**{field: {key: value}})


def cli(ctx, *args, **flag_values):
  """Runs tools/mint's main in process; an escaped exception = traceback."""
  fl = flags.FLAGS
  if not fl.is_parsed():
    fl.mark_as_parsed()
  fl.registry = flag_values.pop("registry", ctx.registry_dir)
  for k, v in flag_values.items():
    setattr(fl, k, v)
  try:
    with captured_stderr() as err:
      rc = mint.main(["mint", *args])
  except Exception as e:  # pylint: disable=broad-except  # old code leaks
    return Reported(f"{type(e).__name__}: {e}", traceback=True)
  finally:
    fl.unparse_flags()
    fl.mark_as_parsed()
  return Reported(err.getvalue().strip() if rc else None)


def sub(ctx, *args):
  """tools/mint as a subprocess: (exit code, stderr) -> Reported."""
  proc = subprocess.run(
      [sys.executable, "-m", "tools.mint", *args], cwd=REPO,
      capture_output=True, text=True, timeout=180,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode == 0:
    return Reported(None)
  return Reported(proc.stderr.strip(), traceback="Traceback" in proc.stderr)


def _garbage_catalog(ctx):
  d = os.path.join(ctx.tmp, "garbage_reg")
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "catalog.sqlite"), "wb") as f:
    f.write(b"this is not sqlite" * 100)
  return d


def _truncate(b):
  return b[:len(b) // 2]


def _nan(t):
  a = t[KEY_Q_A].copy()
  a[0, 0] = np.nan
  t[KEY_Q_A] = a


CASES = [
    # --- registry API: ids, specs, fingerprints ----------------------------
    Case("create_empty_id", lambda c: c.reg.create_adapter(
        "", spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_space_id", lambda c: c.reg.create_adapter(
        "a b", spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_path_id", lambda c: c.reg.create_adapter(
        "../etc", spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_long_id", lambda c: c.reg.create_adapter(
        "x" * 1000, spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_int_id", lambda c: c.reg.create_adapter(
        5, spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_newline_id", lambda c: c.reg.create_adapter(
        "carol\n", spec=c.spec, base_fingerprint=c.fp), RE, "adapter id"),
    Case("create_rank0", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, rank=0), base_fingerprint=c.fp), RE,
         "rank"),
    Case("create_rank_str", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, rank="8"), base_fingerprint=c.fp), RE,
         "rank"),
    Case("create_bad_target", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, targets=["zz"]), base_fingerprint=c.fp),
         RE, "zz"),
    Case("create_no_targets", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, targets=[]), base_fingerprint=c.fp), RE,
         "target"),
    Case("create_bad_dtype", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, dtype="int8"), base_fingerprint=c.fp), RE,
         "dtype|int8"),
    Case("create_unknown_spec_key", lambda c: c.reg.create_adapter(
        "carol", spec=dict(c.spec, colour="red"), base_fingerprint=c.fp), RE,
         "colour|spec"),
    Case("create_no_fingerprint", lambda c: c.reg.create_adapter(
        "carol", spec=c.spec, base_fingerprint=""), RE, "base_fingerprint"),
    Case("create_duplicate", lambda c: c.reg.create_adapter(
        "alice", spec=dict(c.spec, rank=4), base_fingerprint=c.fp), RE,
         "already exists"),
    Case("create_owner_int", lambda c: c.reg.create_adapter(
        "carol", spec=c.spec, base_fingerprint=c.fp, owner=5), RE, "owner"),
    # --- publish -----------------------------------------------------------
    Case("publish_unknown_id", lambda c: c.reg.publish(
        "ghost", c.weights()), LookupError, "ghost"),
    Case("publish_wrong_rank", lambda c: c.reg.publish(
        "alice", c.weights(rank=4)), RE, "rank"),
    Case("publish_wrong_targets", lambda c: c.reg.publish(
        "alice", c.weights(targets=("q", "k"))), RE, "target"),
    Case("publish_nan", lambda c: c.reg.publish("alice", AdapterWeights(
        {t: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a)
         for t, a in c.weights().lora_a.items()}, c.weights().lora_b, 2,
        4.0)), RE, "NaN|finite"),
    Case("publish_bad_parent", lambda c: c.reg.publish(
        "alice", c.weights(), parent=99), RE, "parent|99"),
    Case("publish_prov_not_json", lambda c: c.reg.publish(
        "alice", c.weights(), {"x": object()}), RE, "provenance|JSON"),
    # --- refs --------------------------------------------------------------
    Case("resolve_unknown", lambda c: c.reg.resolve("ghost"), LookupError,
         "ghost"),
    Case("resolve_rev0", lambda c: c.reg.resolve("alice@0"), RE,
         "revision"),
    Case("resolve_rev_neg", lambda c: c.reg.resolve("alice@-1"), RE,
         "alice@-1"),
    Case("resolve_rev_missing", lambda c: c.reg.resolve("alice@99"),
         LookupError, "alice@99|99"),
    Case("resolve_rev_float", lambda c: c.reg.resolve("alice@1.5"), RE,
         "alice@1.5"),
    Case("resolve_arabic_digit", lambda c: c.reg.resolve("alice@\u0663"), RE,
         "revision|reference"),
    Case("resolve_fullwidth_digit", lambda c: c.reg.resolve("alice@\uff12"),
         RE, "revision|reference"),
    Case("resolve_trailing_newline", lambda c: c.reg.resolve("alice@1\n"),
         RE, "reference|invalid|revision"),
    Case("resolve_id_newline", lambda c: c.reg.resolve("alice\n"),
         RE, "reference|invalid|adapter id"),
    Case("resolve_unknown_tag", lambda c: c.reg.resolve("alice:nope"),
         LookupError, "nope"),
    Case("resolve_empty", lambda c: c.reg.resolve(""), RE, "reference"),
    Case("resolve_none", lambda c: c.reg.resolve(None), RE, "reference"),
    Case("resolve_at_only", lambda c: c.reg.resolve("@3"), RE, "reference"),
    Case("resolve_both", lambda c: c.reg.resolve("alice@1:prod"), RE,
         "reference"),
    Case("load_wrong_base", lambda c: c.reg.load(
        "alice", expect_base="sha256:other"), RE, "base"),
    Case("load_many_one_unknown", lambda c: c.reg.load_many(
        ["alice", "ghost"]), LookupError, "ghost"),
    Case("history_unknown", lambda c: c.reg.history("ghost"), LookupError,
         "ghost"),
    Case("evals_unknown", lambda c: c.reg.evals("alice@42"), LookupError,
         "42"),
    # --- tags, evals, rollback, diff, gc -----------------------------------
    Case("tag_empty", lambda c: c.reg.tag("alice@1", ""), RE, "tag"),
    Case("tag_space", lambda c: c.reg.tag("alice@1", "my tag"), RE, "tag"),
    Case("tag_newline", lambda c: c.reg.tag("alice@1", "prod\n"), RE, "tag"),
    Case("tag_unknown_rev", lambda c: c.reg.tag("alice@9", "prod"),
         LookupError, "alice@9|9"),
    Case("eval_nan", lambda c: c.reg.record_eval("alice@1", "loss",
                                                 math.nan), RE, "finite"),
    Case("eval_str", lambda c: c.reg.record_eval("alice@1", "loss", "low"),
         RE, "number"),
    Case("eval_bool", lambda c: c.reg.record_eval("alice@1", "loss", True),
         RE, "number"),
    Case("eval_no_metric", lambda c: c.reg.record_eval("alice@1", " ", 1.0),
         RE, "metric"),
    Case("eval_unknown_ref", lambda c: c.reg.record_eval("ghost@1", "l", 1.0),
         LookupError, "ghost"),
    Case("rollback_no_tag", lambda c: c.reg.rollback("alice", tag="beta"),
         RE, "beta"),
    Case("rollback_to_missing", lambda c: c.reg.rollback("alice", to=99), RE,
         "99"),
    Case("rollback_unknown", lambda c: c.reg.rollback("ghost"), LookupError,
         "ghost"),
    Case("diff_bad_ref", lambda c: c.reg.diff("alice@0", "alice@1"), RE,
         "revision"),
    Case("diff_unknown", lambda c: c.reg.diff("alice@1", "ghost"),
         LookupError, "ghost"),
    Case("gc_negative_grace", lambda c: c.reg.gc(-5), RE, "grace"),
    Case("open_bad_spec", lambda c: Registry.open({"store": "/tmp"}), RE,
         "catalog"),
    Case("open_remote_catalog", lambda c: Registry.open("s3://bucket/x"), RE,
         "local"),
    # --- PEFT import: files ------------------------------------------------
    Case("peft_missing_folder", lambda c: _imp(c, "/nonexistent/peft"), RE,
         "not a folder|not found"),
    Case("peft_folder_is_file", lambda c: _imp(c, c.a_file), RE,
         "not a folder|not found"),
    Case("peft_no_config", lambda c: _imp(c, (lambda d: (os.remove(
        os.path.join(d, peft_io.CONFIG_FILE)), d)[1])(c.peft())), RE,
         "adapter_config.json not found"),
    Case("peft_no_weights", lambda c: _imp(c, (lambda d: (os.remove(
        os.path.join(d, peft_io.WEIGHTS_FILE)), d)[1])(c.peft())), RE,
         "adapter_model.safetensors not found"),
    Case("peft_config_not_json", lambda c: _imp(c, c.peft(raw_cfg="{r: 8")),
         RE, "not valid JSON"),
    Case("peft_config_list", lambda c: _imp(c, c.peft(raw_cfg="[1, 2]")), RE,
         "JSON object"),
    Case("peft_config_bad_utf8", lambda c: _imp(c, c.peft(
        raw_cfg=b'{"r": "\xff"}')), RE, "not valid JSON"),
    Case("peft_truncated_weights", lambda c: _imp(c, c.peft(
        raw_weights=_truncate)), RE, "safetensors"),
    Case("peft_garbage_weights", lambda c: _imp(c, c.peft(
        raw_weights=lambda b: b"\xff" * 64)), RE, "safetensors"),
    Case("peft_empty_weights", lambda c: _imp(c, c.peft(
        raw_weights=lambda b: b"")), RE, "safetensors"),
    # --- PEFT import: config -----------------------------------------------
    Case("peft_r0", _imp_cfg(r=0), RE, "positive integer 'r'"),
    Case("peft_r_str", _imp_cfg(r="8"), RE, "'r'"),
    Case("peft_r_float", _imp_cfg(r=4.5), RE, "'r'"),
    Case("peft_alpha_neg", _imp_cfg(lora_alpha=-1), RE, "lora_alpha"),
    Case("peft_alpha_bool", _imp_cfg(lora_alpha=True), RE, "lora_alpha"),
    Case("peft_type_ia3", _imp_cfg(peft_type="IA3"), RE, "IA3"),
    Case("peft_dora", _imp_cfg(use_dora=True), RE, "DoRA"),
    Case("peft_bias_all", _imp_cfg(bias="all"), RE, "bias"),
    Case("peft_modules_to_save", _imp_cfg(modules_to_save=["lm_head"]), RE,
         "modules_to_save"),
    Case("peft_target_embed", _imp_cfg(target_modules=["embed_tokens"]), RE,
         "embed_tokens"),
    Case("peft_target_int", _imp_cfg(target_modules=5), RE,
         "target_modules"),
    Case("peft_rslora_str", _imp_cfg(use_rslora="yes"), RE, "use_rslora"),
    Case("peft_rank_pattern_list", _imp_cfg(rank_pattern=["q_proj"]), RE,
         "rank_pattern"),
    Case("peft_pattern_redos", _pattern("rank_pattern", "(.*.*)*z"), RE,
         "nests a quantifier"),
    Case("peft_pattern_alt_star", _pattern("rank_pattern", "(a|a)*b"), RE,
         "alternation"),
    Case("peft_pattern_plus_plus", _pattern("alpha_pattern", "(a+)+$"), RE,
         "nests a quantifier"),
    Case("peft_pattern_many_repeats", _pattern(
        "rank_pattern", ".{0,8}" * 6 + "Z"), RE, "quantifiers"),
    Case("peft_pattern_long", _pattern("rank_pattern", "q" * 300), RE,
         "characters"),
    Case("peft_pattern_invalid", _pattern("rank_pattern", "(q_proj"), RE,
         "not a valid regex"),
    Case("peft_pattern_backref", _pattern("rank_pattern", r"(q)\1"), RE,
         "backreference"),
    Case("peft_pattern_value_str", _pattern("rank_pattern", "q_proj", "two"),
         RE, "positive number"),
    Case("peft_pattern_rank_mismatch", _pattern("rank_pattern", "q_proj", 8),
         RE, "rank_pattern"),
    # --- PEFT import: tensors ----------------------------------------------
    Case("peft_d_in_48", _imp_t(_set(KEY_Q_A, np.zeros((4, 48), np.float32)),
                                config=None), RE, "48"),
    Case("peft_d_in_48_vs_base", lambda c: _imp(c, c.peft(tensors_edit=_set(
        KEY_Q_A, np.zeros((4, 48), np.float32))), config=c.config), RE,
         r"q_proj.lora_A.*\(4, 48\).*\(4, 64\).*base"),
    Case("peft_d_out_vs_base", lambda c: _imp(c, c.peft(tensors_edit=lambda t: (
        t.__setitem__(KEY_Q_B, np.zeros((48, 4), np.float32)))),
        config=c.config), RE, r"\(48, 4\).*\(64, 4\)"),
    Case("peft_layer_5000", lambda c: _imp(c, c.peft(
        tensors_edit=_move_q_to("5000")), config=c.config), RE,
         "layers.5000.*layer 5000.*2 layers"),
    Case("peft_layer_5000_num_layers", lambda c: _imp(c, c.peft(
        tensors_edit=_move_q_to("5000")), num_layers=2), RE,
         "layer 5000.*2 layers"),
    Case("peft_layer_huge_no_base", lambda c: _imp(c, c.peft(
        tensors_edit=_move_q_to("99999"))), RE, "layer 99999"),
    Case("peft_arabic_layer", lambda c: _imp(c, c.peft(
        tensors_edit=_move_q_to("\u0660"))), RE,
         "does not know|expected only"),
    Case("peft_lm_head_key", _imp_t(_set(
        "base_model.model.lm_head.lora_A.weight",
        np.zeros((4, 64), np.float32))), RE, "lm_head"),
    Case("peft_magnitude_key", _imp_t(_set(
        KEY_Q_A.replace("lora_A.weight", "lora_magnitude_vector"),
        np.zeros(64, np.float32))), RE, "DoRA"),
    Case("peft_missing_B", _imp_t(lambda t: t.pop(KEY_Q_B)), RE,
         "lacks lora_A or lora_B"),
    Case("peft_nan", _imp_t(_nan), RE, "NaN"),
    Case("peft_int_dtype", _imp_t(lambda t: [t.__setitem__(
        k, v.astype(np.int32)) for k, v in list(t.items())]), RE, "dtype"),
    Case("peft_mixed_dtype", _imp_t(lambda t: t.__setitem__(
        KEY_Q_A, t[KEY_Q_A].astype(np.float16))), RE, "dtype"),
    Case("peft_rank_vs_r", _imp_t(lambda t: [
        t.__setitem__(KEY_Q_A, np.zeros((2, 64), np.float32)),
        t.__setitem__(KEY_Q_B, np.zeros((64, 2), np.float32))]), RE,
         "rank 2.*says 4"),
    Case("peft_3d_tensor", _imp_t(_set(KEY_Q_A, np.zeros((4, 64, 1),
                                                         np.float32))), RE,
         r"\[r, in\]"),
    Case("peft_into_other_spec", lambda c: _imp(c, PEFT_A1,
                                                adapter_id="alice"), RE,
         "already exists"),
    # --- PEFT export -------------------------------------------------------
    Case("export_onto_existing", lambda c: peft_io.export_peft(
        c.reg, "alice@1", c.exported), RE, "already holds"),
    Case("export_onto_file", lambda c: peft_io.export_peft(
        c.reg, "alice@1", c.a_file), RE, "not a folder"),
    Case("export_unknown", lambda c: peft_io.export_peft(
        c.reg, "ghost", os.path.join(c.tmp, "never")), LookupError, "ghost"),
    Case("export_bad_ref", lambda c: peft_io.export_peft(
        c.reg, "alice@0", os.path.join(c.tmp, "never")), RE, "revision"),
    # --- tools/mint in process ---------------------------------------------
    Case("cli_no_command", lambda c: cli(c), match="no command"),
    Case("cli_unknown_command", lambda c: cli(c, "frob"),
         match="unknown command"),
    Case("cli_show_arity", lambda c: cli(c, "show"), match="takes REF"),
    Case("cli_show_unknown", lambda c: cli(c, "show", "ghost"),
         match="ghost"),
    Case("cli_tag_bad", lambda c: cli(c, "tag", "alice@1", "bad tag"),
         match="tag"),
    Case("cli_rollback_to", lambda c: cli(c, "rollback", "alice", to=77),
         match="77"),
    Case("cli_import_no_id", lambda c: cli(c, "import-peft", PEFT_A1),
         match="--id"),
    Case("cli_import_both_bases", lambda c: cli(
        c, "import-peft", PEFT_A1, id="z", base=BASE_DIR,
        base_fingerprint="sha256:x"), match="exactly one"),
    Case("cli_import_truncated", lambda c: cli(
        c, "import-peft", c.peft(raw_weights=_truncate), id="z",
        base_fingerprint=c.fp), match="safetensors"),
    Case("cli_import_bad_config", lambda c: cli(
        c, "import-peft", c.peft(raw_cfg="{nope"), id="z",
        base_fingerprint=c.fp), match="not valid JSON"),
    Case("cli_import_shape_vs_base", lambda c: cli(
        c, "import-peft", c.peft(tensors_edit=_set(
            KEY_Q_A, np.zeros((4, 48), np.float32))), id="z", base=BASE_DIR),
         match=r"\(4, 48\).*\(4, 64\)"),
    Case("cli_import_redos", lambda c: cli(
        c, "import-peft", c.peft(cfg_edit=lambda d: d.update(
            rank_pattern={"(.*.*)*z": 2})), id="z", base_fingerprint=c.fp),
         match="nests a quantifier"),
    Case("cli_import_missing_base", lambda c: cli(
        c, "import-peft", PEFT_A1, id="z", base="/nonexistent/base"),
         match="nonexistent"),
    Case("cli_export_existing", lambda c: cli(
        c, "export-peft", "alice@1", c.exported), match="already holds"),
    Case("cli_export_onto_file", lambda c: cli(
        c, "export-peft", "alice@1", c.a_file), match="not a folder"),
    Case("cli_garbage_catalog", lambda c: cli(
        c, "list", registry=_garbage_catalog(c)), match="SQLite|catalog"),
    Case("cli_diff_unknown", lambda c: cli(c, "diff", "alice@1", "ghost"),
         match="ghost"),
    Case("cli_show_arabic_digit", lambda c: cli(c, "show", "alice@\u0663"),
         match="revision|reference"),
    # --- tools/mint as a subprocess (a representative few) -----------------
    Case("sub_no_registry", lambda c: sub(c, "list"), match="--registry"),
    Case("sub_show_unknown", lambda c: sub(
        c, f"--registry={c.registry_dir}", "show", "ghost"), match="ghost"),
    Case("sub_garbage_catalog", lambda c: sub(
        c, f"--registry={_garbage_catalog(c)}", "list"),
         match="SQLite|catalog"),
    Case("sub_import_truncated", lambda c: sub(
        c, f"--registry={c.registry_dir}", "import-peft",
        c.peft(raw_weights=_truncate), "--id=z",
        f"--base_fingerprint={c.fp}"), match="safetensors"),
    Case("sub_export_existing", lambda c: sub(
        c, f"--registry={c.registry_dir}", "export-peft", "alice@1",
        c.exported), match="already holds"),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  c = Ctx(str(tmp_path_factory.mktemp("bad_store")))
  yield c
  c.close()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_store_input(case, ctx):
  check(case, ctx, ctx.registry_dir)


def test_corpus_names_are_unique():
  assert len({c.name for c in CASES}) == len(CASES)
