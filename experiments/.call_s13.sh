#!/usr/bin/env bash
# Session 13 GPU calls (one nvidia-h200). Usage: bash experiments/.call_s13.sh A|B|C
set -u
part=$1
export MAMBA3_COMMIT=db7089e PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=.:/tmp/site
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }
case $part in
A)
  timeout 200 python3 -m pytest -q -x tests/kernels/test_mosaic_output.py 2>&1 | tail -60 > "$OUT/mosaic_tests.log"
  tail -25 "$OUT/mosaic_tests.log"
  OUT=$OUT timeout $(left 560) bash experiments/gpu_prefill.sh --shapes a,b,c --modes fwd,fwd+bwd \
    --variants "ours,mosaic_output=1,mosaic_output=2,mosaic_output=2;mosaic_stages=1" --reps 10
  grep -n "Error\|error" "$OUT/prefill.log" | head -20
  ;;
B)
  timeout 330 python3 experiments/bench_generate.py --models mimo --lengths 16384 2>&1 | tee "$OUT/table7_mimo.log" | tail -8
  mkdir -p /tmp/hlo
  XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" timeout $(left 570) \
    python3 experiments/bench_train.py --configs 1.5b --steps 1 --warmup 0 \
    --set model.scan_layers=False --set train.deterministic=False 2>&1 | tail -5
  ls -S /tmp/hlo | head -5
  f=$(ls -S /tmp/hlo/*after_optimizations.txt 2>/dev/null | head -1)
  [ -n "$f" ] && gzip -c "$f" | split -b 12m - "$OUT/hlo_1p5b.txt.gz."; ls -la "$OUT"
  ;;
C)
  for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_autotune_level=0"; do
    XLA_FLAGS="$flags" timeout 150 python3 experiments/bench_train.py --configs 1.5b --steps 3 --warmup 1 \
      --set model.scan_layers=False --set train.deterministic=False 2>&1 | tee -a "$OUT/compile_flags.log" \
      | grep '^{' | python3 -c "import json,sys; [print('flags=[$flags]', {k: r.get(k) for k in ('compile_s','lower_s','step_ms','mfu','error')}) for r in map(json.loads, sys.stdin)]"
  done
  OUT=$OUT NCU=1 NCU_MODES=fwd NCU_VARIANT="ours|mosaic_output=2;mosaic_stages=1" timeout $(left 585) \
    bash experiments/gpu_prefill.sh --shapes a --modes fwd --variants ours --reps 3 | tail -30
  ;;
D)
  timeout 300 python3 experiments/bench_generate.py --models mimo --lengths 16384 2>&1 | tee "$OUT/table7_mimo.log" | grep -v "^  " | tail -6
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout $(left 440) python3 experiments/bench_train.py --configs 1.5b --steps 3 --warmup 1 \
      --set model.scan_layers=False --set train.deterministic=False 2>&1 | tee "$OUT/train_notriton.log" | grep '^{' | cut -c1-1500
  mkdir -p /tmp/hlo
  XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" timeout $(left 585) \
    python3 experiments/bench_train.py --configs 1.5b --steps 2 --warmup 0 \
    --set model.scan_layers=False --set train.deterministic=False 2>&1 | tee "$OUT/train_dump.log" | grep '^{' | cut -c1-1500
  f=$(ls -S /tmp/hlo/*after_optimizations.txt 2>/dev/null | head -1); echo "largest: $f"
  [ -n "$f" ] && gzip -c "$f" | split -b 12m - "$OUT/hlo_1p5b.txt.gz."; ls -la "$OUT"
  ;;
E)
  export XLA_FLAGS="--xla_gpu_enable_triton_gemm=false"
  timeout 250 python3 experiments/bench_train.py --configs 180m,1.5b,180m_mimo --steps 3 --warmup 1 2>&1 \
    | tee "$OUT/train_e1.log" | grep '^{' | cut -c1-1200
  timeout $(left 300) python3 experiments/bench_train.py --configs 1.5b --steps 3 --warmup 1 \
    --set model.scan_layers=False 2>&1 | tee "$OUT/train_e2.log" | grep '^{' | cut -c1-1200
  ;;
esac
