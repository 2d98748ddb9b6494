"""On-device sampler: greedy, top-k / top-p filtering, seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax.serve import sampling as S


def _rows(b, **kw):
  rows = S.empty_rows(b)
  for i in range(b):
    S.set_row(rows, i, S.SamplingParams(**kw), ())
  return rows


LOGITS = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, 50)),
                     jnp.float32)
POS = jnp.arange(4, dtype=jnp.int32)


def test_greedy_is_argmax_with_model_logprob():
  tok, lp = jax.jit(S.sample)(LOGITS, _rows(4), POS)
  np.testing.assert_array_equal(tok, np.argmax(LOGITS, -1))
  want = jax.nn.log_softmax(LOGITS)[np.arange(4), np.argmax(LOGITS, -1)]
  np.testing.assert_allclose(lp, want, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_tightest_filters_reduce_to_greedy(kw):
  tok, _ = jax.jit(S.sample)(LOGITS, _rows(4, temperature=1.5, **kw), POS)
  np.testing.assert_array_equal(tok, np.argmax(LOGITS, -1))


def test_top_k_samples_stay_in_the_top_k():
  rows = _rows(4, temperature=5.0, top_k=3)
  top3 = np.argsort(-np.asarray(LOGITS), -1)[:, :3]
  for p in range(30):
    tok, _ = jax.jit(S.sample)(LOGITS, rows, POS + p)
    assert all(int(t) in top3[i] for i, t in enumerate(tok))


def test_same_seed_same_tokens_different_seed_differs():
  a = [int(jax.jit(S.sample)(LOGITS, _rows(4, temperature=3.0, seed=1),
                             POS + p)[0][0]) for p in range(20)]
  b = [int(jax.jit(S.sample)(LOGITS, _rows(4, temperature=3.0, seed=1),
                             POS + p)[0][0]) for p in range(20)]
  c = [int(jax.jit(S.sample)(LOGITS, _rows(4, temperature=3.0, seed=2),
                             POS + p)[0][0]) for p in range(20)]
  assert a == b and a != c


def test_invalid_parameters_say_what_is_expected():
  for kw, word in ((dict(max_new_tokens=0), "max_new_tokens"),
                   (dict(temperature=float("nan")), "temperature"),
                   (dict(top_p=1.5), "top_p"),
                   (dict(stop=[""]), "stop"),
                   (dict(stop_token_ids=list(range(9))), "at most")):
    with pytest.raises(S.SamplingError, match=word):
      S.SamplingParams(**kw)
  with pytest.raises(S.SamplingError, match="outside the vocabulary"):
    S.SamplingParams(stop_token_ids=(500,)).stop_ids(2, 259)
  with pytest.raises(S.SamplingError, match="unknown sampling"):
    S.SamplingParams.from_dict({"temp": 1.0})
