"""What Hugging Face users expect, checked against transformers + PEFT.

One engine serves the two PEFT parity folders directly (no registry) on a
copy of the llama_gqa_llama3rope base that ships a tokenizer and a
generation_config.json listing two eos ids. Checked here:

- PEFT folders served by name equal PEFT's own mixed-batch `generate`
  (a2 has rank_pattern / alpha_pattern: the per-module scales must be in);
- the bank is sized from the folders; a config that cannot hold them is
  refused at construction, for folders and for a registry (and its refs);
- prompt logprobs and top logprobs equal log_softmax of PEFT's logits;
- every eos id of generation_config.json stops generation;
- import_peft(reg, base, *folders) imports all or nothing;
- exported adapter and base files get 0666 & ~umask; save_hf writes the
  eos list back.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tokenizers

from mintjax.model.hf import CheckpointError, load_hf, save_hf
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.store import peft_io
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.registry import Registry

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
PEFT = FIXTURES / "peft_llama"
FOLDERS = {"a1": str(PEFT / "a1"), "a2": str(PEFT / "a2")}
EXPECTED = np.load(PEFT / "expected.npz")
NAMES = [None if n == "__base__" else str(n)
         for n in EXPECTED["adapter_names"]]
# A token the base generates first for the base parity prompt: made an eos.
EXTRA_EOS = int(EXPECTED["generated_ids"][0][0])
SHAPES = dict(num_slots=2, max_batch=4, max_len=32, steps_per_call=4,
              prefill_batch=2, min_bucket=16)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  folder = tmp_path_factory.mktemp("base") / "llama"
  shutil.copytree(FIXTURES / "llama_gqa_llama3rope", folder)
  vocab = {f"<t{i}>": i for i in range(128)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<t0>"))
  tok.save(str(folder / "tokenizer.json"))
  (folder / "generation_config.json").write_text(
      json.dumps({"eos_token_id": [2, EXTRA_EOS]}))
  return load_hf(folder)


@pytest.fixture(scope="module")
def engine(base):
  return Engine(base, FOLDERS, EngineConfig(**SHAPES))


def test_eos_ids_come_from_config_and_generation_config(base):
  assert base.tokenizer.eos_id == 2
  assert base.tokenizer.eos_ids == (2, EXTRA_EOS)


def test_peft_folders_serve_like_peft_generate(engine):
  reqs = [dict(prompt=[int(t) for t in p], adapter=n, max_new_tokens=8,
               ignore_eos=True)
          for p, n in zip(EXPECTED["prompt_ids"], NAMES)]
  for r, want in zip(engine.generate(reqs), EXPECTED["generated_ids"]):
    assert r.error is None, r.error
    assert r.tokens == [int(t) for t in want], r.adapter


def test_every_eos_id_stops_generation(engine):
  prompt = [int(t) for t in EXPECTED["prompt_ids"][0]]
  r = engine.generate([dict(prompt=prompt, max_new_tokens=8)])[0]
  assert r.tokens == [EXTRA_EOS] and r.finish_reason == "stop"


def test_prompt_logprobs_equal_peft_logits(engine):
  k = 3
  reqs = [dict(prompt=[int(t) for t in toks], adapter=n, max_new_tokens=1,
               prompt_logprobs=k, ignore_eos=True)
          for toks, n in zip(EXPECTED["tokens"], NAMES)]
  for r, toks, logits in zip(engine.generate(reqs), EXPECTED["tokens"],
                             EXPECTED["logits"]):
    want = _log_softmax(logits)  # [T, V]: position t predicts token t + 1
    assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None
    got = np.array(r.prompt_logprobs[1:])
    np.testing.assert_allclose(
        got, want[np.arange(len(toks) - 1), toks[1:]], atol=1e-4, rtol=0)
    for t, top in enumerate(r.prompt_top_logprobs[1:]):
      ids = [i for i, _ in top]
      assert ids == list(np.argsort(-want[t])[:k])
      np.testing.assert_allclose([lp for _, lp in top], want[t][ids],
                                 atol=1e-4, rtol=0)


def test_top_logprobs_of_generated_tokens(engine):
  """First position against PEFT's logits; decode positions against the
  engine's prompt scoring of the same continuation (two code paths)."""
  toks, logits = EXPECTED["tokens"][2], EXPECTED["logits"][2]
  prompt = [int(t) for t in toks[:5]]
  r, plain = engine.generate([
      dict(prompt=prompt, adapter="a2", max_new_tokens=6, top_logprobs=5,
           ignore_eos=True),
      dict(prompt=prompt, adapter="a2", max_new_tokens=6, ignore_eos=True)])
  assert plain.top_logprobs is None and plain.tokens == r.tokens
  assert len(r.top_logprobs) == len(r.tokens) == 6
  for tok, lp, top in zip(r.tokens, r.logprobs, r.top_logprobs):
    assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5  # greedy
    assert [x for _, x in top] == sorted([x for _, x in top], reverse=True)
  want = _log_softmax(logits[4])
  assert [i for i, _ in r.top_logprobs[0]] == list(np.argsort(-want)[:5])
  np.testing.assert_allclose([x for _, x in r.top_logprobs[0]],
                             np.sort(want)[::-1][:5], atol=1e-4, rtol=0)
  again = engine.generate([dict(
      prompt=prompt + r.tokens, adapter="a2", max_new_tokens=1,
      prompt_logprobs=5, ignore_eos=True)])[0]
  # prompt_top_logprobs[j]: the distribution of token j given tokens < j.
  for j, top in enumerate(r.top_logprobs[1:], start=len(prompt) + 1):
    scored = again.prompt_top_logprobs[j]
    assert [i for i, _ in top] == [i for i, _ in scored]
    np.testing.assert_allclose([x for _, x in top], [x for _, x in scored],
                               atol=1e-4, rtol=0)


def test_bank_is_sized_from_the_folders(engine):
  assert engine.config.max_rank == 8  # a2's rank (a1 has 4)
  assert set(engine.config.targets) == {"q", "k", "v", "o", "gate", "up",
                                        "down"}


def test_a_config_that_cannot_hold_the_adapters_is_refused_up_front(
    base, tmp_path):
  with pytest.raises(ValueError, match=r"\['a2'\] have rank up to 8.*"
                     r"max_rank=4; set max_rank=8"):
    Engine(base, FOLDERS, EngineConfig(**SHAPES, max_rank=4), warmup=False)
  reg = Registry.open(str(tmp_path / "reg"))
  peft_io.import_peft(reg, base, *FOLDERS.values())
  with pytest.raises(ValueError, match=r"adapt \['down', 'gate', 'k', 'o', "
                     r"'up'\].*set targets="):
    Engine(base, reg, EngineConfig(**SHAPES, targets=("q", "v")),
           warmup=False)
  # Serving only a1 (rank 4 on q, v): sized and accepted.
  eng = Engine(base, reg, EngineConfig(**SHAPES), warmup=False, refs=["a1"])
  assert (eng.config.max_rank, eng.config.targets) == (4, ("q", "v"))
  Engine(base, reg, EngineConfig(**SHAPES, max_rank=4, targets=("q", "v")),
         warmup=False, refs=["a1"])
  reg.close()


def test_import_peft_takes_the_base_and_imports_all_or_nothing(
    base, tmp_path):
  reg = Registry.open(str(tmp_path / "reg"))
  bad = tmp_path / "bad"
  shutil.copytree(PEFT / "a1", bad)
  cfg = json.loads((bad / peft_io.CONFIG_FILE).read_text())
  (bad / peft_io.CONFIG_FILE).write_text(json.dumps(dict(cfg, r=3)))
  with pytest.raises(InvalidAdapterError, match="rank 4.*says 3"):
    peft_io.import_peft(reg, base, FOLDERS["a1"], str(bad))
  assert reg.list_adapters() == []
  revs = peft_io.import_peft(reg, base, *FOLDERS.values(), owner="me")
  assert [r.ref for r in revs] == ["a1@1", "a2@1"]
  assert revs[1].provenance["source"]["path"] == FOLDERS["a2"]
  # Loaded weights equal read_peft's (scales folded in both).
  w = reg.load("a2").weights
  folded = peft_io.read_peft(FOLDERS["a2"], config=base.config).weights
  raw = peft_io.read_peft_raw(FOLDERS["a2"], config=base.config)[1]
  np.testing.assert_array_equal(w.lora_b["down"], folded.lora_b["down"])
  assert not np.array_equal(folded.lora_b["down"], raw.lora_b["down"])
  reg.close()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_have_ordinary_permissions(base, tmp_path, umask,
                                                  mode):
  reg = Registry.open(str(tmp_path / "reg"))
  peft_io.import_peft(reg, base, FOLDERS["a1"])
  old = os.umask(umask)
  try:
    peft_io.export_peft(reg, "a1", str(tmp_path / "out"))
  finally:
    os.umask(old)
  for name in (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE):
    assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == mode, name
  reg.close()


def test_a_bad_generation_config_is_one_clear_error(tmp_path):
  folder = tmp_path / "llama"
  shutil.copytree(FIXTURES / "llama_gqa_llama3rope", folder)
  tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<t0>": 0}, "<t0>")).save(str(folder / "tokenizer.json"))
  (folder / "generation_config.json").write_text('{"eos_token_id": "x"}')
  with pytest.raises(CheckpointError, match="generation_config.json: "
                     "eos_token_id must be"):
    load_hf(folder)


def test_save_hf_keeps_every_eos_id_and_ordinary_permissions(base, tmp_path):
  old = os.umask(0o022)
  try:
    save_hf(base, tmp_path / "out", max_shard_bytes=20_000)
  finally:
    os.umask(old)
  files = sorted((tmp_path / "out").glob("*.safetensors"))
  assert len(files) > 1
  for f in files:
    assert os.stat(f).st_mode & 0o777 == 0o644, f.name
  assert load_hf(tmp_path / "out").tokenizer.eos_ids == (2, EXTRA_EOS)
