"""GPU gather-LoRA kernels (BGMV, grouped) in interpret mode against the oracle.

These run the Triton-targeted kernels through Pallas' generic interpreter on
CPU: they check the math, the visit list and the masked stores, not Triton
lowering. The real compile and check is `tools/device_check.sh` on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import assert_close, make_bank, make_slots, make_x
from pallas_kernels import gpu, ops
from pallas_kernels.reference import reference_tokens


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pattern", ["mixed_base", "own_slot", "slot0"])
def test_bgmv_forward(pattern, dtype):
  ranks = [0, 1, 4, 16, 16, 7, 16, 16]
  a, b, scale, _ = make_bank(0, 8, 32, 16, 48, ranks, dtype)
  x = make_x(0, 13, 32, dtype)
  slot = make_slots(pattern, 13, 8)
  y = gpu.bgmv(x, a, b, scale, slot, block_k=16, block_n=16, interpret=True)
  assert y.dtype == dtype
  assert_close(y, reference_tokens(x, a, b, scale, slot), dtype)


@pytest.mark.parametrize("rank", [8, 16, 12])  # 12: padded to 16 inside
@pytest.mark.parametrize("pattern", ["random", "one_slot", "own_slot"])
def test_grouped_forward(pattern, rank):
  a, b, scale, _ = make_bank(1, 9, 32, rank, 32)
  x = make_x(1, 37, 32)  # 37 tokens: not a multiple of the 16-row tile
  slot = make_slots(pattern, 37, 9, seed=1)
  y = gpu.grouped_lora(x, a, b, scale, slot, tile_rows=16, block_k=16,
                       block_n=16, interpret=True)
  assert_close(y, reference_tokens(x, a, b, scale, slot), jnp.float32)


def test_grouped_transposed_is_dx():
  a, b, scale, _ = make_bank(2, 5, 32, 16, 48)
  dy = make_x(2, 21, 48)
  slot = make_slots("mixed_base", 21, 5, seed=2)
  got = gpu.grouped_lora(dy, b, a, scale, slot, tile_rows=16,
                         transpose=True, interpret=True)
  # dx of sum(y * dy) is dy @ (scale * A B)^T per token.
  _, vjp = jax.vjp(lambda x: reference_tokens(x, a, b, scale, slot),
                   make_x(3, 21, 32))
  assert_close(got, vjp(dy)[0], jnp.float32)


@pytest.mark.parametrize("num_tokens", [12, 300])  # bgmv path, grouped path
def test_gpu_lora_gradients(num_tokens):
  a, b, scale, _ = make_bank(4, 6, 16, 16, 16, [0, 16, 3, 16, 16, 8])
  x = make_x(4, num_tokens, 16)
  slot = make_slots("mixed_base", num_tokens, 6, seed=4)
  dy = make_x(5, num_tokens, 16)
  f = lambda *args: ops.gpu_lora(*args, tile_rows=16, interpret="generic")
  y = f(x, a, b, scale, slot)
  assert_close(y, reference_tokens(x, a, b, scale, slot), jnp.float32)

  def grads(fn):
    loss = lambda *args: jnp.sum(fn(*args, slot) * dy)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, scale)

  for g, w in zip(grads(f), grads(reference_tokens)):
    assert_close(g, w, jnp.float32)


def test_dims_not_divisible_by_16_are_refused():
  a, b, scale, _ = make_bank(0, 3, 24, 8, 16)
  with pytest.raises(ValueError, match="divisible by 16"):
    gpu.bgmv(make_x(0, 4, 24), a, b, scale, jnp.ones((4,), jnp.int32),
             interpret=True)
