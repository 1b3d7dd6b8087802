#!/usr/bin/env bash
# `video run --config full` on the one GPU, resumable: a call cut by the device's 10-minute limit is
# continued by sending the same command again while the machine is warm (runs/ stays there).
#   benchmarks/device/video_run.sh LIMIT_S [--set KEY=VALUE ...]
# The log and the run directory (checkpoints left out, the teacher's bf16 export kept, so a fresh
# machine can start from it with teacher.init) go to $OUT, the tar in parts of 15 MiB.
set -u
limit=$1; shift
SPARSEDISTILL_LOG=info timeout "$limit" python3 -m sparsedistill video run --config full --run-dir runs/vb-full \
  --resume --no-progress "$@" >> "$OUT/vb-full.log" 2>&1
rc=$?
echo "video run: exit $rc after $SECONDS s" | tee -a "$OUT/vb-full.log"
tail -n 12 "$OUT/vb-full.log"
ls runs/vb-full/results 2>/dev/null; tail -n 2 runs/vb-full/metrics.jsonl 2>/dev/null
tar -czf - --exclude='*.pt' runs/vb-full | split -b 15m -d - "$OUT/vb-full.tgz.part-"
exit $rc
