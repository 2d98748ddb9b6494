"""Engine greedy decoding equals transformers + PEFT `generate(adapter_names=)`.

Fixtures: tests/fixtures/parity/peft_llama (see its README): two PEFT LoRA
adapters on the llama_gqa_llama3rope base, imported through the registry;
one mixed batch (base, a1, a2) decoded greedily for 8 tokens.
"""

import pathlib

import numpy as np

from mintjax.model.hf import load_hf
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.store.peft_io import import_peft_folder
from mintjax.store.registry import Registry

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"


def test_mixed_batch_greedy_matches_peft_generate(tmp_path):
  base = load_hf(FIXTURES / "llama_gqa_llama3rope")
  reg = Registry.open(tmp_path / "reg")
  for name in ("a1", "a2"):
    import_peft_folder(reg, str(FIXTURES / "peft_llama" / name), name,
                       base_fingerprint=base.fingerprint,
                       num_layers=base.config.num_layers)
  expected = np.load(FIXTURES / "peft_llama" / "expected.npz")
  names = [str(n) for n in expected["adapter_names"]]
  eng = Engine(base, reg, EngineConfig(
      num_slots=2, max_batch=4, max_len=32, steps_per_call=4,
      prefill_batch=2, min_bucket=8, max_rank=8))
  reqs = [dict(prompt=[int(t) for t in p],
               adapter=None if n == "__base__" else n, max_new_tokens=8,
               ignore_eos=True)
          for p, n in zip(expected["prompt_ids"], names)]
  out = eng.generate(reqs)
  for r, want, n in zip(out, expected["generated_ids"], names):
    assert r.error is None, r.error
    assert r.tokens == [int(t) for t in want], n
