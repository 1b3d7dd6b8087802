#!/usr/bin/env bash
# TDM settings side by side on the one GPU (one 9.7M-parameter DiT leaves the card mostly idle): one resumable
# `video run --config full` per arm in runs/vb-<name>, the K = 4 dense student only, from the teacher's export.
# The first call carries the export (.gpu/video-teacher, copied to /root/video-teacher by env.sh), a second one
# sent while the machine is warm carries Fashion-MNIST (.gpu/fmnist) for the classifier and the evaluation: the
# same command resumes every arm. Logs and each run (no checkpoints, no exports) come back in $OUT.
#   benchmarks/device/video_sweep.sh LIMIT_S NAME="--set KEY=VALUE ..." ...
set -u
limit=$1; shift
names=(); pids=()
for arm in "$@"; do
  name=${arm%%=*}; extra=()
  [[ $arm == *=* ]] && read -ra extra <<< "${arm#*=}"  # KEY=VALUE overrides without spaces inside a value
  SPARSEDISTILL_LOG=info timeout "$limit" python3 -m sparsedistill video run --config full --run-dir "runs/vb-$name" \
    --resume --no-progress --set 'teacher.init="/root/video-teacher/teacher-s{seed}-ema.safetensors"' \
    --set 'students.steps=[4]' --set 'students.variants=["tdm"]' "${extra[@]}" >> "$OUT/vb-$name.log" 2>&1 &
  names+=("$name"); pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "vb-${names[$i]}: exit $rc after $SECONDS s; $(ls runs/vb-${names[$i]}/results 2>/dev/null | tr '\n' ' ')"
  tail -n 1 "runs/vb-${names[$i]}/metrics.jsonl" 2>/dev/null
done
tar -czf "$OUT/vb-sweep.tgz" --exclude='*.pt' --exclude='*.pt.*' --exclude='*.safetensors' $(printf 'runs/vb-%s ' "${names[@]}")
exit $status
