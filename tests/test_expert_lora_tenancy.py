"""Expert LoRA in training, serving and expert parallelism (the dense-base
guarantees, with the bank's expert axis).

On a tiny Qwen3-MoE (a dense layer among MoE layers) and a tiny DeepSeek-V3
(MLA, a shared expert, group-limited sigmoid routing), with adapters on
attention (MLA's q_a/q_b/kv_a/kv_b/o), shared experts and routed experts:

- training: slots absent from every batch (and slot 0) stay bit-identical,
  optimizer state included, while a trained slot's expert factors move;
- serving: the Engine's mixed batches under slot churn equal each request
  alone and the cache-free model, with no compiles after warm-up;
- expert parallelism: the expert LoRA hook gets each token's slot through
  the token exchange (`adapter_rows`), and the sharded forward equals the
  single-device one.

`moe` marker (`make test-moe`): compiles a train step and an Engine per base.
"""

import jax
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterWeights, BankSpec
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.serve import steps as steps_lib
from mintjax.serve.engine import Engine, EngineConfig, GenerationRequest
from mintjax.serve.residency import InMemoryAdapters
from mintjax.serve.sampling import SamplingParams
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step
from tests.test_moe_tenancy import DEEPSEEK, QWEN3_MOE

pytestmark = pytest.mark.moe

EXPERTS = ("experts_gate_up", "experts_down")
TARGETS = {QWEN3_MOE: ("q", "o", "down") + EXPERTS,
           DEEPSEEK: ("q_a", "kv_b", "o", "shared_up", "shared_down")
           + EXPERTS}
CONFIGS = [pytest.param(QWEN3_MOE, id="qwen3_moe"),
           pytest.param(DEEPSEEK, id="deepseek_v3")]


def _host(tree):
  return jax.tree.map(np.array, tree)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_training_keeps_absent_slots_bit_identical(cfg):
  base = random_base(cfg, seed=0, std=0.1)
  spec = BankSpec(targets=TARGETS[cfg], max_rank=4, num_slots=4)
  ws = {s: AdapterWeights.random(cfg, spec.targets, rank=2 + s % 2, seed=s)
        for s in range(1, 4)}
  bank = bank_lib.bank_from_weights(cfg, spec, ws)
  opt_cfg = opt_lib.OptimizerConfig(learning_rate=1e-2, slot_sweep="present")
  step = make_train_step(cfg, spec, opt_cfg, sharding.make_mesh(data=2,
                                                                fsdp=4),
                         StepConfig(lora_impl="gather"))
  opt = opt_lib.init_opt_state(bank)
  before_bank, before_opt = _host(bank), _host(opt)
  rng = np.random.default_rng(0)
  for _ in range(8):
    slots = rng.choice([0, 1, 2], size=8)  # slot 3 never trains
    batch = Batch.from_token_rows(rng.integers(3, 259, (8, 11)), slots)
    bank, opt, _ = step(base.params, bank, opt, batch)
  after_bank, after_opt = _host(bank), _host(opt)
  for k in (0, 3):
    for t in spec.targets:
      np.testing.assert_array_equal(after_bank.lora_a[t][k],
                                    before_bank.lora_a[t][k])
      np.testing.assert_array_equal(after_bank.lora_b[t][k],
                                    before_bank.lora_b[t][k])
    jax.tree.map(lambda x, y, k=k: np.testing.assert_array_equal(x[k], y[k]),
                 after_opt, before_opt)
  for t in EXPERTS:
    assert not np.array_equal(after_bank.lora_b[t][1],
                              before_bank.lora_b[t][1]), t
    # Padding past slot 2's true rank (3 < 4) stays exactly zero.
    assert not np.any(after_bank.lora_a[t][2][..., 3:])


def _reference_greedy(base, cfg, spec, weights, prompt, n):
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
def test_engine_mixed_batches_equal_alone_and_reference(cfg):
  base = random_base(cfg, seed=0, std=0.3)
  targets = TARGETS[cfg]
  weights = {i: AdapterWeights.random(cfg, targets, rank=2 + i % 3,
                                      seed=100 + i, std=0.3)
             for i in range(8)}
  source = InMemoryAdapters()
  for i, w in weights.items():
    source.publish(f"user{i}", w, base.fingerprint)
  # Sized from the adapters, the bank keeps the MoE/MLA targets.
  sized = EngineConfig(num_slots=4).sized_for(source)
  assert sized.targets == BankSpec(targets=targets).targets
  engine = Engine(base, source, EngineConfig(
      num_slots=4, max_batch=6, max_len=48, steps_per_call=4,
      prefill_batch=3, min_bucket=16, max_rank=4, targets=targets))
  rng = np.random.default_rng(1)
  reqs = []
  for _ in range(16):
    a = int(rng.integers(-1, len(weights)))
    prompt = [int(t) for t in rng.integers(3, 259, rng.integers(2, 20))]
    reqs.append(GenerationRequest(
        prompt=tuple(prompt), adapter=None if a < 0 else f"user{a}",
        sampling=SamplingParams(max_new_tokens=int(rng.integers(1, 6)),
                                ignore_eos=True)))
  compiles = steps_lib.backend_compiles()
  batched = engine.generate(reqs)
  assert steps_lib.backend_compiles() == compiles  # adapters are data
  assert engine.stats()["residency"]["device"]["evictions"] > 0
  for req, got in zip(reqs, batched):
    alone = engine.generate([req])[0]
    assert got.error is None and got.tokens == alone.tokens, req
  assert steps_lib.backend_compiles() == compiles
  spec = BankSpec(targets=targets, max_rank=4, num_slots=2)
  for req, got in list(zip(reqs, batched))[:4]:
    w = None if req.adapter is None else weights[int(req.adapter[4:])]
    assert list(got.tokens) == _reference_greedy(
        base, cfg, spec, w, req.prompt, req.sampling.max_new_tokens)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_expert_lora_on_an_expert_mesh_equals_unsharded(cfg):
  base = random_base(cfg, seed=2, std=0.3)
  spec = BankSpec(targets=TARGETS[cfg], max_rank=4, num_slots=3)
  bank = bank_lib.bank_from_weights(cfg, spec, {
      s: AdapterWeights.random(cfg, spec.targets, rank=3, seed=s, std=0.3)
      for s in (1, 2)})
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, 259, (4, 8)).astype(np.int32)
  idx = np.array([0, 1, 2, 1], np.int32)

  def run(params, bank, idx, tokens):
    return llama.forward(params, bank, idx, tokens, config=cfg,
                         lora_impl="gather")[0]

  want = jax.jit(run)(base.params, bank, idx, tokens)
  no_experts = jax.jit(run)(base.params, bank.replace(lora_b={
      t: (x * 0 if t in EXPERTS else x) for t, x in bank.lora_b.items()}),
                            idx, tokens)
  assert float(np.abs(np.asarray(want) - np.asarray(no_experts)).max()) > 1e-2
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=1, expert=4)

  def run_on_mesh(*args):
    with sharding.use_mesh_rules(mesh):
      return run(*args)

  params = sharding.shard_tree(base.params, llama.param_logical_axes(cfg),
                               mesh)
  got = jax.jit(run_on_mesh)(params, bank, idx, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4,
                             rtol=1e-4)
