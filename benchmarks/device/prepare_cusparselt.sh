#!/usr/bin/env bash
# Builds .gpu/cslt-part-* and .gpu/cslt-manifest: a cuSPARSELt other than the one PyTorch's wheels pin (torch 2.11 +
# CUDA 13 loads 0.8.0, whose release after it, 0.8.1, says it fixed an H100 slowdown), for the GPU machine, which has no
# internet. Its library (234 MB) keeps only the code an sm_90 card (H100, H200) loads (prune_fatbin.py zeroes the
# other 96 MB), is xz-compressed (~63 MB; 154 MB unpruned) and split into parts that each fit a call beside the tree
# (two); env.sh gathers them across warm calls and exports SPARSEDISTILL_CUSPARSELT_LIB for a command to LD_PRELOAD.
#   benchmarks/device/prepare_cusparselt.sh [VERSION]     (default 0.8.1; ~3 minutes: the compression)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${1:-0.8.1}
tmp=$(mktemp -d)
py=.venv/bin/python; [ -x "$py" ] || py=python3  # a fresh checkout: no venv needed beside make setup
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$tmp" "nvidia-cusparselt-cu13==$version"
"$py" - "$tmp" <<'PY'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
(wheel,) = tmp.glob("*.whl")
(tmp / "libcusparseLt.so.0").write_bytes(zipfile.ZipFile(wheel).read("nvidia/cusparselt/lib/libcusparseLt.so.0"))
PY
python3 benchmarks/device/prune_fatbin.py --sm 90 "$tmp/libcusparseLt.so.0" "$tmp/lib.so"
xz -T2 --x86 --lzma2=preset=9e -c "$tmp/lib.so" > "$tmp/cslt.so.xz"  # x86 filter: the host code compresses better
part=$(benchmarks/device/part_bytes.sh 2)  # 2 MiB reserve: these parts travel with the small carries alone
rm -f .gpu/cslt-part-*
split -b "$part" -d "$tmp/cslt.so.xz" .gpu/cslt-part-
echo "$(sha256sum < "$tmp/cslt.so.xz" | cut -d' ' -f1) $(ls .gpu/cslt-part-* | wc -l) $version" > .gpu/cslt-manifest
ls -la .gpu/cslt-part-* .gpu/cslt-manifest
