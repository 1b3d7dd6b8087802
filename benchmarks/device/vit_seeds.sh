#!/usr/bin/env bash
# The ViT preset's seeds side by side on one GPU (each a process; resumable, so a call cut by the
# device's 10-minute limit is continued by sending the same command again while the machine is warm).
#   benchmarks/device/vit_seeds.sh LIMIT_S SEED...   (seed 0 runs the KD ablation, the others do not)
# Logs and the run directories (weights left out) go to $OUT.
set -u
limit=$1; shift
for s in "$@"; do
  extra=(); [ "$s" = 0 ] || extra=(--set ablation=false)
  SPARSEDISTILL_LOG=info OMP_NUM_THREADS=4 timeout "$limit" python3 -m sparsedistill vit compress --config full \
    --set "seeds=[$s]" --set speed.batch=0 "${extra[@]}" --run-dir "runs/vit-full-s$s" --resume --no-progress \
    >> "$OUT/s$s.log" 2>&1 &
done
wait
for s in "$@"; do tail -n 4 "$OUT/s$s.log"; done
tar -czf "$OUT/vit-full.tar.gz" --exclude='*.pt' --exclude='*.safetensors' runs/vit-full-s*
