"""Every Pallas kernel lowers for its target platform at every real width.

Cross-platform lowering without a device or libtpu: `jax.export` with
platforms=["tpu"] runs the Pallas TPU lowering (Mosaic MLIR, which enforces
the (8, 128) block rule interpret mode never checks), and platforms=["cuda"]
under an abstract H100 mesh runs the Triton lowering. Each case lowers the
forward and the whole backward (dx, dA, dB, dscale) of the differentiable op,
so every kernel of both families is covered, at every distinct (d_in, d_out)
projection width of the model presets (SmolLM2, Qwen2.5, Llama 3.x, Mistral),
ranks 1-128, f32 and bf16, and token counts that are not tile multiples.

Lowering is not compiling: VMEM limits and Mosaic's own checks need libtpu,
so the deviceless TPU compiles live in tests/test_tpu_kernels_compile.py
(`make test-tpu`).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernel_cases import abstract_args, preset_widths, value_and_grads
from pallas_kernels import ops

WIDTHS = preset_widths()
# (tokens, rank, dtype): rank 1 and 128 bound the rank axis; 37 and 300
# tokens are not multiples of any tile; 300 also takes the GPU grouped path.
# The TPU block rule depends on the widths and the rank, and rank-1 bf16 on
# Mosaic's verifier, so every width lowers the first two cases for TPU;
# Triton blocks are powers of two whatever the width, so each width lowers
# one case for CUDA, in rotation.
CASES = [(37, 1, jnp.bfloat16), (300, 128, jnp.float32), (5, 24, jnp.float32)]
_IDS = [f"{d_in}x{d_out}-{name}" for (d_in, d_out), name in WIDTHS.items()]

_TRITON = "__gpu$xla.gpu.triton"
_H100 = AbstractMesh(
    (1,), ("x",), axis_types=(AxisType.Auto,),
    abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                   num_cores=None, platform="cuda"))


def test_presets_cover_the_widths_that_failed_before():
  # d_model 576 (SmolLM2-135M), 896 (Qwen2.5-0.5B), 960 (SmolLM2-360M):
  # not multiples of 128, the block rule's lane width.
  d_ins = {d_in for d_in, _ in WIDTHS}
  assert {576, 896, 960, 53248} <= d_ins and len(WIDTHS) >= 40


def _lower_tpu(fn, args):
  return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def _lower_cuda(fn, args):
  with jax.sharding.use_abstract_mesh(_H100):
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(_TRITON)])(*args)
  return exp.mlir_module()


@pytest.mark.parametrize("width", list(WIDTHS), ids=_IDS)
def test_sgmv_lowers_for_tpu_fwd_and_bwd(width):
  d_in, d_out = width
  fn = value_and_grads(ops.sgmv_lora)
  for tokens, rank, dtype in CASES[:2]:
    mlir = _lower_tpu(fn, abstract_args(tokens, d_in, d_out, rank, dtype))
    # forward + dx (fused kernel twice) and dA, dB (tgmm twice).
    assert mlir.count("tpu_custom_call") == 4, (tokens, rank, dtype)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("index", range(len(WIDTHS)), ids=_IDS)
def test_gpu_kernels_lower_for_cuda_fwd_and_bwd(index):
  d_in, d_out = list(WIDTHS)[index]
  tokens, rank, dtype = CASES[index % len(CASES)]
  fn = value_and_grads(ops.gpu_lora)
  mlir = _lower_cuda(fn, abstract_args(tokens, d_in, d_out, rank, dtype))
  # forward (bgmv: shrink + expand; grouped: one) + dx (grouped).
  want = 3 if tokens <= ops.DECODE_MAX_TOKENS else 2
  assert mlir.count(_TRITON) == want


def test_tpu_lowering_enforces_the_block_rule():
  # The check these tests rely on: a block of 288 lanes over d_in 576 (the
  # tgmm block the kernel used to pick) is refused at lowering.
  from jax.experimental import pallas as pl

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  bad = functools.partial(
      pl.pallas_call, copy, grid=(2,),
      in_specs=[pl.BlockSpec((8, 288), lambda i: (0, i))],
      out_specs=pl.BlockSpec((8, 288), lambda i: (0, i)),
      out_shape=jax.ShapeDtypeStruct((8, 576), jnp.float32))()
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    _lower_tpu(bad, (jax.ShapeDtypeStruct((8, 576), jnp.float32),))
