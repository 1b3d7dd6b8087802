#!/usr/bin/env bash
# `perception run --config full` on the one GPU as processes sharing runs/dsrc-full (--jobs), in waves: the
# teachers and the variants that need none side by side, then the distilled variants, then the evaluation. A call
# cut by the device's limit is continued by sending the same command again while the machine is warm (runs/ stays).
# Each job's log and the run directory (no checkpoints) come back in $OUT.
#   benchmarks/device/dsrc_run.sh LIMIT_S [--set KEY=VALUE ...]
set -u
limit=$1; shift
end=$((SECONDS + limit))
run=runs/dsrc-full
job() {  # job LOG [--jobs ...]
  local log=$1; shift
  SPARSEDISTILL_LOG=info timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) python3 -m sparsedistill perception run \
    --run-dir "$run" --resume --no-progress "${sets[@]}" "$@" >> "$OUT/dsrc-$log.log" 2>&1
}
wave() {
  local pids=() j
  for j in "$@"; do job "$j" --jobs "$j" & pids+=($!); done
  for j in "${pids[@]}"; do wait "$j"; done
  echo "wave $* done after $SECONDS s: $(ls $run/results 2>/dev/null | tr '\n' ' ')"
}
sets=("$@")
wave teacher teacher_unpainted b0 no_fusion early dsrc_no_distill
wave dsrc dsrc_no_paint dsrc_no_recon
job eval; rc=$?
echo "evaluation: exit $rc after $SECONDS s"; tail -n 25 "$OUT/dsrc-eval.log"
tar -czf "$OUT/dsrc-full.tgz" --exclude='*.pt' "$run"
exit $rc
