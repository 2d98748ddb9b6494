"""Pallas gather-LoRA kernels (TPU SGMV, GPU BGMV/grouped) and their oracle.

Modules: `metadata` (slot grouping and the tile visit list shared by all
kernels), `sgmv_tpu` (TPU fused shrink+expand and tgmm), `gpu` (Triton-lowered
BGMV and grouped kernels), `ops` (custom_vjp wrappers; importing it registers
the kernels with `mintjax.adapters.lora_op`), `reference` (the oracle).
Importing this package itself loads no kernel code.
"""
