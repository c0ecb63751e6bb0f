#!/usr/bin/env bash
# GPU smoke test of the training framework (run on the GPU machine from the repo root).
# Expects the wheels of ../shared/wheels in .whl/ and a copy of the books + GPT-2 tokenizer data in
# .data/ (both git-ignored). Writes metrics to $OUT (or /tmp/out).
set -euo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MAMBA3_DATA_DIR=$PWD/.data MAMBA3_CACHE_DIR=/tmp/m3cache
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__, flax.__version__, optax.__version__, o.__version__, jax.devices())"
W=/tmp/runs
STEPS=${STEPS:-300}
COMMON="--config.train.steps=$STEPS --config.optim.warmup_steps=50 --config.train.log_every=25
 --config.train.eval_every=150 --config.train.checkpoint_every=150 --config.model.scan_backend=${BACKEND:-chunked}"
NDEV=$(python3 -c "import jax; print(jax.device_count())")
python3 -m mamba3_jax.train --config configs/small_gpu.py:siso --workdir $W/siso $COMMON \
    --config.mesh.fsdp=$NDEV
python3 -m mamba3_jax.train --config configs/small_gpu.py:mimo --workdir $W/mimo $COMMON
# resume: extend the SISO run by 50 steps (train.steps may change on resume)
python3 -m mamba3_jax.train --config configs/small_gpu.py:siso --workdir $W/siso $COMMON \
    --config.mesh.fsdp=$NDEV --config.train.steps=$((STEPS + 50))
for r in siso mimo; do cp $W/$r/metrics.jsonl $OUT/$r.metrics.jsonl; cp $W/$r/summary.json $OUT/$r.summary.json; done
