"""Deviceless TPU compiles of the SGMV kernels (`make test-tpu`).

Runs the real TPU compiler (libtpu, Mosaic included) on this CPU host over a
`jax.experimental.topologies` description of a v5e slice: what lowering
alone cannot see (VMEM limits, Mosaic's verifier) fails here. Covers the
forward and the backward (dx, dA, dB) at a representative subset of the
preset widths, ranks and dtypes, and the shard_map'd kernel path of the model
on a tensor-parallel (data 1, fsdp 1, tensor 8) and a data-parallel v5e:2x4
mesh. Needs `make tpu-venv`; skipped where libtpu is not installed.
"""

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernel_cases import abstract_args, value_and_grads

pytestmark = pytest.mark.tpu
pytest.importorskip("libtpu")
# Several libtpu processes (other compiles on this host) may run at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from mintjax import sharding  # noqa: E402
from mintjax.adapters import bank as bank_lib  # noqa: E402
from mintjax.adapters.spec import AdapterSpec  # noqa: E402
from mintjax.config import ModelConfig  # noqa: E402
from mintjax.model import llama  # noqa: E402
from pallas_kernels import ops, sgmv_tpu  # noqa: E402

# (d_in, d_out): the widths that failed before (576, 896, 960 lanes; 4864 and
# 29568 d_in), a common 7-8B width, and the widest (53,248 at
# Llama-3.1-405B), both directions. Rank 1 (bf16) and 128 (f32) bound the
# rank axis; token counts are not tile multiples.
WIDTHS = [(576, 192), (960, 2560), (896, 128), (4864, 896), (4096, 14336),
          (29568, 8192), (16384, 53248), (53248, 16384)]
CASES = [(37, 1, jnp.bfloat16), (300, 128, jnp.float32)]


@pytest.fixture(scope="module")
def v5e_8():
  return topologies.get_topology_desc(topology_name="v5e:2x4",
                                      platform="tpu").devices


def _compile(fn, args):
  return jax.jit(fn).trace(*args).lower().compile()


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"{w[0]}x{w[1]}")
def test_sgmv_fwd_bwd_compiles_for_v5e(v5e_8, width):
  one_chip = NamedSharding(Mesh(v5e_8[:1], ("x",)), P())
  fn = value_and_grads(ops.sgmv_lora)
  for tokens, rank, dtype in CASES:
    args = abstract_args(tokens, *width, rank, dtype, sharding=one_chip)
    compiled = _compile(fn, args)
    assert compiled.memory_analysis() is not None, (tokens, rank, dtype)


def test_decode_rank_16_bf16_compiles(v5e_8):
  one_chip = NamedSharding(Mesh(v5e_8[:1], ("x",)), P())
  args = abstract_args(64, 4096, 14336, 16, jnp.bfloat16, num_slots=1024,
                       sharding=one_chip)
  _compile(ops.sgmv_lora, args)


def test_one_n_block_would_not_fit_vmem(v5e_8, monkeypatch):
  # Guards the N tiling: with an unlimited budget the fused kernel keeps all
  # 53,248 output lanes (rank 128, f32) in VMEM, which v5e refuses.
  monkeypatch.setattr(sgmv_tpu, "VMEM_BUDGET", 2**40)
  one_chip = NamedSharding(Mesh(v5e_8[:1], ("x",)), P())
  args = abstract_args(37, 16384, 53248, 128, jnp.float32, sharding=one_chip)
  with pytest.raises(Exception, match="Vmem"):
    _compile(value_and_grads(ops.sgmv_lora), args)


_CONFIG = ModelConfig(architecture="llama", vocab_size=512, hidden_size=256,
                      intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, dtype="bfloat16")
_SPEC = AdapterSpec(targets=("q", "k", "v", "o", "gate", "up", "down"),
                    max_rank=16, num_slots=8, dtype="float32")


def _abstract(shapes, axes, mesh):
  shardings = sharding.logical_sharding(axes, shapes, mesh)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (8, 1, 1)],
                         ids=["tensor8", "data8"])
def test_model_kernel_path_compiles_on_a_v5e_mesh(v5e_8, mesh_shape):
  # Mosaic kernels cannot be partitioned by XLA; the op shard_maps them.
  # Forward and the adapter gradient of the model, lora_impl="pallas_sgmv".
  mesh = sharding.make_mesh(*mesh_shape, devices=v5e_8)
  params = _abstract(llama.param_shapes(_CONFIG),
                     llama.param_logical_axes(_CONFIG), mesh)
  bank = _abstract(bank_lib.bank_shapes(_CONFIG, _SPEC),
                   bank_lib.bank_logical_axes(_SPEC), mesh)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  idx = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch)
  tokens = jax.ShapeDtypeStruct((16, 64), jnp.int32, sharding=batch)

  def loss(factors, params, bank, idx, tokens):
    logits, _ = llama.forward(params, bank.replace(**factors), idx, tokens,
                              config=_CONFIG, lora_impl="pallas_sgmv",
                              remat=True)
    return jnp.mean(logits)

  factors = dict(lora_a=bank.lora_a, lora_b=bank.lora_b, scale=bank.scale)
  with sharding.use_mesh_rules(mesh):
    compiled = _compile(jax.grad(loss), (factors, params, bank, idx, tokens))
  text = compiled.as_text()
  assert "tpu_custom_call" in text or "sgmv_fused_lora" in text
