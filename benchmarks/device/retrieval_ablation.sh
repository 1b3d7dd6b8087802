#!/usr/bin/env bash
# The retrieval full preset's ablation variants side by side on one GPU, one process each, as runs
# that `sparsedistill retrieval report MAIN_RUN runs/rt-abl-*` merges with the main variant's run.
# Resumable: a call cut by the device's 10-minute limit continues when the same command is sent
# again while the machine is warm (runs/ stays there).
#   benchmarks/device/retrieval_ablation.sh LIMIT_S VARIANT...
# Needs the retrieval carry (docs/notes/gpu-plan.md). Logs, a GPU memory trace and the run
# directories (models left out) go to $OUT.
set -u
limit=$1; shift
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 >> "$OUT/gpu.csv" 2>&1 &
smi=$!
pids=()
for v in "$@"; do
  OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$limit" \
    python3 -m sparsedistill retrieval train --config full \
    --set 'teachers.names=["minilm","splade"]' --set 'teachers.weights=[1.0,1.0]' --set teachers.cache_dir=.gpu/rcache \
    --set "variants=[\"$v\"]" --set eval.base=false \
    --set student.pretrain.checkpoint_every=100 --set student.finetune.checkpoint_every=100 \
    --run-dir "runs/rt-abl-$v" --resume --no-progress >> "$OUT/$v.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
kill "$smi" 2>/dev/null
for v in "$@"; do echo "== $v"; tail -n 5 "$OUT/$v.log"; done
tar -czf "$OUT/rt-abl.tar.gz" --exclude='checkpoints' --exclude='*.safetensors' --exclude='*.bin' runs/rt-abl-*
