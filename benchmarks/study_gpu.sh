#!/usr/bin/env bash
# The init-quality study on one GPU box without Ray (weit_core only: torch, timm, safetensors, numpy,
# pyarrow, scikit-learn), in time-boxed phases that write their results to $OUT as they go.
#
#   PHASE=screen bash benchmarks/study_gpu.sh   # banks for every variant, then the screen (4 sizes, 2 seeds)
#   PHASE=full   bash benchmarks/study_gpu.sh   # the full protocol with the bank in $BANK
#
# Environment: OUT (results folder), WEIT_DATA (Fashion-MNIST files), ANCESTRY, DEVICE (cuda), PARTS (processes
# side by side), BANK_BUDGET_S (stage-1 seconds per bank), SMOKE=1 (tiny sizes and budgets, for a CPU check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=${OUT:?set OUT}; DEVICE=${DEVICE:-cuda}; PARTS=${PARTS:-12}; PY=${PY:-python3}
ANCESTRY=${ANCESTRY:-docs/data/fmnist_ancestry.safetensors}
WORK=${WORK:-/tmp/weit_study}; mkdir -p "$WORK" "$OUT"
t0=$SECONDS
say() { echo "== [study $((SECONDS - t0))s] $*"; }

if [ "${SMOKE:-0}" = 1 ]; then
  RANGE="--depths 1,2 --widths 32,64 --max-steps 5"; SCREEN_SIZES=1x32x1,2x64x2; BUDGETS=10,20; FIT="--fit-steps 5 --fit-examples 200"
  EVAL="--val-examples 200 --test-examples 200"; SEEDS=0
else
  RANGE="--depths 2,4,6,8,10,12 --widths 64,96,128"; SCREEN_SIZES=2x64x2,4x96x3,6x96x3,8x128x4; BUDGETS=100,430
  FIT=""; EVAL=""; SEEDS=0,1
fi

parts() {  # run init_quality.py in $PARTS processes side by side, all appending to one JSONL
  local out=$1; shift
  for i in $(seq 1 "$PARTS"); do
    $PY benchmarks/init_quality.py --out "$out" --part "$i/$PARTS" --threads 1 --device "$DEVICE" "$@" \
      > "$WORK/part_$i.log" 2>&1 &
  done
  wait
  tail -n 3 "$WORK"/part_*.log | tail -n 40
}

if [ "${PHASE:-screen}" = screen ]; then
  say "device"; nvidia-smi -L 2>/dev/null; $PY -c "import torch, timm; print(torch.__version__, timm.__version__)"
  VARIANTS=${VARIANTS:-default,single,N8,N16,b8,b32,tmaj,interp}
  say "stage 1: banks $VARIANTS"
  $PY benchmarks/make_banks.py --ancestry "$ANCESTRY" --out-dir "$WORK/banks" --variants "$VARIANTS" $RANGE \
    --epochs "${BANK_EPOCHS:-40}" --time-budget-s "${BANK_BUDGET_S:-200}" --batch-size "${BANK_BATCH:-128}" \
    --lr "${BANK_LR:-1e-3}" --device "$DEVICE" --jobs 8 \
    > "$OUT/banks.log" 2>&1
  say "banks done (rc $?)"; tail -n 12 "$OUT/banks.log"
  tar czf "$OUT/banks.tgz" -C "$WORK" banks
  extra=()
  for v in ${VARIANTS//,/ }; do
    [ "$v" = default ] || extra+=(--extra-bank "$v=$WORK/banks/bank_$v.safetensors")
  done
  LABELS="wave,wave{inherit=scalers},wave{bank=single},wave{fit_teacher=ancestry},wave{head_steps=50},wave{head_steps=100}"
  LABELS="$LABELS,wave{fit_teacher=ancestry;head_steps=50}"
  for v in ${VARIANTS//,/ }; do
    case $v in default|single) ;; *) LABELS="$LABELS,wave{bank=$v}" ;; esac
  done
  LABELS="$LABELS,wave_random_bank,scratch_fit,scratch,weight_selection,net2net"
  say "screen: $LABELS"
  parts "$OUT/screen.jsonl" --bank "$WORK/banks/bank_default.safetensors" "${extra[@]}" --ancestry "$ANCESTRY" \
    --sizes "$SCREEN_SIZES" --strategies "$LABELS" --seeds "$SEEDS" --budgets "$BUDGETS" --lrs 1e-3 $FIT $EVAL
  $PY benchmarks/init_quality.py --out "$OUT/screen.jsonl" --budgets "$BUDGETS" --summarize > "$OUT/screen_summary.txt"
  tail -n 30 "$OUT/screen_summary.txt"
elif [ "${PHASE}" = final ]; then
  # one bank, the recipe the screen picked (FINAL_VARIANT, e.g. "final:n=16;init=.study/bank_N16.safetensors"),
  # the GPU to itself, then the protocol with it
  say "device"; nvidia-smi -L 2>/dev/null
  say "stage 1: ${FINAL_VARIANT:?set FINAL_VARIANT}"
  $PY benchmarks/make_banks.py --ancestry "$ANCESTRY" --out-dir "$WORK/final" --variants "$FINAL_VARIANT" $RANGE \
    --epochs "${BANK_EPOCHS:-40}" --time-budget-s "${BANK_BUDGET_S:-120}" --batch-size "${BANK_BATCH:-128}" \
    --lr "${BANK_LR:-1e-3}" --device "$DEVICE" --jobs 1 > "$OUT/final_bank.log" 2>&1
  say "bank done (rc $?)"; tail -n 4 "$OUT/final_bank.log"
  name=${FINAL_VARIANT%%:*}
  cp "$WORK/final/bank_$name.safetensors" "$OUT/"; cp "$WORK/final/bank_$name.json" "$OUT/"
  LABELS=${LABELS:-wave,wave_random_bank,scratch_fit,weight_selection,net2net,tleg_fit}
  BUDGETS=${FULL_BUDGETS:-100,430}; SEEDS=${FULL_SEEDS:-0,1,2}; LRS=${LRS:-1e-3}
  [ "${SMOKE:-0}" = 1 ] && SIZES=${SIZES:-1x32x1,2x64x2} && BUDGETS=10,20 && SEEDS=0
  say "protocol: $LABELS x ${SIZES:-12 sizes} x seeds $SEEDS x budgets $BUDGETS x lrs $LRS"
  parts "$OUT/final.jsonl" --bank "$WORK/final/bank_$name.safetensors" --ancestry "$ANCESTRY" \
    ${SIZES:+--sizes "$SIZES"} --strategies "$LABELS" --seeds "$SEEDS" --budgets "$BUDGETS" --lrs "$LRS" $FIT $EVAL
  $PY benchmarks/init_quality.py --out "$OUT/final.jsonl" --budgets "$BUDGETS" --summarize > "$OUT/final_summary.txt"
  tail -n 40 "$OUT/final_summary.txt"
else
  BANK=${BANK:?set BANK}
  SIZES=${SIZES:-}; LRS=${LRS:-3e-4,1e-3,3e-3}; BUDGETS=${FULL_BUDGETS:-100,430,860}; SEEDS=${FULL_SEEDS:-0,1,2}
  LABELS=${LABELS:-wave,wave_random_bank,scratch_fit,scratch,weight_selection,net2net,tleg_fit}
  say "full protocol: $LABELS x ${SIZES:-12 sizes} x seeds $SEEDS x budgets $BUDGETS x lrs $LRS"
  parts "$OUT/full.jsonl" --bank "$BANK" --ancestry "$ANCESTRY" ${SIZES:+--sizes "$SIZES"} --strategies "$LABELS" \
    --seeds "$SEEDS" --budgets "$BUDGETS" --lrs "$LRS" $FIT $EVAL
  $PY benchmarks/init_quality.py --out "$OUT/full.jsonl" --budgets "$BUDGETS" --summarize > "$OUT/full_summary.txt"
  tail -n 40 "$OUT/full_summary.txt"
  if [ -n "${TRANSFER:-}" ]; then
    say "transfer task: digits28"
    parts "$OUT/transfer.jsonl" --data digits28 --bank "$BANK" --ancestry "$ANCESTRY" ${SIZES:+--sizes "$SIZES"} \
      --strategies "$LABELS" --seeds "$SEEDS" --budgets "${TRANSFER_BUDGETS:-50,100,200}" --lrs "$LRS" \
      --fit-examples 256 --val-examples 270 --test-examples 270 $FIT
    $PY benchmarks/init_quality.py --out "$OUT/transfer.jsonl" --budgets "${TRANSFER_BUDGETS:-50,100,200}" --summarize \
      > "$OUT/transfer_summary.txt"
    tail -n 30 "$OUT/transfer_summary.txt"
  fi
fi
say "done"
