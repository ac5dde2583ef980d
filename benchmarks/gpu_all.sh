#!/usr/bin/env bash
# bash benchmarks/gpu_all.sh [gpu_offload.py args]   -- the GPU machine's one command (device tool, timeout_s=600)
#
# Every GPU measurement in one call of under 10 minutes, results under $OUT:
#   env.txt          python, torch, CUDA, nvidia-smi, which packages had to come from .whl/
#   gpu_tests.txt    pytest -m gpu tests/test_gpu.py (first: short, and it says whether streaming on CUDA is sound)
#   gpu_offload.json the benchmark's rows, rewritten after each row (kept if the run is cut off)
#   gpu_offload.md   the table alone;  gpu_offload.log  progress lines;  RESULTS.md  benchmarks/RESULTS.md + table
#
# The package is not installed: the repository root goes on PYTHONPATH (that machine has no network, so pip
# could fetch nothing anyway). Packages its image lacks (greenlet, at last look) travel as wheels in .whl/:
# run `bash benchmarks/gpu_prepare.sh` here first, then this with carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL=${GPU_ALL_TOTAL_S:-540}    # the device tool stops a command at 600 s; its machine start counts too
TEST_S=${GPU_ALL_TEST_S:-100}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}            # the image's python3 holds its CUDA torch; never a CPU venv from this tree
left() { echo $(( TOTAL - (SECONDS - START) )); }

missing() {
    "$PY" - <<'EOF'
import importlib.util
mods = ["torch", "transformers", "lightning", "greenlet", "safetensors", "yaml", "pytest", "hypothesis"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
}

{
    echo "== $(date -u '+%F %T') UTC, $("$PY" --version 2>&1) at $(command -v "$PY")"
    miss=$(missing)
    if [ -n "$miss" ]; then
        echo "missing: $miss"
        if compgen -G ".whl/*.whl" >/dev/null; then
            timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
            echo "installed from .whl/: $(ls .whl); still missing: $(missing)"
        else
            echo "no .whl/ folder carried: the runs below will fail to import"
        fi
    fi
    "$PY" -c "import torch, zo2_lightning.engine, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if
torch.cuda.is_available() else '', '| transformers', transformers.__version__)" 2>&1
    timeout 20 nvidia-smi --format=csv --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,\
pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max 2>&1
    free -g 2>&1 | head -2; nproc
} 2>&1 | tee "$OUT/env.txt"
export PYTHONPATH                 # the block above ran in a subshell (the pipe): repeat what it exported
compgen -G "/tmp/site/*" >/dev/null && export PYTHONPATH="$PYTHONPATH:/tmp/site"

echo "== GPU tests (at most ${TEST_S} s)"
timeout -k 10 "$TEST_S" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?" >>"$OUT/gpu_tests.txt"
tail -n 3 "$OUT/gpu_tests.txt"

# gpu_offload.py stops starting new work at --budget-s and is sent SIGTERM (it then writes its table) at the hard
# limit; a SIGKILL 15 s later leaves only the JSON, rendered here.
HARD=$(( $(left) - 25 ))
BUDGET=$(( HARD - 75 ))
echo "== benchmark: budget ${BUDGET} s, hard limit ${HARD} s"
timeout -k 15 "$HARD" "$PY" benchmarks/gpu_offload.py --out "$OUT/gpu_offload.json" --budget-s "$BUDGET" "$@" \
    2>&1 | tee "$OUT/gpu_offload.log"
echo "gpu_offload exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_offload.log"
if [ -f "$OUT/gpu_offload.json" ] && ! grep -q '"rendered": true' "$OUT/gpu_offload.json"; then
    "$PY" benchmarks/gpu_offload.py --table-from "$OUT/gpu_offload.json" >>"$OUT/gpu_offload.log" 2>&1
fi
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo "== done in $(( SECONDS - START )) s"
