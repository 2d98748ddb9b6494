"""Deviceless TPU compiles of the grouped matmul and expert parallelism
(`make test-tpu`).

The real TPU compiler (libtpu, Mosaic included) on this CPU host: the
megablox kernel's forward and backward at Qwen3-30B-A3B and DeepSeek-V3
expert widths on one v5p chip, and the expert-parallel FFN (shard_map,
all-gather + reduce-scatter) with the kernel inside on an 8-chip v5p mesh.
Needs `make tpu-venv`; skipped where libtpu is not installed.
"""

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

pytestmark = pytest.mark.tpu
pytest.importorskip("libtpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from mintjax import sharding  # noqa: E402
from mintjax.model import expert_parallel as ep  # noqa: E402
from pallas_kernels import gmm  # noqa: E402


@pytest.fixture(scope="module")
def v5p_8():
  return topologies.get_topology_desc(topology_name="v5p:2x2x2",
                                      platform="tpu").devices


def _abstract(shape, dtype, sh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


# (rows M, D, F, local experts): Qwen3-30B-A3B (128 experts / 8 devices,
# 768-wide experts) and DeepSeek-V3 (256 / 64, 2048-wide) with an M that is
# not a row-tile multiple.
@pytest.mark.parametrize("m,d,f,e", [(8192, 2048, 768, 16),
                                     (3000, 7168, 2048, 4)],
                         ids=["qwen3-30b-a3b", "deepseek-v3"])
def test_gmm_fwd_bwd_compiles_for_v5p(v5p_8, m, d, f, e):
  one = NamedSharding(Mesh(v5p_8[:1], ("x",)), P())
  x = _abstract((m, d), jnp.bfloat16, one)
  w = _abstract((e, d, f), jnp.bfloat16, one)
  sizes = _abstract((e + 1,), jnp.int32, one)

  def loss(x, w, sizes):
    y = gmm.grouped_matmul(x, w, sizes, group_offset=0, impl="pallas")
    return jnp.sum(y.astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
      x, w, sizes).lower().compile()
  text = compiled.as_text()
  assert "tpu_custom_call" in text or "gmm" in text
  assert compiled.memory_analysis() is not None


def test_expert_parallel_ffn_compiles_on_a_v5p_mesh(v5p_8):
  # 8 chips: expert 4 x tensor 2; the Mosaic kernel runs inside shard_map.
  mesh = sharding.make_mesh(data=1, fsdp=1, expert=4, tensor=2,
                            devices=v5p_8)
  t, d, f, e, k = 4096, 2048, 768, 128, 8
  specs = ep.expert_param_specs(mesh, f)
  params = {n: _abstract(shape, jnp.bfloat16, NamedSharding(mesh, specs[n]))
            for n, shape in (("gate", (e, d, f)), ("up", (e, d, f)),
                             ("down", (e, f, d)))}
  rows = NamedSharding(mesh, P(ep.token_axes(mesh)))
  x = _abstract((t, d), jnp.bfloat16, rows)
  ids = _abstract((t, k), jnp.int32, rows)
  w = _abstract((t, k), jnp.float32, rows)
  fn = functools.partial(ep.experts_ffn_sharded, mesh=mesh, impl="pallas")

  def loss(x, params, ids, w):
    return jnp.sum(fn(x, params, ids, w).astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
      x, params, ids, w).lower().compile()
  text = compiled.as_text()
  assert "all-gather" in text and "reduce-scatter" in text
  assert "tpu_custom_call" in text
