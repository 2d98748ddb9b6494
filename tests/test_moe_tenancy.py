"""Multi-tenant training and serving on MoE bases, with nothing special-cased.

The dense-base guarantees, re-proved on tiny mixture-of-experts bases (a
Qwen3-MoE-style one with a dense layer among MoE layers, and a
DeepSeek-V3-style one with MLA, a shared expert and group-limited sigmoid
routing):

- training: slots absent from every batch (and the null slot 0) are
  bit-identical after many steps, optimizer state included; the router's
  load per expert is reported;
- serving: the Engine's outputs in mixed batches under slot churn equal the
  same request alone and the plain model's greedy reference, and nothing
  compiles after warm-up.

Carries the `moe` marker (`make test-moe`): it compiles a train step and an
Engine per base.
"""

import jax
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.serve import steps as steps_lib
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step

pytestmark = pytest.mark.moe

_COMMON = dict(vocab_size=259, hidden_size=32, intermediate_size=48,
               num_layers=3, num_heads=4, num_experts=8,
               moe_intermediate_size=16)
QWEN3_MOE = ModelConfig(architecture="qwen3_moe", num_kv_heads=2, head_dim=8,
                        qk_norm=True, num_experts_per_tok=2,
                        norm_topk_prob=True, moe_layers=(0, 2), **_COMMON)
DEEPSEEK = ModelConfig(
    architecture="deepseek_v3", num_kv_heads=4, head_dim=8,
    num_experts_per_tok=3, router_scoring="sigmoid", n_shared_experts=1,
    n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    moe_layers=(1, 2), q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, rope_interleave=True, **_COMMON)
# Attention, and the dense layers' MLP; routed experts are P15c's bank.
TARGETS = {QWEN3_MOE: ("q", "v", "o", "down"), DEEPSEEK: ("o", "gate", "down")}
CONFIGS = [pytest.param(QWEN3_MOE, id="qwen3_moe"),
           pytest.param(DEEPSEEK, id="deepseek_v3")]


def _host(tree):
  return jax.tree.map(np.array, tree)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_untouched_slots_bit_identical_and_router_load_reported(cfg):
  base = random_base(cfg, seed=0, std=0.1)
  spec = AdapterSpec(targets=TARGETS[cfg], max_rank=4, num_slots=5)
  ws = {s: AdapterWeights.random(cfg, spec.targets, rank=2 + s % 3,
                                 seed=s) for s in range(1, 5)}
  bank = bank_lib.bank_from_weights(cfg, spec, ws)
  opt_cfg = opt_lib.OptimizerConfig(learning_rate=1e-2, slot_sweep="present")
  step = make_train_step(cfg, spec, opt_cfg,
                         sharding.make_mesh(data=2, fsdp=4),
                         StepConfig(lora_impl="gather"))
  opt = opt_lib.init_opt_state(bank)
  before_bank, before_opt = _host(bank), _host(opt)
  rng = np.random.default_rng(0)
  for _ in range(20):
    slots = rng.choice([0, 1, 2, 4], size=8)  # slot 3 never trains
    batch = Batch.from_token_rows(rng.integers(3, 259, (8, 11)), slots)
    bank, opt, metrics = step(base.params, bank, opt, batch)
  after_bank, after_opt = _host(bank), _host(opt)
  for k in (0, 3):
    for t in spec.targets:
      np.testing.assert_array_equal(after_bank.lora_a[t][k],
                                    before_bank.lora_a[t][k])
      np.testing.assert_array_equal(after_bank.lora_b[t][k],
                                    before_bank.lora_b[t][k])
    jax.tree.map(lambda x, y, k=k: np.testing.assert_array_equal(x[k], y[k]),
                 after_opt, before_opt)
  assert not np.array_equal(after_bank.lora_a["o"][1],
                            before_bank.lora_a["o"][1])
  assert np.isfinite(float(metrics["loss"]))
  load = np.asarray(metrics["router_load_le"])
  assert load.shape == (cfg.num_layers, cfg.num_experts)
  for layer in range(cfg.num_layers):
    want = 1.0 if cfg.is_moe_layer(layer) else 0.0
    assert load[layer].sum() == pytest.approx(want, abs=1e-5)


def _reference_greedy(base, cfg, spec, weights, prompt, n):
  """Plain model, no cache: the whole sequence recomputed for each token."""
  bank = bank_lib.bank_from_weights(cfg, spec, {1: weights} if weights else {})
  idx = np.array([1 if weights else 0], np.int32)
  seq = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, 48), np.int32)
    padded[0, :len(seq)] = seq
    logits = llama.jit_forward(base.params, bank, idx, padded, config=cfg)
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_engine_mixed_batches_under_churn_equal_alone_and_reference(cfg):
  base = random_base(cfg, seed=0, std=0.3)  # peaked logits: no near-ties
  targets = TARGETS[cfg]
  weights = {i: AdapterWeights.random(cfg, targets, rank=2 + i % 3,
                                      seed=100 + i, std=0.3)
             for i in range(12)}
  source = InMemoryAdapters()
  for i, w in weights.items():
    source.publish(f"user{i}", w, base.fingerprint)
  engine = Engine(base, source, EngineConfig(
      num_slots=4, max_batch=6, max_len=48, steps_per_call=4,
      prefill_batch=3, min_bucket=16, max_rank=4))
  rng = np.random.default_rng(1)
  reqs = []
  for i in range(30):
    a = int(rng.integers(-1, len(weights)))
    prompt = [int(t) for t in rng.integers(3, 259, rng.integers(2, 20))]
    reqs.append(GenerationRequest(
        prompt=tuple(prompt), adapter=None if a < 0 else f"user{a}",
        sampling=SamplingParams(max_new_tokens=int(rng.integers(1, 7)),
                                ignore_eos=True)))
  compiles = steps_lib.backend_compiles()
  batched = engine.generate(reqs)
  assert steps_lib.backend_compiles() == compiles  # adapters are data
  assert engine.compilations_since_warmup() == 0
  assert engine.stats()["residency"]["device"]["evictions"] > 0  # churned
  for req, got in zip(reqs, batched):
    alone = engine.generate([req])[0]
    assert got.error is None and got.tokens == alone.tokens, req
  assert steps_lib.backend_compiles() == compiles
  spec = AdapterSpec(targets=targets, max_rank=4, num_slots=2)
  for req, got in list(zip(reqs, batched))[:6]:  # vs the cache-free model
    w = None if req.adapter is None else weights[int(req.adapter[4:])]
    assert list(got.tokens) == _reference_greedy(
        base, cfg, spec, w, req.prompt, req.sampling.max_new_tokens)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_on_an_expert_mesh_equals_unsharded(cfg):
  """Under mesh rules with an `expert` axis the decoder runs its experts
  expert-parallel (shard_map, token exchange by collectives); logits and
  router stats equal the single-device forward."""
  base = random_base(cfg, seed=2, std=0.3)
  spec = AdapterSpec(targets=TARGETS[cfg], max_rank=4, num_slots=3)
  bank = bank_lib.bank_from_weights(cfg, spec, {
      s: AdapterWeights.random(cfg, spec.targets, rank=3, seed=s, std=0.3)
      for s in (1, 2)})
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, 259, (4, 8)).astype(np.int32)
  idx = np.array([0, 1, 2, 1], np.int32)

  def run(params, bank, idx, tokens):
    logits, _, stats = llama.forward(params, bank, idx, tokens, config=cfg,
                                     lora_impl="gather",
                                     return_router_stats=True)
    return logits, stats

  want = jax.jit(run)(base.params, bank, idx, tokens)
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=1, expert=4)

  def run_on_mesh(*args):
    with sharding.use_mesh_rules(mesh):
      return run(*args)

  params = sharding.shard_tree(base.params, llama.param_logical_axes(cfg),
                               mesh)
  lowered = jax.jit(run_on_mesh).lower(params, bank, idx, tokens)
  # Really expert-parallel: the token exchange's psum_scatter (absent when
  # the experts run replicated, checked by planting that).
  assert "reduce-scatter" in lowered.compile().as_text()
  got = jax.jit(run_on_mesh)(params, bank, idx, tokens)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(got[1]["tokens_e"]),
                                np.asarray(want[1]["tokens_e"]))
