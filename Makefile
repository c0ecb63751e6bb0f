# mamba3-jax: common tasks. `make help` lists them.
PY ?= python3
WORKDIR ?= runs/tiny

.PHONY: help install test test-gpu test-fast lint train bench bench-forms bench-kernels bench-decode bench-decode-step bench-generate bench-train clean

help:
	@echo "install      pip-install the package with its test/plot/data extras"
	@echo "test         run the whole test suite (what CI runs)"
	@echo "test-fast    skip tests marked slow"
	@echo "test-gpu     the whole suite on a GPU machine (installs .whl/*.whl first; docs/testing.md)"
	@echo "lint         ruff"
	@echo "train        the README's main job: tiny model on the bundled books corpus (CPU)"
	@echo "bench        GPU benchmarks: SSM forms, Pallas kernels, layer decode (on the GPU machine)"
	@echo "bench-train  training throughput: tokens/s, MFU, compile time, memory per config"

install:
	$(PY) -m pip install -q -e ".[dev,plots,data]"

test:
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# On the GPU machine (no internet): wheels it lacks, copied into the git-ignored .whl/ (see
# ../shared/wheels/README.md), are installed into GPU_SITE first. No preallocation: pytest
# workers and the training subprocesses share the GPU. The determinism flag: the in-process
# training tests (test_scan_train) assert bit-identical resumes, which on a GPU needs it set
# before jax starts (`python -m mamba3_jax.train` sets it itself: train.deterministic).
GPU_SITE ?= /tmp/site
GPU_WORKERS ?= 4
GPU_TESTS ?= tests
test-gpu:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
	  $(PY) -m pip install -q --no-index --no-deps --upgrade --target $(GPU_SITE) .whl/*.whl \
	  || echo "warning: could not install .whl/*.whl; using the packages already installed"; fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false \
	  XLA_FLAGS="--xla_gpu_deterministic_ops=true $${XLA_FLAGS:-}" \
	  $(PY) -m pytest -q -rs --durations=15 \
	  $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(GPU_WORKERS) --dist loadgroup") $(GPU_TESTS)

test-fast:
	$(PY) -m pytest -q -n 2 -m "not slow" tests

lint:
	$(PY) -m ruff check .

train:
	$(PY) -m mamba3_jax.train --config configs/tiny_cpu.py --workdir $(WORKDIR)

bench: bench-forms bench-kernels bench-decode

bench-forms:
	$(PY) experiments/bench_forms.py

bench-kernels:
	$(PY) -m pallas_kernels.chunked_scan.bench

bench-decode:
	$(PY) experiments/bench_decode.py

# the SSM decode step alone: XLA step and every kernel variant vs the copy bandwidth
bench-decode-step:
	$(PY) experiments/bench_decode_step.py

bench-generate:
	$(PY) experiments/bench_generate.py

# BENCH_TRAIN_ARGS e.g. "--configs 180m,1.5b --devices 1,2 --mesh dp,fsdp" or "--smoke" (CPU)
bench-train:
	$(PY) experiments/bench_train.py $(BENCH_TRAIN_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
