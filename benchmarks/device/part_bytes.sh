#!/usr/bin/env bash
# The size of a part of a file split across warm calls (prepare.sh's GGUF, prepare_cusparselt.sh's library): what a
# call can carry beside the working tree that travels with it (tracked and untracked-not-ignored files), within the
# device's 64 MiB, less 2 MiB for the small carries beside a part (.gpu/wheels-core, .gpu/commit, the manifest) and
# 2 MiB for the tree's growth until the parts are used (`part_bytes.sh RESERVE_MIB` sets those 4 MiB: parts used
# within the session that makes them can take 2). The tree grew to 29 MiB by 2026-12-07 (the DSRC banks), so
# parts of a fixed 44-48 MiB no longer fit one call.
set -euo pipefail
cd "$(dirname "$0")/../.."
# each path's own size (a link's, not its target's; a tracked file deleted here counts 0)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
       | awk '{s += $1} END {print s + 0}') || true
room=$(( (64 - ${1:-4}) * 1024 * 1024 - tree ))
if [ "$room" -lt $(( 8 * 1024 * 1024 )) ]; then
  echo "part_bytes.sh: the working tree ($(( tree / 1024 / 1024 )) MiB) leaves under 8 MiB of a call's 64 MiB" >&2
  exit 1
fi
echo $(( room / 1024 / 1024 * 1024 * 1024 ))  # whole MiB
