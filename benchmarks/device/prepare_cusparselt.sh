#!/usr/bin/env bash
# Builds .gpu/cslt-part-* and .gpu/cslt-manifest: a cuSPARSELt other than the one PyTorch's wheels pin (torch 2.11 +
# CUDA 13 loads 0.8.0, whose release after it, 0.8.1, says it fixed an H100 slowdown), for the GPU machine, which has no
# internet. Its library (234 MB) is xz-compressed (~154 MB) and split into parts that each fit a call beside the tree;
# env.sh gathers them across warm calls and exports SPARSEDISTILL_CUSPARSELT_LIB for a command to LD_PRELOAD.
#   benchmarks/device/prepare_cusparselt.sh [VERSION]     (default 0.8.1; ~3 minutes: the compression)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${1:-0.8.1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$tmp" "nvidia-cusparselt-cu13==$version"
.venv/bin/python - "$tmp" <<'PY'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
(wheel,) = tmp.glob("*.whl")
(tmp / "libcusparseLt.so.0").write_bytes(zipfile.ZipFile(wheel).read("nvidia/cusparselt/lib/libcusparseLt.so.0"))
PY
xz -T2 -9 -c "$tmp/libcusparseLt.so.0" > "$tmp/cslt.so.xz"
part=$(benchmarks/device/part_bytes.sh)  # one part a call, beside the tree (before the old parts go)
rm -f .gpu/cslt-part-*
split -b "$part" -d "$tmp/cslt.so.xz" .gpu/cslt-part-
echo "$(sha256sum < "$tmp/cslt.so.xz" | cut -d' ' -f1) $(ls .gpu/cslt-part-* | wc -l) $version" > .gpu/cslt-manifest
ls -la .gpu/cslt-part-* .gpu/cslt-manifest
