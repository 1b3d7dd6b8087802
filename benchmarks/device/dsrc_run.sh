#!/usr/bin/env bash
# `perception run --config full` on the one GPU as processes sharing runs/dsrc-full (--jobs), in waves: the
# teachers and the variants that need none side by side, then the distilled variants, then the evaluation. A call
# cut by the device's limit is continued by sending the same command again while the machine is warm (runs/ stays).
# The frames are simulated once per run directory (runs/dsrc-full/frames), in shards the processes share out
# (a file lock each): every process simulates some, then loads the others'.
# The run directory (each job's log in its logs/, no checkpoints) comes back in $OUT as one tgz, beside the
# evaluation's log (the device returns at most 8 files). A run the call's limit cut before its evaluation carries into
# a later session: the detect jobs' files come back too (<name>-detect.tgz.aa, .ab, ...: split at 15 MiB; join
# them with `cat <name>-detect.tgz.* | tar -xz`), with the teachers' bf16 exports xz-compressed where a distilled
# variant still lacks its detections; a later session carries the results and those exports (unpacked into
# exports/) and trains the rest (WAVE1/WAVE2 naming them), and the evaluation runs on any machine once every detect
# job's files are in one run directory (it needs neither the frames nor the models).
# RUN (default runs/dsrc-full), WAVE1 and WAVE2 (the jobs of each wave; an empty one is skipped) choose another run
# directory and jobs: the later seeds train b0 and dsrc alone (the report averages each model over the seeds that
# have it), with the config's variants cut to match (else the evaluation trains the missing ones):
#   benchmarks/device/dsrc_run.sh LIMIT_S [--set KEY=VALUE ...]
#   RUN=runs/dsrc-s1 WAVE1="teacher b0" WAVE2=dsrc benchmarks/device/dsrc_run.sh LIMIT_S --set 'seeds=[1]' \
#       --set 'variants=["b0", "dsrc"]'
# Memory: each process keeps its training frames' inputs on the GPU (~2 GB a 1,000 frames, twice that with the
# teacher's painted input) beside the frames (~2 GB a 1,000): wave 1's six processes need ~55 GB at 2,000 frames.
set -u
# several processes share the 16 cores: torch's default of one CPU thread per core each would oversubscribe them
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
limit=$1; shift
end=$((SECONDS + limit))
run=${RUN:-runs/dsrc-full}; name=$(basename "$run")
mkdir -p "$run/logs"
job() {  # job LOG [--jobs ...]
  local log=$1; shift
  SPARSEDISTILL_LOG=info timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) python3 -m sparsedistill perception run \
    --run-dir "$run" --resume --no-progress "${sets[@]}" "$@" >> "$run/logs/$log.log" 2>&1
}
wave() {
  local pids=() names=() i
  for i in "$@"; do job "$i" --jobs "$i" & pids+=($!); names+=("$i"); done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "${names[$i]}: exit $?"; done
  echo "wave done after $SECONDS s: $(ls $run/results 2>/dev/null | tr '\n' ' ')"
}
sets=("$@")
for f in "$run"/exports/*.safetensors.xz; do  # exports carried from an earlier session, compressed for the trip
  [ -f "$f" ] && python3 benchmarks/device/xz.py d "$f" "${f%.xz}" && rm "$f"
done
# shellcheck disable=SC2086  # the waves are word lists
wave ${WAVE1-teacher teacher_unpainted b0 no_fusion early dsrc_no_distill}
# shellcheck disable=SC2086
wave ${WAVE2-dsrc dsrc_no_paint dsrc_no_recon}
job eval; rc=$?
cp "$run/logs/eval.log" "$OUT/$name-eval.log"
echo "evaluation: exit $rc after $SECONDS s"; tail -n 25 "$OUT/$name-eval.log"
# What comes back (the device returns <= 8 files, 64 MiB in all): the run's tgz and the log always; when cut, what a
# later session needs, in this order while it fits: the detect files, the exports of variants trained but not
# detected, the teachers' exports while a second-wave variant is untrained. A job whose export does not fit loses
# its result in the tgz too, so it trains again rather than failing for want of weights.
drop=()
if [ $rc -ne 0 ]; then
  # what is in $OUT already (the log, and anything a command beside this script wrote there) counts, plus the tgz
  files=$(($(find "$OUT" -maxdepth 1 -type f | wc -l) + 1))
  room=$((60 * 1024 * 1024 - $(find "$OUT" -maxdepth 1 -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')))
  fits() { local size; size=$(stat -c %s "$1"); if [ $files -lt 8 ] && [ "$size" -le $room ]; then
    files=$((files + 1)); room=$((room - size)); else rm -f "$1"; return 1; fi; }
  detected=("$run"/checkpoints/detect-*.pt)
  if [ -e "${detected[0]}" ]; then
    tar -cz "${detected[@]}" | split -b 15m - "$OUT/$name-detect.tgz."
    for part in "$OUT/$name-detect.tgz."*; do fits "$part" || echo "dsrc_run.sh: $part does not fit the return"; done
  fi
  ship() { local job; job=$(basename "$1" .safetensors)
    python3 benchmarks/device/xz.py c "$1" "$OUT/$job.safetensors.xz" && fits "$OUT/$job.safetensors.xz" \
      || { drop+=(--exclude="results/$job.json"); echo "dsrc_run.sh: $job's export does not fit: it trains again"; }; }
  for f in "$run"/exports/*-s*.safetensors; do
    [ -f "$f" ] || continue
    job=$(basename "$f" .safetensors)
    case $job in teacher*) ;; *) [ -f "$run/results/detect-$job.json" ] || ship "$f" ;; esac
  done
  need_teachers=0
  # shellcheck disable=SC2086
  for v in ${WAVE2-dsrc dsrc_no_paint dsrc_no_recon}; do
    compgen -G "$run/results/$v-s*.json" >/dev/null || need_teachers=1
  done
  if [ $need_teachers = 1 ]; then
    for f in "$run"/exports/teacher*-s*.safetensors; do [ -f "$f" ] && ship "$f"; done
  fi
fi
tar -czf "$OUT/$name.tgz" --exclude='*.pt' --exclude='*.pt.*' --exclude='.*.pt*' --exclude='exports' "${drop[@]}" "$run"
ls -la "$OUT"
exit $rc
