#!/usr/bin/env bash
# One GPU call: the official Mamba-3 kernels, our prefill kernels beside them, and (NCU=1) an
# ncu profile of one call at B8 L2048 H32, run first (ncu crashed when it ran after the bench in
# the same call). Needs .official/ (see ../shared/bench/official/README.md).
# Usage (on the GPU machine): [NCU=1 NCU_MODES=fwd,fwd+bwd NCU_VARIANT="ours|rotary_chunk=16"] bash experiments/gpu_prefill.sh [bench args...]
# (one session-5 call with NCU_MODES=fwd+bwd alone recorded no kernels: keep fwd in the list)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# No 75% preallocation: a profiled process can outlive ncu (session 6: the second pass and the
# bench after it ran out of memory beside a leftover one), and torch shares the device here.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ -n "${NCU:-}" ]; then  # NCU_VARIANT: one variant, or a '|'-separated list (one ncu pass each)
  IFS='|' read -r -a ncu_variants <<< "${NCU_VARIANT:-ours}"
  for i in "${!ncu_variants[@]}"; do
    v=${ncu_variants[$i]}
    # NCU_METRICS=stalls: also occupancy, throughputs and warp stall reasons (ncu_summary)
    ncu --clock-control none --csv --metrics "$(python3 -c "from pallas_kernels.chunked_scan.ncu_summary import METRICS, STALL_METRICS; print(METRICS + (',' + STALL_METRICS if '${NCU_METRICS:-}' == 'stalls' else ''))")" \
      --profile-from-start off python3 -m pallas_kernels.chunked_scan.bench --shapes a \
      --modes "${NCU_MODES:-fwd,fwd+bwd}" --variants "$v" --reps 1 --profile > "$OUT/ncu_$i.csv" 2> "$OUT/ncu_$i.err"
    echo "== ncu: $v"
    # every kernel: the Mosaic GPU kernels' names do not hold "mamba3" (session 13 lost them)
    python3 -m pallas_kernels.chunked_scan.ncu_summary "$OUT/ncu_$i.csv" \
      | tee "$OUT/ncu_summary_$i.txt"
    grep -q " 0 kernels" "$OUT/ncu_summary_$i.txt" && tail -5 "$OUT/ncu_$i.err"  # why none
    rm -f "$OUT/ncu_$i.csv" "$OUT/ncu_$i.err"  # the summaries come back (8 files at most)
    pkill -9 -f pallas_kernels.chunked_scan.bench; sleep 1  # the profiled process, if it lingers
  done
fi
(cd .official && OFFICIAL_DIR=. OUT="$OUT" python3 fast.py > "$OUT/official.log" 2>&1) \
  || tail -5 "$OUT/official.log"
python3 -m pallas_kernels.chunked_scan.bench --official "$OUT/official.json" \
  --json "$OUT/prefill.json" "$@" 2>&1 | tee "$OUT/prefill.log" | grep -v '^{'
