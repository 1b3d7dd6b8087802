#!/usr/bin/env bash
# The retrieval full preset's ablation variants side by side on one GPU, one process each, as runs
# that `sparsedistill retrieval report MAIN_RUN runs/rt-abl-*` merges with the main variant's run.
# Resumable: a call cut by the device's 10-minute limit continues when the same command is sent
# again while the machine is warm (runs/ stays there).
#   [SEED=1] [QUERY_LEARN=1] benchmarks/device/retrieval_ablation.sh LIMIT_S VARIANT[@FLOPS_WEIGHT]...
#     (QUERY_LEARN=1: every arm also learns query-term weights, query.learn=true; the baseline variant's best
#     serving at the CPU scale, docs/notes/retrieval-quality.md)
#     (runs/rt-abl-VARIANT[-wWEIGHT][-sSEED]; a weight sets loss.flops_weight and loss.plain_flops_weight, for a
#     FLOPS-weight sweep that `sparsedistill retrieval plane runs/rt-abl-* --out DIR` plots)
# Needs the retrieval carry (docs/notes/gpu-plan.md). Logs, a GPU memory trace and the run
# directories (weights and document vectors left out) go to $OUT.
set -u
[ $# -ge 2 ] || { echo "usage: [SEED=N] $0 LIMIT_S VARIANT..." >&2; exit 2; }
limit=$1; shift
seed=${SEED:-0}; sfx=""; [ "$seed" = 0 ] || sfx="-s$seed"
learn=(); [ "${QUERY_LEARN:-0}" = 1 ] && learn=(--set query.learn=true)
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 >> "$OUT/gpu.csv" 2>&1 &
smi=$!
pids=()
names=()
for arm in "$@"; do
  v=${arm%@*}; w=""; extra=()
  if [[ $arm == *@* ]]; then w=${arm#*@}; extra=(--set "loss.flops_weight=$w" --set "loss.plain_flops_weight=$w"); fi
  name="$v${w:+-w$w}$sfx"; names+=("$name")
  OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$limit" \
    python3 -m sparsedistill retrieval train --config full \
    --set 'teachers.names=["minilm","splade"]' --set 'teachers.weights=[1.0,1.0]' --set teachers.cache_dir=.gpu/rcache \
    --set "variants=[\"$v\"]" --set "seeds=[$seed]" --set eval.base=false "${extra[@]}" "${learn[@]}" \
    --set student.pretrain.checkpoint_every=100 --set student.finetune.checkpoint_every=100 \
    --run-dir "runs/rt-abl-$name" --resume --no-progress >> "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done  # 124: cut by the limit (send again to resume); other: failed
kill "$smi" 2>/dev/null
# Each finished arm also gets its BM25-impact blends (retrieval/lexical.py; a minute of CPU, from the cached vectors)
for name in "${names[@]}"; do
  [ -f "runs/rt-abl-$name/report.md" ] && [ -f "runs/rt-abl-$name/summary.json" ] && \
    timeout 300 python3 -m sparsedistill retrieval blend "runs/rt-abl-$name" --no-progress >> "$OUT/$name.log" 2>&1
done
dirs=()
for name in "${names[@]}"; do echo "== $name"; tail -n 5 "$OUT/$name.log"; dirs+=("runs/rt-abl-$name"); done
# Only this call's runs, without weights or cached document vectors (a call returns a few tens of MB at most).
tar -czf "$OUT/rt-abl$sfx.tar.gz" --exclude='checkpoints' --exclude='doc-vectors' --exclude='*.safetensors' --exclude='*.bin' "${dirs[@]}"
exit "$rc"
