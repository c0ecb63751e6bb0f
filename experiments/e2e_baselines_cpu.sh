#!/bin/bash
# End-to-end check of the baselines on a CPU (issue 14, "How we will check it"; results in
# docs/model.md "End-to-end check of the baselines (CPU)"): train each model for 250 steps with
# the CLI (configs/tiny_cpu.py shapes), print its first and last train loss, generate from it,
# and round-trip every convertible run through the official PyTorch format
# (experiments/convert_roundtrip.py). About 25 min on a 2-core CPU, one process at a time.
#
#   experiments/e2e_baselines_cpu.sh [ROOT (default /tmp/e2e_baselines)]
#   MAMBA_REPO=/path/to/state-spaces/mamba experiments/e2e_baselines_cpu.sh   # + official math
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/tmp/e2e_baselines}
mkdir -p "$ROOT"
COMMON=(--config configs/tiny_cpu.py --config.train.steps=250 --config.optim.warmup_steps=25
        --config.train.eval_every=0 --config.train.eval_steps=8 --config.train.checkpoint_every=0
        --config.train.progress=False)
declare -A RUNS=(
  [transformer]="--config.model.mixer=attention --config.model.max_seq_len=512"
  [gdn]="--config.model.mixer=gated_deltanet --config.model.d_conv=4"
  [mamba2]="--config.model.mixer=mamba2 --config.model.d_conv=4"
  [siso]=""
  [siso_ht]="--config.model.a_activation=heavy_tail"
  [mimo]="--config.model.mimo_rank=4 --config.model.a_activation=heavy_tail"
  [hybrid]="--config.model.layer_pattern=MMMMMA --config.model.attn_rope=False
            --config.model.scan_layers=True --config.model.n_layer=12 --config.model.d_model=64
            --config.model.headdim=32 --config.model.max_seq_len=512
            --config.model.a_activation=heavy_tail"
)
ORDER=(transformer gdn mamba2 siso siso_ht mimo hybrid)
REPO_ARG=()
[ -n "${MAMBA_REPO:-}" ] && REPO_ARG=(--mamba-repo "$MAMBA_REPO")

for name in "${ORDER[@]}"; do
  # shellcheck disable=SC2086  # the overrides are words
  python -m mamba3_jax.train "${COMMON[@]}" --workdir "$ROOT/$name" ${RUNS[$name]} \
    > "$ROOT/$name.log" 2>&1
  python - "$ROOT/$name/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tr = [r for r in rows if "train/loss" in r]
ev = [r for r in rows if "eval/bits_per_byte" in r]
print(f"{sys.argv[1]}: train loss step {tr[0]['step']} {tr[0]['train/loss']:.3f} -> step "
      f"{tr[-1]['step']} {tr[-1]['train/loss']:.3f}; eval bits/byte {ev[-1]['eval/bits_per_byte']:.3f}")
EOF
  python -m mamba3_jax.generate --workdir "$ROOT/$name" --prompt "It was a dark and stormy night" \
    --max_new_tokens 80 --seed 0
  python -m mamba3_jax.generate --workdir "$ROOT/$name" --prompt "It was" \
    --prompt "Once upon a time there" --max_new_tokens 40 --temperature 0
  case $name in
    gdn) python -m mamba3_jax.convert --from "$ROOT/$name" --to "$ROOT/conv/$name/m.safetensors" \
           || true ;;  # refused: the official model has no Gated DeltaNet layer
    siso) python experiments/convert_roundtrip.py "$ROOT/$name" --out "$ROOT/conv/$name" \
            --force --a_activation softplus "${REPO_ARG[@]}" ;;
    *) python experiments/convert_roundtrip.py "$ROOT/$name" --out "$ROOT/conv/$name" \
         "${REPO_ARG[@]}" ;;
  esac
done
