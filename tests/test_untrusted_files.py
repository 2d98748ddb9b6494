"""Untrusted files: a model's chat template runs in jinja2's immutable
sandbox; a PEFT adapter_config.json cannot hang the importer; a PEFT
folder's factors must fit the base they are imported for.

Each test plants the attack the issue measured (a template calling
os.system, a `(.*.*)*z` rank_pattern key, a d_in = 48 adapter for a d_in =
64 base, a layer-5000 adapter) and checks it is refused, quickly, with an
error naming the problem and the fix, and that nothing ran or was stored.
"""

import json
import os
import re
import shutil
import time

import jinja2
import numpy as np
import pytest
import safetensors.numpy

from mintjax.model import tokenizer as tok_lib
from mintjax.model.hf import load_hf
from mintjax.store import peft_io, peft_patterns
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.registry import Registry

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT_A1 = os.path.join(HERE, "fixtures", "parity", "peft_llama", "a1")
BASE_DIR = os.path.join(HERE, "fixtures", "parity", "llama_gqa_llama3rope")
KEY_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
MSGS = [{"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Héllo \"quoted\" <b>"}]


def _tok(template):
  t = tok_lib.byte_tokenizer()
  t.chat_template = template
  return t


# --- chat templates --------------------------------------------------------

ESCAPES = [
    # The measured attack: reach os through a global's __globals__.
    "{{ cycler.__init__.__globals__.os.system('touch MARK') }}",
    "{{ raise_exception.__globals__['os'].system('touch MARK') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'x', 'content': 'y'}) %}ok",
    "{% set x = messages[0].update({'content': 'pwned'}) %}ok",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_template_cannot_leave_the_sandbox(template, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  t = _tok(template.replace("MARK", str(tmp_path / "ran")))
  msgs = [dict(m) for m in MSGS]
  with pytest.raises(ValueError, match="unsafe operation.*sandbox"):
    t.apply_chat_template(msgs)
  assert not (tmp_path / "ran").exists()
  assert msgs == MSGS  # the caller's messages were not mutated


def test_plain_environment_would_have_run_it(tmp_path):
  # Guards the guard: the same template escapes an unsandboxed jinja2
  # Environment (what tokenizer.py used), so the test above is not vacuous.
  mark = tmp_path / "ran"
  jinja2.Environment().from_string(ESCAPES[0].replace("MARK", str(mark))
                                   ).render(cycler=jinja2.utils.Cycler)
  assert mark.exists()


def test_template_helpers_transformers_provides():
  t = _tok("{{ messages | tojson }}|{{ strftime_now('%Y') }}|"
           "{% for m in messages %}{% if loop.index > 1 %}{% break %}"
           "{% endif %}{{ m.role }}{% endfor %}")
  js, year, roles = t.apply_chat_template(MSGS, False).split("|")
  assert json.loads(js) == MSGS and "Héllo" in js  # not ascii-escaped
  assert re.fullmatch(r"20\d\d", year) and roles == "system"
  with pytest.raises(ValueError, match="no system role"):
    _tok("{{ raise_exception('no system role') }}").apply_chat_template(MSGS)


def test_broken_template_is_one_clear_error():
  with pytest.raises(ValueError, match="does not parse"):
    _tok("{% for m in messages %}").apply_chat_template(MSGS)


def test_sandboxed_rendering_equals_plain_jinja_for_chatml():
  t = _tok(None)
  for gen in (True, False):
    want = jinja2.Environment(trim_blocks=True, lstrip_blocks=True
                              ).from_string(tok_lib.CHATML_TEMPLATE).render(
                                  messages=MSGS, add_generation_prompt=gen,
                                  bos_token="", eos_token="<eos>")
    assert t.apply_chat_template(MSGS, gen) == want


# --- PEFT: pattern keys ----------------------------------------------------


@pytest.fixture(scope="module")
def base():
  return load_hf(BASE_DIR)


def _peft(tmp_path, cfg_edit=None, tensors_edit=None):
  out = tmp_path / f"peft{len(list(tmp_path.iterdir()))}"
  shutil.copytree(PEFT_A1, out)
  if cfg_edit:
    p = out / peft_io.CONFIG_FILE
    cfg = json.loads(p.read_text())
    cfg_edit(cfg)
    p.write_text(json.dumps(cfg))
  if tensors_edit:
    p = str(out / peft_io.WEIGHTS_FILE)
    t = safetensors.numpy.load_file(p)
    tensors_edit(t)
    safetensors.numpy.save_file(t, p)
  return str(out)


@pytest.mark.parametrize("key", [
    "(.*.*)*z", "(a+)+$", "(a|a)*b", "(x*)*y", r"(\w+\.)*q_proj",
    ".*.*.*.*.*z", ".{0,8}" * 6 + "Z", "q" * 201, r"(q)\1", "(?=q)q_proj"])
def test_explosive_pattern_keys_are_refused_fast(tmp_path, key):
  folder = _peft(tmp_path, lambda c: c.update(rank_pattern={key: 4}))
  t0 = time.perf_counter()
  with pytest.raises(InvalidAdapterError, match=r"rank_pattern.*pattern key"):
    peft_io.read_peft(folder)
  assert time.perf_counter() - t0 < 1.0


def test_the_measured_hang_finishes_under_a_second_via_import(tmp_path):
  reg = Registry.open(str(tmp_path / "reg"))
  folder = _peft(tmp_path, lambda c: c.update(alpha_pattern={"(.*.*)*z": 2}))
  t0 = time.perf_counter()
  with pytest.raises(InvalidAdapterError, match="nests a quantifier"):
    peft_io.import_peft_folder(reg, folder, "x", base_fingerprint="sha256:x")
  assert time.perf_counter() - t0 < 1.0
  assert reg.list_adapters() == []
  reg.close()


NAMES = [f"model.layers.{i}.{m}" for i in range(30)
         for m in peft_io.HF_MODULES.values()]


@pytest.mark.parametrize("key", [
    "q_proj", "self_attn.q_proj", "layers.3.mlp.down_proj",
    "model.layers.12.self_attn.k_proj", r"layers\.\d+\.mlp\.up_proj",
    r".*\.layers\.(1|2)\.self_attn\.(q|v)_proj", "(q|k)_proj", "proj",
    r"layers.1\d.mlp.*", "[qk]_proj", ".*_proj", "mlp", "3.mlp.down_proj"])
def test_allowed_keys_match_exactly_as_peft_does(key):
  # PEFT's rule: re.match(rf"(.*\.)?({key})$", name), first key wins.
  peft_patterns.check_pattern(key, "test")
  compiled = {key: (re.compile(key), 1)}
  for name in NAMES:
    want = re.match(rf"(.*\.)?({key})$", name) is not None
    assert (peft_patterns.pattern_key(compiled, name) == key) == want, name


def test_worst_allowed_key_stays_fast():
  key = ".*.*.*[^a-z]"  # three quantifiers, never matches a suffix
  peft_patterns.check_pattern(key, "test")
  compiled = {key: (re.compile(key), 1)}
  t0 = time.perf_counter()
  for name in NAMES:
    assert peft_patterns.pattern_key(compiled, name) is None
  assert time.perf_counter() - t0 < 1.0


# --- PEFT: factors against the base ----------------------------------------


def _set(key, arr):
  return lambda t: t.__setitem__(key, arr)


def _move_q_to(layer):
  def edit(t):
    for k in (KEY_Q_A, KEY_Q_B):
      t[k.replace("layers.0.", f"layers.{layer}.")] = t.pop(k)
  return edit


@pytest.mark.parametrize("edit,pattern", [
    (_set(KEY_Q_A, np.zeros((4, 48), np.float32)),
     r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
     r"\.weight' has shape \(4, 48\), but the base's self_attn\.q_proj needs "
     r"\(4, 64\).*import it for the base it was trained on"),
    (_set(KEY_Q_B, np.zeros((48, 4), np.float32)),
     r"q_proj\.lora_B\.weight' has shape \(48, 4\).*needs \(64, 4\)"),
    (_move_q_to(5000),
     r"'base_model\.model\.model\.layers\.5000\.self_attn\.q_proj\.lora_A"
     r"\.weight' adapts layer 5000, but the base has 2 layers.*trained on"),
])
def test_factors_must_fit_the_base(tmp_path, base, edit, pattern):
  reg = Registry.open(str(tmp_path / "reg"))
  folder = _peft(tmp_path, tensors_edit=edit)
  with pytest.raises(InvalidAdapterError, match=pattern):
    peft_io.import_peft_folder(reg, folder, "x",
                               base_fingerprint=base.fingerprint,
                               config=base.config)
  assert reg.list_adapters() == []
  reg.close()


def test_good_adapter_still_imports_with_the_base_check(tmp_path, base):
  reg = Registry.open(str(tmp_path / "reg"))
  rev = peft_io.import_peft_folder(reg, PEFT_A1, "a1",
                                   base_fingerprint=base.fingerprint,
                                   config=base.config)
  assert rev.ref == "a1@1"
  reg.close()


def test_smollm2_template_renders_as_unsandboxed_jinja():
  # The sandbox must not change what a real template renders.
  from mintjax.model import gguf, smollm2  # pylint: disable=g-import-not-at-top
  t = gguf.tokenizer_from_gguf(gguf._reader(smollm2.default_gguf_path()))
  plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  plain.globals["raise_exception"] = tok_lib._raise
  template = plain.from_string(t.chat_template)
  eos = t.decode([t.eos_id], skip_special=False)
  for msgs in (MSGS, MSGS[1:], MSGS + [{"role": "assistant", "content": "Hi"},
                                       {"role": "user", "content": "Again"}]):
    for gen in (True, False):
      want = template.render(messages=msgs, add_generation_prompt=gen,
                             bos_token="", eos_token=eos)
      assert t.apply_chat_template(msgs, gen) == want
