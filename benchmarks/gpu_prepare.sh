#!/usr/bin/env bash
# bash benchmarks/gpu_prepare.sh   -- run HERE, before the GPU machine's one command, not on that machine.
#
# The GPU machine's image (Python 3.12, x86-64, no network) has torch, transformers, lightning, safetensors,
# pytest and hypothesis, but not greenlet (the lockstep runs need it). This fetches its wheel into .whl/ and keeps
# .whl/ out of git; benchmarks/gpu_all.sh installs what it finds there. Then, with the device tool:
#     run  command="bash benchmarks/gpu_all.sh"  carry=[".whl"]  timeout_s=600
# and copy the table from $OUT/gpu_offload.md into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "greenlet>=3.0"
ls -l .whl
