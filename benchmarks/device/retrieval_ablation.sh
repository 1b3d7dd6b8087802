#!/usr/bin/env bash
# The retrieval full preset's ablation variants side by side on one GPU, one process each, as runs
# that `sparsedistill retrieval report MAIN_RUN runs/rt-abl-*` merges with the main variant's run.
# Resumable: a call cut by the device's 10-minute limit continues when the same command is sent
# again while the machine is warm (runs/ stays there).
#   [SEED=1] benchmarks/device/retrieval_ablation.sh LIMIT_S VARIANT...   (runs/rt-abl-VARIANT[-sSEED])
# Needs the retrieval carry (docs/notes/gpu-plan.md). Logs, a GPU memory trace and the run
# directories (weights and document vectors left out) go to $OUT.
set -u
[ $# -ge 2 ] || { echo "usage: [SEED=N] $0 LIMIT_S VARIANT..." >&2; exit 2; }
limit=$1; shift
seed=${SEED:-0}; sfx=""; [ "$seed" = 0 ] || sfx="-s$seed"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 >> "$OUT/gpu.csv" 2>&1 &
smi=$!
pids=()
for v in "$@"; do
  OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$limit" \
    python3 -m sparsedistill retrieval train --config full \
    --set 'teachers.names=["minilm","splade"]' --set 'teachers.weights=[1.0,1.0]' --set teachers.cache_dir=.gpu/rcache \
    --set "variants=[\"$v\"]" --set "seeds=[$seed]" --set eval.base=false \
    --set student.pretrain.checkpoint_every=100 --set student.finetune.checkpoint_every=100 \
    --run-dir "runs/rt-abl-$v$sfx" --resume --no-progress >> "$OUT/$v$sfx.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done  # 124: cut by the limit (send again to resume); other: failed
kill "$smi" 2>/dev/null
dirs=()
for v in "$@"; do echo "== $v$sfx"; tail -n 5 "$OUT/$v$sfx.log"; dirs+=("runs/rt-abl-$v$sfx"); done
# Only this call's runs, without weights or cached document vectors (a call returns a few tens of MB at most).
tar -czf "$OUT/rt-abl$sfx.tar.gz" --exclude='checkpoints' --exclude='doc-vectors' --exclude='*.safetensors' --exclude='*.bin' "${dirs[@]}"
exit "$rc"
