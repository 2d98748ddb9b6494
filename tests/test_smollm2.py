"""The real embedded SmolLM2-135M GGUF: logits and greedy text vs transformers.

Loads the 98 MB file once per module (~6 s) and compiles one forward shape;
greedy decoding re-runs the full (right-padded) sequence each step, which
the causal mask makes exact, so no KV cache code is involved here.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax.model import llama, smollm2

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
SMOL = json.loads((FIXTURES / "smollm2_greedy.json").read_text())
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base():
  return smollm2.load_smollm2()


@pytest.fixture(scope="module")
def greedy_run(base):
  """Greedy 8-token continuations of all recorded prompts in one batch."""
  prompts = [g["prompt_ids"] for g in SMOL["greedy"]]
  width = max(map(len, prompts)) + NEW_TOKENS
  buf = np.full((len(prompts), width), base.tokenizer.pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts])
  fwd = jax.jit(functools.partial(llama.jit_forward, bank=None,
                                  adapter_idx_b=None, config=base.config))
  first_logits = None
  for step in range(NEW_TOKENS):
    logits = np.asarray(fwd(base.params, tokens_bt=jnp.asarray(buf)))
    last = logits[np.arange(len(prompts)), lengths + step - 1]
    if step == 0:
      first_logits = last
    buf[np.arange(len(prompts)), lengths + step] = last.argmax(-1)
  generated = [buf[i, n:n + NEW_TOKENS].tolist()
               for i, n in enumerate(lengths)]
  return generated, first_logits


def test_config_matches_published_shape(base):
  c = base.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
          c.vocab_size) == (30, 576, 9, 3, 49152)
  assert c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
  assert c.tie_word_embeddings and "lm_head" not in base.params
  assert c.num_params() == 134_515_008
  assert base.fingerprint.startswith("sha256:")


def test_prompt_ids_match_transformers(base):
  for g in SMOL["greedy"]:
    assert base.tokenizer.encode(g["prompt"]) == g["prompt_ids"]


def test_last_logits_match_transformers(greedy_run):
  _, first_logits = greedy_run
  for g, row in zip(SMOL["greedy"], first_logits):
    top = np.argsort(-row)[:10]
    assert top.tolist() == g["last_top10_ids"]
    np.testing.assert_allclose(row[top], g["last_top10_logits"], atol=2e-3,
                               rtol=0)


def test_greedy_continuation_matches_transformers(base, greedy_run):
  generated, _ = greedy_run
  for g, ids in zip(SMOL["greedy"], generated):
    assert ids == g["generated_ids"], g["prompt"]
    assert base.tokenizer.decode(ids) == g["generated_text"]
  assert base.tokenizer.decode(generated[0]).startswith(" Paris")
