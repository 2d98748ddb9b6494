#!/usr/bin/env bash
# Real-device check of the gather-LoRA Pallas kernels (no interpret mode).
#
# Owns the one prepared script a GPU (or TPU) session runs: it installs
# nothing, compiles the kernels for the device, compares forward and
# gradients with the pure-JAX reference on several shapes, checks dispatch
# and the model forward on the kernel path, then prints the benchmark.
# Written for the H200 image (python3.12, jax 0.11.2 CUDA, no network, no
# grain / ml_collections): only jax, numpy and flax are imported.
#
# Usage (repository root):  bash tools/device_check.sh [--full]
#   --full  also run the full benchmark grid (several minutes); default is
#           tools/bench_kernels.py --quick.
# Exit status: 0 when every check passed, 1 otherwise (the benchmark still
# runs so its numbers are never lost to one failing check).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset JAX_PLATFORMS  # tests force cpu; here we want the accelerator.

echo "== environment"
"$PY" - <<'EOF'
import jax, sys
print("python", sys.version.split()[0], "jax", jax.__version__,
      "backend", jax.default_backend(), jax.devices())
EOF

echo "== kernel checks (compiled, not interpreted)"
"$PY" - <<'EOF'
import sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from mintjax.adapters import lora_op
from pallas_kernels import gpu, ops
from pallas_kernels.reference import reference_tokens

backend = jax.default_backend()
failures = []

def bank(seed, s, d_in, r, d_out, dtype):
  rng = np.random.default_rng(seed)
  ranks = rng.integers(1, r + 1, s); ranks[0] = 0
  cols = np.arange(r)[None] < ranks[:, None]
  a = rng.standard_normal((s, d_in, r)) / np.sqrt(d_in) * cols[:, None, :]
  b = rng.standard_normal((s, r, d_out)) * cols[:, :, None]
  sc = rng.uniform(0.5, 2, s).astype(np.float32); sc[0] = 0
  return (jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(sc),
          jnp.asarray(ranks, jnp.int32))

def close(name, got, want, dtype):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  mag = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max()) / mag
  # TF32/bf16 tensor-core matmuls: relative to the output magnitude.
  tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
  ok = np.isfinite(got).all() and err <= tol
  print(f"  {'ok  ' if ok else 'FAIL'} {name}: max|err|/max|ref| = {err:.2e}"
        f" (tol {tol:.0e})")
  if not ok:
    failures.append(name)

def check(name, fn):
  try:
    t0 = time.perf_counter(); fn(); dt = time.perf_counter() - t0
    print(f"  ({name}: {dt:.1f}s incl. compile)")
  except Exception:
    traceback.print_exc(); print(f"  FAIL {name}: exception")
    failures.append(name)

if backend == "gpu":
  kernel = lambda *a: ops.gpu_lora(*a)
elif backend == "tpu":
  kernel = lambda *a: ops.sgmv_lora(*a)
else:
  print("no GPU/TPU visible: nothing to compile for real"); sys.exit(1)

cases = [  # (T, S, d_in, R, d_out, dtype, pattern)
    (16, 9, 4096, 16, 4096, jnp.bfloat16, "own"),
    (64, 129, 4096, 64, 1024, jnp.bfloat16, "mixed"),
    (256, 33, 576, 8, 1536, jnp.float32, "mixed"),
    (300, 9, 1024, 16, 1024, jnp.float32, "mixed"),
    (2048, 33, 4096, 16, 4096, jnp.bfloat16, "mixed"),
    (2047, 5, 512, 64, 512, jnp.float32, "one"),
    (512, 5, 512, 8, 512, jnp.float32, "slot0"),
]
for t, s, d_in, r, d_out, dtype, pattern in cases:
  name = f"T={t} S={s} {d_in}x{r}x{d_out} {jnp.dtype(dtype).name} {pattern}"
  def run_case():
    a, b, sc, _ = bank(t + s, s, d_in, r, d_out, dtype)
    rng = np.random.default_rng(t)
    x = jnp.asarray(rng.standard_normal((t, d_in)), dtype)
    slot = {"own": 1 + np.arange(t) % (s - 1),
            "mixed": np.where(rng.random(t) < 0.3, 0, rng.integers(1, s, t)),
            "one": np.full(t, s - 1), "slot0": np.zeros(t)}[pattern]
    slot = jnp.asarray(slot, jnp.int32)
    y = jax.jit(kernel)(x, a, b, sc, slot)
    close("fwd " + name, y, reference_tokens(x, a, b, sc, slot), dtype)
    if t <= 512:
      dy = jnp.asarray(rng.standard_normal((t, d_out)), jnp.float32)
      def grads(f):
        loss = lambda *args: jnp.sum(f(*args, slot).astype(jnp.float32) * dy)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, a, b, sc)
      for gname, g, w in zip(("dx", "dA", "dB", "dscale"), grads(kernel),
                             grads(reference_tokens)):
        close(f"{gname} {name}", g, w, dtype)
  check(name, run_case)

def dispatch_and_model():
  want = "pallas_gpu" if backend == "gpu" else "pallas_sgmv"
  got = lora_op.select_impl(backend, 64, 4, 8)
  print(f"  {'ok  ' if got == want else 'FAIL'} select_impl({backend!r}) = {got}")
  if got != want:
    failures.append("dispatch")
  from mintjax.adapters.bank import bank_from_weights
  from mintjax.adapters.spec import AdapterSpec, AdapterWeights
  from mintjax.config import ModelConfig
  from mintjax.model import llama
  cfg = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
  spec = AdapterSpec(targets=("q", "k", "v", "o", "gate", "up", "down"),
                     max_rank=16, num_slots=4)
  bk = bank_from_weights(cfg, spec, {
      1: AdapterWeights.random(cfg, spec.targets, 16, seed=1),
      2: AdapterWeights.random(cfg, spec.targets, 4, seed=2)})
  params = llama.init_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 7)),
                       jnp.int32)
  idx = jnp.asarray([2, 0, 1], jnp.int32)
  ref = llama.jit_forward(params, bk, idx, tokens, config=cfg,
                          lora_impl="reference")
  auto = llama.jit_forward(params, bk, idx, tokens, config=cfg)
  close("model forward (auto -> kernel) vs reference", auto, ref,
        jnp.float32)
check("dispatch + model", dispatch_and_model)

print("== kernel checks:", "ALL PASSED" if not failures else
      f"{len(failures)} FAILED: {failures}")
sys.exit(1 if failures else 0)
EOF
status=$?

echo "== benchmark"
if [ "${1:-}" = "--full" ]; then
  timeout 1500 "$PY" tools/bench_kernels.py
else
  timeout 420 "$PY" tools/bench_kernels.py --quick
fi
exit $status
