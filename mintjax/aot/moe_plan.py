"""The trillion-parameter rows: MoE presets planned on a TPU slice with expert parallelism.

Owns `PLAN` (MoE preset -> named TPU topology and its (data, fsdp, expert,
tensor) mesh), `plan_row` (per-device memory, whether it fits, estimated
train and decode step time with a 1,024-slot adapter bank) and
`render_rows` (the rows of docs/SCALE_UP.md).

Where the numbers come from (all per device):

  memory    exact shard shapes of every parameter from the model's own
            logical axes and the rules table (`sharding.DEFAULT_RULES`:
            experts over `expert`, FFN/heads/vocab over `tensor`, `embed`
            over `fsdp`), in bf16 or int8 (`weight_format`); the adapter
            bank [S, L, d, r] on the attention projections with the slot
            axis split over every device (as `slot_sharded`), f32 + two
            AdamW moments to train, bf16 to serve; the KV cache (MLA keeps
            its compressed latents) split over the batch axes; and an
            activation estimate (train: the remat checkpoints, one bf16
            [tokens, D] per layer, one layer's working set and the bank's
            gradient; decode: one layer's working set), labelled as an
            estimate (`COMPILED_CHECKS` holds compiled totals to compare).
  step time roofline: max(FLOPs / peak bf16, HBM bytes / bandwidth) plus the
            expert-parallel token exchange (an all-gather of the tokens and
            a reduce-scatter of the outputs per MoE layer,
            `mintjax.model.expert_parallel`) over ICI, not overlapped.
            FLOPs count the *active* parameters (k routed + shared experts,
            attention, the head) per token; decode bytes count every
            non-expert weight, the expert weights the batch touches
            (1 - (1 - k/E)^tokens of them), the batch's adapters and the
            cache; train bytes count the weights read by forward, remat
            recompute and backward, and the per-slot optimizer's traffic.

Not a compile: the deviceless compile of the same steps is `mintjax.aot`
(`tools/aot.py`, which takes the (data, fsdp, expert, tensor) mesh);
`COMPILED_CHECKS` records the compiled Qwen3-30B-A3B steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from mintjax import sharding
from mintjax.aot.chips import CHIPS, GIB
from mintjax.config import ModelConfig
from mintjax.model import llama, presets
from mintjax.model.kv_cache import cache_logical_axes, cache_shapes

# Public per-chip ICI bandwidth (bytes/s, all links together), from the same
# Cloud TPU pages as `chips.CHIPS`: v5p 4,800 Gbps, v6e 3,584 Gbps.
ICI_BYTES_PER_S = {"v5p": 4800e9 / 8, "v6e": 3584e9 / 8, "v5e": 1600e9 / 8,
                   "v4": 2400e9 / 8}


@dataclasses.dataclass(frozen=True)
class Placement:
  topology: str      # e.g. 'v5p:4x4x4' (64 chips)
  name: str          # Google's slice name (v5p counts TensorCores: 2/chip)
  data: int
  fsdp: int
  expert: int
  tensor: int

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.expert * self.tensor

  def mesh_dict(self) -> dict[str, int]:
    return dict(data=self.data, fsdp=self.fsdp, expert=self.expert,
                tensor=self.tensor)


# Experts split over `expert`, attention/FFN widths over `tensor`; `expert`
# divides each model's expert count.
PLAN: dict[str, Placement] = {
    "qwen3-30b-a3b": Placement("v5p:2x2x2", "v5p-16 (8 chips)", 1, 1, 8, 1),
    "qwen3-235b-a22b": Placement("v5p:4x4x2", "v5p-64 (32 chips)",
                                 1, 1, 16, 2),
    "deepseek-v3-671b": Placement("v5p:4x4x4", "v5p-128 (64 chips)",
                                  1, 1, 16, 4),
    "kimi-k2-1t": Placement("v5p:4x4x8", "v5p-256 (128 chips)", 1, 1, 32, 4),
}

SLOTS, RANK = 1024, 16
TRAIN_SEQ, DECODE_CACHE = 256, 2048


class _Mesh:
  """The sizes `sharding.logical_to_spec` reads (no devices needed)."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = dict(sizes)


def _shard_bytes(shapes, axes, mesh: _Mesh, rules) -> int:
  total = 0
  for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(
      axes, is_leaf=lambda x: isinstance(x, tuple) and all(
          isinstance(e, (str, type(None))) for e in x))):
    spec = sharding.logical_to_spec(a, s.shape, mesh, rules)
    shard = list(s.shape)
    for i, ax in enumerate(spec):
      for name in (ax if isinstance(ax, tuple) else (ax,) if ax else ()):
        shard[i] //= mesh.shape[name]
    total += int(np.prod(shard)) * np.dtype(s.dtype).itemsize
  return total


def attention_targets(cfg: ModelConfig) -> tuple[str, ...]:
  """The adapted projections: every attention projection (MLA's q_a, q_b,
  kv_a, kv_b, o), the same bank for every tenant."""
  return tuple(n for n in cfg.projection_names()
               if n not in ("gate", "up", "down"))


def _active_params(cfg: ModelConfig) -> dict[str, float]:
  """Per-token matmul parameters, averaged over layers, and expert totals."""
  d = cfg.hidden_size
  attn = sum(a * b for a, b in map(cfg.projection_shape,
                                   attention_targets(cfg)))
  dense_ffn = 3 * d * cfg.intermediate_size
  expert = 3 * d * cfg.moe_intermediate_size
  moe_active = (cfg.num_experts_per_tok * expert
                + 3 * d * cfg.shared_expert_size + d * cfg.num_experts)
  per_layer = attn + (cfg.num_dense_layers * dense_ffn
                      + cfg.num_moe_layers * moe_active) / cfg.num_layers
  return dict(per_layer=per_layer, attn=attn,
              head=d * cfg.vocab_size,
              expert_total=cfg.num_moe_layers * cfg.num_experts * expert)


def _attention_flops(cfg: ModelConfig, keys: int) -> float:
  """q.k and p.v FLOPs per query token per layer over `keys` keys."""
  if cfg.uses_mla:
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
  else:
    qk = v = cfg.head_dim
  return 2 * cfg.num_heads * (qk + v) * keys


def plan_row(preset: str, *, weight_format: str = "float",
             placement: Placement | None = None) -> dict:
  """Memory per device, fits, and estimated train/decode step time.

  Args:
    preset: an MoE preset of `PLAN`.
    weight_format: 'float' (bf16 base) or 'int8' (weight-only base).
    placement: override `PLAN[preset]`.
  """
  pl = placement or PLAN[preset]
  cfg = presets.get_config(preset).replace(weight_format=weight_format)
  chip_key = pl.topology.split(":")[0]
  chip = CHIPS[chip_key]
  mesh = _Mesh(pl.mesh_dict())
  rules = sharding.DEFAULT_RULES
  n = pl.devices
  params_dev = _shard_bytes(llama.param_shapes(cfg),
                            llama.param_logical_axes(cfg), mesh, rules)
  expert_cfg = cfg.replace(weight_format="float")
  expert_shapes = {k: v for k, v in llama.param_shapes(expert_cfg)
                   .get("moe", {}).items() if k in ("gate", "up", "down")}
  expert_axes = {k: v for k, v in llama.param_logical_axes(expert_cfg)
                 .get("moe", {}).items() if k in ("gate", "up", "down")}
  experts_dev = _shard_bytes(expert_shapes, expert_axes, mesh, rules)
  if weight_format == "int8":
    experts_dev //= 2  # int8 values; their scales are a rounding error
  # The bank: A [S, L, d_in, r] and B [S, L, r, d_out] per target, the slot
  # axis split over every device.
  targets = attention_targets(cfg)
  bank_params = SLOTS * cfg.num_layers * RANK * sum(
      a + b for a, b in map(cfg.projection_shape, targets))
  bank_serve = bank_params * 2 / n
  bank_train = bank_params * 4 * 3 / n       # f32 factors + AdamW mu, nu
  token_devices = pl.data * pl.fsdp * pl.expert
  d, layers = cfg.hidden_size, cfg.num_layers
  act = _active_params(cfg)
  e, k = max(cfg.num_experts, 1), max(cfg.num_experts_per_tok, 1)
  ici = ICI_BYTES_PER_S[chip_key]
  rows = {}
  for step in ("train", "decode"):
    if step == "train":
      batch = max(64, token_devices)
      tokens = batch * TRAIN_SEQ
      cache = 0
      tok_dev = tokens / token_devices
      # remat keeps each layer's bf16 input; one layer's MoE working set is
      # the gathered tokens' k choices through the expert FFN (bf16).
      working = (pl.expert * tok_dev * k
                 * (2 * d + 3 * cfg.moe_intermediate_size / pl.tensor) * 2)
      # + the bank's f32 gradient (one more bank-sized buffer).
      activations = tok_dev * d * 2 * layers + working + bank_params * 4 / n
      bank = bank_train
      passes = 3                               # forward, recompute, dx
      flops = tokens * layers * (passes * 2 * act["per_layer"]
                                 + (passes + 1) * _attention_flops(
                                     cfg, TRAIN_SEQ) / 2)
      flops += tokens * 2 * 2 * act["head"]
      lora = tokens * layers * 4 * 2 * RANK * sum(
          a + b for a, b in map(cfg.projection_shape, targets))
      flops = (flops + lora) / n
      hbm = params_dev * passes + bank_train * 7 / 3
    else:
      batch = max(64, token_devices)
      tokens = batch
      cache = _shard_bytes(cache_shapes(cfg, batch, DECODE_CACHE),
                           cache_logical_axes(), mesh, rules)
      tok_dev = tokens / token_devices
      activations = pl.expert * tok_dev * k * (
          2 * d + 3 * cfg.moe_intermediate_size / pl.tensor) * 2 * 4
      bank = bank_serve
      flops = tokens * (layers * (2 * act["per_layer"] + _attention_flops(
          cfg, DECODE_CACHE)) + 2 * act["head"])
      flops += tokens * layers * 2 * RANK * sum(
          a + b for a, b in map(cfg.projection_shape, targets))
      flops /= n
      touched = 1 - (1 - k / e) ** tokens if cfg.num_experts else 1.0
      distinct = min(batch, SLOTS - 1) / SLOTS
      hbm = (params_dev - experts_dev) + experts_dev * touched + cache + (
          bank_serve * distinct)
    comm = 0.0
    if pl.expert > 1 and cfg.num_moe_layers:
      # per MoE layer (and its backward for training): all-gather the
      # group's bf16 tokens in, reduce-scatter the f32 outputs back.
      per_layer = tok_dev * (pl.expert - 1) * d * (2 + 4)
      comm = cfg.num_moe_layers * per_layer * (2 if step == "train" else 1)
      comm /= ici
    total = params_dev + bank + cache + activations
    t_flops, t_bytes = flops / chip.bf16_flops, hbm / chip.hbm_bandwidth
    est = max(t_flops, t_bytes) + comm
    rows[step] = dict(
        batch=batch, tokens=tokens, bank_bytes=bank, cache_bytes=cache,
        activation_bytes_est=activations, total_bytes=total,
        fits=bool(total <= chip.hbm_bytes), step_flops=flops,
        step_hbm_bytes=hbm, comm_s=comm, est_step_s=est,
        bound="compute" if t_flops >= t_bytes else "memory",
        tokens_per_s=tokens / est)
  return dict(preset=preset, weight_format=weight_format,
              topology=pl.topology, slice=pl.name, devices=n,
              mesh=pl.mesh_dict(), chip=chip.name, hbm=chip.hbm_bytes,
              params_total=cfg.num_params(), params_bytes=params_dev,
              expert_bytes=experts_dev, targets=targets, slots=SLOTS,
              rank=RANK, train=rows["train"], decode=rows["decode"])


def render_rows(rows) -> str:
  """Markdown table rows (one per preset x weight format)."""
  out = ["| model | params | weights | slice (mesh d/f/e/t) | weights/dev | "
         "train: GB/dev, fits, est. step | decode: GB/dev, fits, est. step, "
         "tok/s |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    t, dcd = r["train"], r["decode"]
    m = r["mesh"]
    out.append(
        f"| {r['preset']} | {r['params_total'] / 1e9:,.0f}B | "
        f"{'int8' if r['weight_format'] == 'int8' else 'bf16'} | "
        f"{r['slice']} ({m['data']}/{m['fsdp']}/{m['expert']}/{m['tensor']})"
        f" | {r['params_bytes'] / 1e9:.1f} GB | "
        f"{t['total_bytes'] / 1e9:.1f}, {'yes' if t['fits'] else 'NO'}, "
        f"{t['est_step_s'] * 1e3:,.0f} ms ({t['batch']}x{TRAIN_SEQ} tok, "
        f"{t['bound']}) | {dcd['total_bytes'] / 1e9:.1f}, "
        f"{'yes' if dcd['fits'] else 'NO'}, {dcd['est_step_s'] * 1e3:.1f} ms"
        f" (B={dcd['batch']}, {dcd['bound']}), "
        f"{dcd['tokens_per_s']:,.0f} |")
  return "\n".join(out)


def all_rows() -> list[dict]:
  return [plan_row(p, weight_format=w) for p in PLAN
          for w in ("float", "int8")]


def hbm_gib(row: dict) -> float:
  return row["hbm"] / GIB


def _check_plan() -> None:
  for name, pl in PLAN.items():
    cfg = presets.get_config(name)
    if cfg.num_experts % pl.expert:
      raise ValueError(f"{name}: expert axis {pl.expert} does not divide "
                       f"{cfg.num_experts} experts")
    if not math.prod(int(x) for x in pl.topology.split(":")[1].split("x")) \
        == pl.devices:
      raise ValueError(f"{name}: mesh {pl.mesh_dict()} does not fill "
                       f"{pl.topology}")


# Deviceless TPU compiles of the same workloads (`tools/aot.py`, libtpu
# 0.0.50.1), the cross-check of the analytic rows: GB per chip as XLA's
# memory analysis reports them.
COMPILED_CHECKS = {
    ("qwen3-30b-a3b", "decode"): dict(
        total=15.65, params=10.33, bank=3.42, kv_cache=1.61, temporaries=0.28,
        compile_s=385),
    ("qwen3-30b-a3b", "train"): dict(
        total=55.10, params=10.33, bank=6.85, optimizer=13.69,
        temporaries=24.23, compile_s=1409),
    ("deepseek-v3-671b", "decode"): dict(
        total=36.27, params=30.54, bank=3.10, kv_cache=0.58, temporaries=2.05,
        compile_s=302),
    ("kimi-k2-1t", "decode"): dict(
        total=25.49, params=23.35, bank=0.98, kv_cache=0.29, temporaries=0.88,
        compile_s=155),
}


def compile_command(preset: str, step: str) -> str:
  """The `tools/aot.py` command line of a `COMPILED_CHECKS` row."""
  pl = PLAN[preset]
  cfg = presets.get_config(preset)
  m = pl.mesh_dict()
  return (f".venv-tpu/bin/python -m tools.aot --model={preset} "
          f"--topology={pl.topology} --mesh={m['data']},{m['fsdp']},"
          f"{m['expert']},{m['tensor']} --step={step} --slots={SLOTS} "
          f"--rank={RANK} --targets={','.join(attention_targets(cfg))} "
          f"--batch=64 --lora_impl=gather --rule_set=slot_sharded")


def render_compiled_checks(rows: list[dict]) -> list[str]:
  by_name = {(r["preset"], r["weight_format"]): r for r in rows}
  out = ["| compiled check | GB/chip compiled (split) | analytic row | "
         "compile |", "|---|---|---|---|"]
  for (preset, step), c in COMPILED_CHECKS.items():
    split = ", ".join(f"{k} {v:.2f}" for k, v in c.items()
                      if k not in ("total", "compile_s"))
    row = by_name.get((preset, "float"))
    analytic = f"{row[step]['total_bytes'] / 1e9:.1f}" if row else "-"
    out.append(f"| {preset} {step}, {PLAN[preset].name} | {c['total']:.2f} "
               f"({split}); fits | {analytic} | {c['compile_s']} s |")
  return out


def render_section(rows: list[dict] | None = None) -> list[str]:
  """The '## Trillion-parameter MoE bases' section of docs/SCALE_UP.md."""
  rows = all_rows() if rows is None else rows
  return [
      "## Trillion-parameter MoE bases (issue 15)", "",
      "Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3-671B and Kimi-K2-1T "
      "(`mintjax.model.presets`) on named v5p slices with **expert "
      "parallelism**: the mesh is (data, fsdp, expert, tensor), experts are "
      "split over `expert` and the token exchange is the all-gather + "
      "reduce-scatter of `mintjax.model.expert_parallel`. Each row carries a "
      f"**{SLOTS:,}-slot** rank-{RANK} adapter bank on every attention "
      "projection (MLA's q_a, q_b, kv_a, kv_b, o for DeepSeek-V3 and "
      "Kimi-K2), slot axis split over all chips; train = "
      f"rows x {TRAIN_SEQ} tokens with f32 factors and per-slot AdamW, "
      f"remat; decode = one token per row, cache {DECODE_CACHE:,}, 64 "
      "distinct adapters per batch, bf16 bank. `int8` rows use the int8 "
      "weight-only base (`weight_format='int8'`, per-channel scales).", "",
      "**These rows are analytic, not compiled** "
      "(`mintjax.aot.moe_plan`): weight bytes per chip are the exact shard "
      "shapes of every parameter under the rules table; bank, optimizer "
      "and KV cache bytes are exact; activations are an estimate (train: "
      "one bf16 [tokens, D] remat checkpoint per layer, one MoE "
      "layer's working set and the bank's f32 gradient). Step time is the roofline on *active* "
      "parameters (k routed + shared experts), decode reading every "
      "non-expert weight plus the experts the batch touches, plus the "
      "expert-parallel token exchange over ICI (v5p 4,800 Gbps per chip), "
      "not overlapped with compute. `tools/aot.py` compiles these steps "
      "with an expert mesh axis (cross-check below; the MLA models' bank "
      "sits on q_a, q_b, kv_a, kv_b, o); each large compile takes 5-25 "
      "minutes on this 2-core host, so only the steps in the cross-check "
      "table were compiled. The grouped-matmul kernel and the "
      "expert-parallel FFN "
      "compile for v5p on their own (tests/test_gmm_tpu.py).", "",
      render_rows(rows), "",
      "Cross-check: steps compiled deviceless for the same v5p slices and "
      "meshes with the 1,024-slot bank on the attention projections (the "
      "expert-parallel FFN inside; commands below the table). Weights, bank,"
      " optimizer and cache agree with the analytic bytes; training's XLA "
      "temporaries (24.2 GB: "
      "the bank gradient, the optimizer's gathered slots, remat "
      "checkpoints, the gathered tokens' expert activations) are larger "
      "than the analytic activation estimate, so read the other train rows' "
      "totals as lower bounds (with the same ~17 GB of extra temporaries "
      "per chip they still fit v5p's 95 GiB).", "",
      *render_compiled_checks(rows), "",
      *[f"- `{compile_command(p, st)}`" for p, st in COMPILED_CHECKS], "",
      "Regenerate: `python -m tools.scale_up --render_only` (these rows "
      "need no compile; `python -c 'from mintjax.aot import moe_plan; "
      "print(moe_plan.render_rows(moe_plan.all_rows()))'` prints them "
      "alone).", ""]
