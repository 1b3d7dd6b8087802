#!/usr/bin/env bash
# `perception run --config full` on the one GPU: one process trains and detects the jobs in turn (JOBS, in priority
# order; with EVALUATE=1 it then evaluates what is detected). Processes side by side time-share the card: six at once trained at 0.6x the rate of one
# (H100, 2026-12-07) and needed more than its 80 GB; one process also keeps the collated training inputs between jobs.
# A call cut by the device's limit goes on when the same command is sent again while the machine is warm (runs/ stays).
#
# What comes back is the run's *bank*: config, logs, metrics, the BEV pictures and, of every detected model, its
# results and matched predictions (matches/, ~0.5 MB a model: all the evaluation needs); no weights, frames or raw
# detections, and no result of a job whose weights stay behind (teachers, models trained but not detected), so a job
# cut at the end of a session trains again in the next. Commit the bank (docs/results/dsrc/<name>/) and start the next
# session's run from it with BANK=<that directory>; the evaluation runs anywhere (CPU; no frames, no models):
#   sparsedistill perception run --run-dir <bank> --resume --evaluate-only   (partial until every model is detected)
#
#   benchmarks/device/dsrc_run.sh LIMIT_S [--set KEY=VALUE ...]
#   RUN=runs/dsrc-s1 JOBS="b0 teacher dsrc" benchmarks/device/dsrc_run.sh LIMIT_S --set 'seeds=[1]' \
#       --set 'variants=["b0", "dsrc"]'                  (a later seed: the report averages each model over its seeds)
#   BANK=docs/results/dsrc/full-s0 benchmarks/device/dsrc_run.sh LIMIT_S           (go on from a committed bank)
set -u
limit=$1; shift
end=$((SECONDS + limit))
run=${RUN:-runs/dsrc-full}; run=${run#./}; name=$(basename "$run")  # no "./": the tar below leaves out dot-names
if [ -n "${BANK:-}" ] && [ ! -e "$run" ]; then mkdir -p "$run" && cp -r "$BANK"/. "$run"/; fi
mkdir -p "$run/logs"
# shellcheck disable=SC2206  # a word list
jobs=(${JOBS-b0 teacher dsrc dsrc_no_recon teacher_unpainted dsrc_no_paint dsrc_no_distill no_fusion early})
step() {  # step LOG [--jobs ...]: one process, with what is left of the limit
  local log=$1; shift
  SPARSEDISTILL_LOG=info timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) python3 -m sparsedistill perception run \
    --run-dir "$run" --resume --no-progress "$@" >> "$run/logs/$log.log" 2>&1
}
step train "$@" --jobs "${jobs[@]}"; rc=$?
echo "jobs (${jobs[*]}): exit $rc after $SECONDS s; results: $(ls "$run/results" 2>/dev/null | tr '\n' ' ')"
# EVALUATE=1: also evaluate here (trains nothing: the report of the models detected so far, partial until all are);
# off by default: ~1 minute of the card's time, and the bank evaluates on any CPU
if [ $rc -eq 0 ] && [ "${EVALUATE:-0}" = 1 ]; then
  step eval "$@" --evaluate-only; rc=$?
  echo "evaluation: exit $rc after $SECONDS s"; tail -n 25 "$run/logs/eval.log"
fi
cp "$run/logs/train.log" "$OUT/$name-train.log" 2>/dev/null
# the bank: a model counts as kept only with its matches; the results of jobs whose weights stay here are left out
# (they train again wherever the run goes on), and so are unfinished atomic writes (.name.XXXX)
drop=()
for f in "$run"/results/*.json; do
  [ -f "$f" ] || continue
  job=$(basename "$f" .json)
  case $job in
    eval-*) ;;
    detect-*) [ -f "$run/matches/$job.npz" ] || drop+=(--exclude="results/$job.json") ;;
    *) [ -f "$run/matches/detect-$job.npz" ] || drop+=(--exclude="results/$job.json") ;;
  esac
done
tar -czf "$OUT/$name.tgz" --exclude='*.pt' --exclude='*.pt.*' --exclude='.*' --exclude='exports' \
  --exclude='frames' "${drop[@]}" "$run"
ls -la "$OUT"
exit $rc
