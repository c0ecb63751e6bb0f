#!/usr/bin/env bash
# The pending GPU runs of docs/benchmarks.md ("Pending GPU runs"), one part per device call
# (each under 10 minutes on one H200; a helper issues them back to back to stay in the warm
# window). From the repo root, with .whl (../shared/wheels) and .official
# (../shared/bench/official/README.md) carried:
#     OUT=$OUT MAMBA3_COMMIT=<short HEAD> bash experiments/gpu_pending.sh train|train3|train4|train5|train6|stream|prefill|lm|profile|decode|state
# Results land in $OUT (at most 8 files come back: keep the logs few).
set -u
part=${1:?part: train, train3, train4, train5, train6, stream, prefill, lm, profile, decode or state}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
# the image lacks ml_collections, grain and jax-triton: plain `pip install` put them where the
# image's python did not look (session 13 lost a call to it); --target + PYTHONPATH does not
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=.:/tmp/site
python3 -c "import ml_collections, grain" || exit 1
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }
row() { grep '^{' | python3 -c "
import json, sys
for r in map(json.loads, sys.stdin):
    print(r['config'], ' '.join(r['set']), {k: r.get(k) for k in
          ('lower_s', 'compile_s', 'step_ms', 'mfu', 'peak_mem_gib', 'error')})"; }
bench() {  # bench <log name> <seconds> <bench_train args...>
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 experiments/bench_train.py --steps 3 --warmup 1 "$@" 2>&1 \
    | tee "$OUT/$name.log" | row
}
# the 1.5B's remat before session 14 made configs/paper.py's 24-layer SISO sizes keep everything
kept="--set train.remat=names:in_proj,ssm_out,mixer_out,mlp_hidden,kernels"
case $part in
train)  # the new 1.5B default (unrolled, remat none) deterministic and not; the MIMO defaults
  # (session 14 ran the part_matmuls rows here at commit 7872046; the option is gone)
  bench t1 140 --configs 1.5b
  bench t2 140 --configs 1.5b --set train.deterministic=False
  bench t3 90 --configs 180m_mimo
  bench t4 80 --configs 1.5b_mimo
  # 180M keeping every activation (the 1.5B's gain: no recompute, 23% fewer ops to compile) on
  # smaller microbatches, the same 131k tokens a step (32 x 2048 needs ~185 GB)
  bench t5 80 --configs 180m --micro 16 --accum 4 --set train.remat=none
  bench t6 $(left 570) --configs 180m --micro 8 --accum 8 --set train.remat=none
  ;;
train3)  # the 1.5B unrolled compile (61.4 s in session 14, 3.5 s of it JAX's) under XLA flags
  i=0
  for f in "--xla_gpu_autotune_level=2" "--xla_gpu_autotune_level=1" \
      "--xla_gpu_enable_command_buffer=" \
      "--xla_gpu_autotune_level=1 --xla_gpu_enable_command_buffer="; do
    i=$((i+1)); echo "c$i: XLA_FLAGS=$f"
    XLA_FLAGS="$f" bench "c$i" 125 --configs 1.5b --set model.scan_layers=False \
      --set train.deterministic=False $kept
  done
  ;;
train4)  # the 1.5B layer scan with XLA's dynamic-slice fusion (a cuBLAS matmul or a custom call
  # reading / writing the stacked weights and residuals in place); where the unrolled compile goes
  nd="--set train.deterministic=False $kept --set model.scan_layers=True"
  bench s1 90 --configs 1.5b $nd --set train.xla_triton_gemm=off --profile 2
  XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
    bench s2 90 --configs 1.5b $nd --set train.xla_triton_gemm=off --profile 2
  XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
    bench s3 90 --configs 1.5b $nd --set train.xla_triton_gemm=on --profile 2
  bench s4 70 --configs 180m --set train.deterministic=False
  bench s5 $(left 560) --configs 1.5b $nd --set model.scan_layers=False --trace_compile
  python3 - "$OUT/s5.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        for name, s, n in json.loads(line).get("compile_trace_top", [])[:30]:
            print(f"{s:8.2f} s {n:6d}x {name[:90]}")
PY
  ;;
train5)  # the 1.5B unrolled step and compile without rematerialisation (23% fewer ops to compile)
  nd="--set model.scan_layers=False --set train.deterministic=False"
  bench r1 115 --configs 1.5b $nd $kept
  bench r2 115 --configs 1.5b $nd --set train.remat=none
  bench r3 $(left 330) --configs 1.5b $nd --set train.remat=none --trace_compile
  ;;
train6)  # session 17's `core_gate` in the 180M training step (SISO without RMSNorm: the model's
  # default), beside the default in the same call
  bench g1 150 --configs 180m
  MAMBA3_TRITON_BLOCKS=core_gate=1 bench g2 150 --configs 180m
  MAMBA3_TRITON_BLOCKS=core_gate=1 bench g3 $(left 560) --configs 1.5b
  ;;
stream)  # issue 10: how fast a kernel streams the decode state (XLA, Pallas Triton, Mosaic
  # GPU with TMA), beside the copy ceiling (session 15, docs/benchmarks.md); the Mosaic
  # variants in two processes, as session 15 ran them
  for m in P:1:-,32:2:p,16:4:p,P:2:h P:3:h,32:4:h,16:4:h,32:8:h,16:8:h; do
    timeout 200 python3 experiments/bench_stream.py --triton 16:2 --dtypes bfloat16,float32 \
      --mosaic $m 2>&1 | grep -E "^\| |Error" | grep -v "^\| N\|---" | tail -22
  done
  ;;
prefill)  # the opt-in kernel options, beside the official kernels: `pass_unroll` (the
  # sequential passes' chain at small B H: shape c), `core_gate=1` (XLA work of the backward:
  # fwd+bwd at a, b). Session 18 ran it with `pre_angles=2` and `rotary_chunk_infer` too (both
  # removed since)
  OUT=$OUT timeout 240 bash experiments/gpu_prefill.sh --shapes c --modes fwd,fwd+bwd \
    --variants "ours,pass_unroll=2,pass_unroll=4" --reps 10 | tail -8
  b() { timeout $(left $1) python3 -m pallas_kernels.chunked_scan.bench \
    --official "$OUT/official.json" --reps 10 "${@:2}" 2>&1 | grep -v '^{' | tail -12; }
  b 420 --shapes a,b --modes fwd+bwd \
    --variants "ours,core_gate=1"
  ;;
lm)  # issue 13's state-size study, its central cells first (Mamba-3 SISO at d_state 64 against
  # Mamba-2 at 128, each beside the other's size), two seeds, 1,000 steps (65M tokens) a run;
  # LM_SHARDS shards share the GPU (a small_gpu run leaves most of it idle; four ran out of
  # memory on an H100, session 18). Resumable: run the part
  # again while the machine is warm (TERM checkpoints the runs; the compile cache skips the
  # compiles). The runs' metrics come back as a tar.
  mkdir -p runs/lm_state_size runs/jax_cache
  export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax_cache
  [ -d shared/data ] || { echo "shared/data missing"; exit 1; }
  sel="--study state_size --variants ${LM_VARIANTS:-siso_N64,siso_N128,mamba2_N64,mamba2_N128}
    --seeds 0,1 --set train.steps=1000 --workdir runs/lm_state_size --out runs/lm_state_size_out"
  budget=$(left 560)
  n=${LM_SHARDS:-2}
  for i in $(seq 0 $((n - 1))); do
    timeout -s TERM $budget python3 experiments/lm_compare.py $sel --shard $i/$n \
      --time_budget $((budget - 20)) > "$OUT/lm_$i.log" 2>&1 &
  done
  wait
  python3 experiments/lm_compare.py $sel --collect_only 2>&1 | tail -15
  for f in "$OUT"/lm_*.log runs/lm_state_size/*/train.log; do echo "== $f"; tail -n 3 "$f" | cut -c1-200; done
  tar -czf "$OUT/lm_state_size.tgz" --exclude='checkpoints' --exclude='*.npz' -C runs \
    lm_state_size lm_state_size_out 2>/dev/null; ls -la "$OUT"
  ;;
profile)  # per-kernel device time of the prefill kernels from jax's profiler (`--trace`: ncu
  # segfaulted in sessions 10, 13 and 17), beside the official kernels, SISO and MIMO
  (cd .official && OFFICIAL_DIR=. OUT=$OUT timeout 120 python3 fast.py > "$OUT/official.log" 2>&1)
  timeout $(left 560) python3 -m pallas_kernels.chunked_scan.bench --official "$OUT/official.json" \
    --shapes a,b,c --modes fwd,fwd+bwd --variants ours --mimo --reps 10 --trace 3 \
    > "$OUT/trace.log" 2>&1
  tail -12 "$OUT/trace.log"
  ;;
decode)  # after session 17: MIMO fp32 N=64's measured shape beside xla_rot (not in one call
  # yet), the new MIMO bf16 N=64 default, the SISO defaults; the whole table comes back in
  # $OUT (session 17's tail -60 cut the N=128 rows from the log; its JSON kept them)
  timeout 420 python3 experiments/bench_decode_step.py --official .official --ranks 1,4 \
    --variants "16:2,16:4,16:2:xlatrig,16:2:xlarot,16:4:xlatrig,32:2:xlatrig,32:2:xlarot,64:4:xlatrig:mma" \
    > "$OUT/decode.log" 2>&1
  grep -E "^\|" "$OUT/decode.log" | tail -80
  ;;
state)  # issue 13: modular arithmetic, four rates a seed, resumable (run the part again)
  mkdir -p runs/st_paper4
  timeout $(left 560) python3 experiments/state_tracking.py --preset paper --tasks mod_arith \
    --variants mamba3 --seeds 0,1,2,3 --lrs 1.39e-3,2.68e-3,5.18e-3,1e-2 --out runs/st_paper4 \
    --time_budget $(left 540) 2>&1 | tail -20
  tar -cf - -C runs st_paper4 | split -b 12m - "$OUT/st_paper4.tar."
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
