#!/usr/bin/env bash
# Students of a `video run` config side by side on the one GPU (a 9.7M-parameter DiT leaves the card mostly idle): one
# `--jobs` process per student job on one shared, resumable run directory (runs/vb-<config>), from the teacher's
# export (/root/video-teacher, unpacked by env.sh), then, in the time left, the evaluation of every arm against one
# set of teacher samples and one classifier (needs .gpu/fmnist). A call cut by the limit is continued by sending the
# same command again while the machine is warm. The run (no checkpoints, no exports) and the logs come back in $OUT.
# TEACHER_INIT= (empty) uses the config's own teacher instead: it trains first (`--jobs teacher`), then the students.
#   [RUN=runs/vb-x] [TEACHER_INIT=PATH|''] benchmarks/device/video_sweep.sh LIMIT_S CONFIG JOB... [-- --set KEY=VALUE ...]
set -u
# several processes share the 16 cores: torch's default of one CPU thread per core each would oversubscribe them
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
limit=$1; config=$2; shift 2
jobs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do jobs+=("$1"); shift; done
[ $# -gt 0 ] && shift
run=${RUN:-runs/vb-$config}; end=$((SECONDS + limit))  # RUN: another run directory of the same config
init=${TEACHER_INIT-/root/video-teacher/teacher-s\{seed\}-ema.safetensors}
mkdir -p "$run/logs"
vr() {  # vr LOG ARGS...: one resumable `video run` into the shared run directory, within the call's limit
  local log=$1; shift
  SPARSEDISTILL_LOG=info timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) python3 -m sparsedistill video run \
    --config "$config" --run-dir "$run" --resume --no-progress \
    ${init:+--set "teacher.init=\"$init\""} "$@" >> "$run/logs/$log.log" 2>&1
}
if [ -z "$init" ]; then vr teacher --jobs teacher "$@"; echo "teacher: exit $? after $SECONDS s"; fi
pids=()
for j in "${jobs[@]}"; do vr "$j" --jobs "$j" "$@" & pids+=($!); done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "${jobs[$i]}: exit $? after $SECONDS s"; done
vr eval "$@"; rc=$?
echo "evaluation: exit $rc after $SECONDS s; results: $(ls $run/results 2>/dev/null | tr '\n' ' ')"
tail -n 20 "$run/logs/eval.log"
# Cut before the evaluation: finished models' bf16 exports travel (~14 MB each compressed; the device returns
# <= 8 files, 64 MiB in all), the teacher's first, and a later session evaluates from them (a job with its export
# and no checkpoint loads it); a job whose export does not fit loses its result in the tgz, so it trains again.
drop=()
if [ $rc -ne 0 ]; then
  room=$((56 * 1024 * 1024))
  for f in $(ls "$run"/exports/teacher-*.safetensors 2>/dev/null) $(ls "$run"/exports/*.safetensors 2>/dev/null | grep -v /teacher-); do
    job=$(basename "$f" .safetensors); job=${job%-ema}
    python3 benchmarks/device/xz.py c "$f" "$OUT/$(basename "$f").xz"
    size=$(stat -c %s "$OUT/$(basename "$f").xz")
    if [ "$size" -le $room ]; then room=$((room - size)); else
      rm -f "$OUT/$(basename "$f").xz"; drop+=(--exclude="results/$job.json"); echo "$job's export does not fit: it trains again"; fi
  done
fi
tar -czf "$OUT/$(basename "$run").tgz" --exclude='*.pt' --exclude='*.pt.*' --exclude='*.safetensors' "${drop[@]}" "$run"
exit $rc
