#!/usr/bin/env bash
# The GPU checks of recording in one command, for a lent GPU box that has torch (CUDA),
# transformers, numpy, pandas, scipy, scikit-learn, tqdm and pytest but not the rest of
# llm2bids' dependencies (nibabel among them: `make gpu-wheels` downloads what is missing into
# .whl/, which travels with the command).
#
#   bash benchmarks/gpu_session.sh SHAPE [SHAPE ...]   # e.g. SmolLM2-135M Llama-3.2-1B
#   bash benchmarks/gpu_session.sh --dry-run           # rehearsal on a CPU: the tiny shape
#
# What it does, each step with its own time limit so that one slow step leaves the rest their
# time: print the stack and the GPU; `benchmarks/gpu.py --shape SHAPE` once per shape, each in
# its own process, its row written to $OUT/gpu-SHAPE.json; then `pytest -m gpu` (the GPU tests
# of recording, masking and pruning), its log in $OUT/pytest-gpu.log. Back here,
# `python benchmarks/run.py --gpu-results DIR` puts the rows into benchmarks/RESULTS.md.
# Environment: OUT (default gpu_out), PYTHON (default python3), WHEELS (default .whl),
# SHAPE_TIMEOUT (seconds a shape may take, default 240), TESTS_TIMEOUT (default 180),
# GPU_TOKENS (tokens a shape records, default gpu.py's 16384; 8192 keeps the 8B shape's 30 GB
# recordings to half), GPU_TESTS=0 (benchmark only: the tests ran in an earlier call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export LLM2BIDS_WORK=${LLM2BIDS_WORK:-${TMPDIR:-/tmp}}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/llm2bids-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/llm2bids-site"
fi

"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/stack.txt"
import platform, torch, transformers, numpy, nibabel
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, numpy {numpy.__version__}, nibabel {nibabel.__version__}; "
      f"{cuda}; {torch.get_num_threads()} torch threads")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "the stack above cannot run llm2bids' recording"; exit 1; }

status=0
if [ "${1:-}" = "--dry-run" ]; then
    runs=("--dry-run --out $OUT/gpu-tiny.json")
else
    [ "$#" -gt 0 ] || { echo "name at least one shape (see benchmarks/gpu.py --help)"; exit 2; }
    runs=()
    for shape in "$@"; do
        runs+=("--shape $shape --out $OUT/gpu-$shape.json ${GPU_TOKENS:+--tokens $GPU_TOKENS}")
    done
fi
for args in "${runs[@]}"; do
    echo "== benchmarks/gpu.py $args"
    # shellcheck disable=SC2086 (the arguments are words)
    timeout "${SHAPE_TIMEOUT:-240}" "$PYTHON" benchmarks/gpu.py $args || status=$?
done

[ "${GPU_TESTS:-1}" = 0 ] && exit "$status"
echo "== pytest -m gpu"
timeout "${TESTS_TIMEOUT:-180}" "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -ra \
    tests/test_recording_pipeline.py tests/test_pruning.py 2>&1 | tee "$OUT/pytest-gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit "$status"
