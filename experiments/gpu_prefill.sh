#!/usr/bin/env bash
# One GPU call: the official Mamba-3 kernels, our prefill kernels beside them, and (NCU=1) an
# ncu profile of one call at B8 L2048 H32, run first (ncu crashed when it ran after the bench in
# the same call). Needs .official/ (see ../shared/bench/official/README.md).
# Usage (on the GPU machine): [NCU=1 NCU_MODES=fwd+bwd NCU_VARIANT=ours] bash experiments/gpu_prefill.sh [bench args...]
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ -n "${NCU:-}" ]; then
  ncu --clock-control none --csv --metrics "$(python3 -c 'from pallas_kernels.chunked_scan.ncu_summary import METRICS; print(METRICS)')" \
    --profile-from-start off python3 -m pallas_kernels.chunked_scan.bench --shapes a \
    --modes "${NCU_MODES:-fwd,fwd+bwd}" --variants "${NCU_VARIANT:-ours}" --reps 1 --profile > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 -m pallas_kernels.chunked_scan.ncu_summary "$OUT/ncu.csv" | tail -45
fi
(cd .official && OFFICIAL_DIR=. OUT="$OUT" python3 fast.py > "$OUT/official.log" 2>&1) \
  || tail -5 "$OUT/official.log"
python3 -m pallas_kernels.chunked_scan.bench --official "$OUT/official.json" \
  --json "$OUT/prefill.json" "$@" 2>&1 | tee "$OUT/prefill.log" | grep -v '^{'
