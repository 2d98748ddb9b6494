"""The Tinker per-token losses (mintjax.train.losses) against numpy.

Cheap (no model): runs in the default suite. The service itself, with the
official SDK, is tested in tests/test_tinker.py (`make test-tinker`).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mintjax.train import losses


def _reference(kind, logp, w, adv, q, lo, hi):
  ratio = np.exp(logp - q)
  if kind == "cross_entropy":
    return -w * logp
  if kind == "importance_sampling":
    return -ratio * adv
  return -np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv)


@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
def test_token_losses_match_their_definitions(kind):
  rng = np.random.default_rng(0)
  shape = (3, 5)
  logp = -rng.random(shape).astype(np.float32) * 3
  q = logp + rng.normal(0, 0.5, shape).astype(np.float32)  # ratios ~ e^±0.5
  w, adv = rng.random(shape).astype(np.float32), rng.normal(
      0, 1, shape).astype(np.float32)
  lo, hi = np.full(shape, 0.8, np.float32), np.full(shape, 1.2, np.float32)
  got = losses.token_losses(
      jnp.asarray(logp), kind_b=jnp.full((3,), losses.loss_code(kind)),
      weights_bt=w, advantages_bt=adv, sampling_logprobs_bt=q,
      clip_low_bt=lo, clip_high_bt=hi)
  want = _reference(kind, logp, w, adv, q, lo, hi)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_rows_pick_their_own_loss():
  logp = jnp.full((3, 2), -1.0)
  ones = jnp.ones((3, 2))
  got = losses.token_losses(
      logp, kind_b=jnp.array([0, 1, 2]), weights_bt=2 * ones,
      advantages_bt=ones, sampling_logprobs_bt=jnp.full((3, 2), -1.5),
      clip_low_bt=0.8 * ones, clip_high_bt=1.2 * ones)
  ratio = np.exp(0.5)
  np.testing.assert_allclose(np.asarray(got)[:, 0],
                             [2.0, -ratio, -1.2], rtol=1e-6)


def test_unknown_loss_is_refused_with_the_choices():
  with pytest.raises(ValueError, match="cross_entropy, importance_sampling"):
    losses.loss_code("dro")


def test_target_logprobs_are_log_softmax_at_the_target():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 7)),
                       jnp.float32)
  targets = jnp.array([[0, 3, 6], [1, 1, 2]])
  want = np.take_along_axis(np.asarray(jax_log_softmax(logits)),
                            np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(
      np.asarray(losses.target_logprobs(logits, targets)), want, rtol=1e-6)


def jax_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", ("importance_sampling", "ppo"))
def test_policy_gradient_matches_its_numpy_derivative(kind):
  """d loss / d logp: -r A for importance sampling; PPO the same inside
  the clip range and 0 where the clipped term is the smaller (no push
  past the range)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  shape = (4, 6)
  logp = -rng.random(shape).astype(np.float32) * 3
  q = logp + rng.normal(0, 0.4, shape).astype(np.float32)
  adv = rng.normal(0, 1, shape).astype(np.float32)
  lo, hi = np.full(shape, 0.8, np.float32), np.full(shape, 1.2, np.float32)
  f = lambda lp: losses.token_losses(
      lp, kind_b=jnp.full((4,), losses.loss_code(kind)), weights_bt=0 * lp,
      advantages_bt=adv, sampling_logprobs_bt=q, clip_low_bt=lo,
      clip_high_bt=hi).sum()
  got = np.asarray(jax.grad(f)(jnp.asarray(logp)))
  r = np.exp(logp.astype(np.float64) - q)
  want = -r * adv
  if kind == "ppo":
    clipped_smaller = np.clip(r, 0.8, 1.2) * adv < r * adv
    want = np.where(clipped_smaller, 0.0, want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
