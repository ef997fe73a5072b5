#!/usr/bin/env bash
# One call on a lent GPU machine (torch + triton preinstalled, no network): build the CUDA
# extension, run the GPU tests, validate every GPU backend against float64, and benchmark.
# Everything lands as JSON/text under $OUT (default bench/out/gpu).
#   bash bench/gpu_check.sh            # on the device machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
log() { echo "$(date +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
$python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"

log "build the extension with CUDA kernels"
SPARSEFT_BUILD_CUDA=1 MAX_JOBS=16 $python setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1
log "build rc=$? (tail of build.txt follows)"; tail -5 "$OUT/build.txt" | tee -a "$OUT/log.txt"
$python -m sparseft.cli info | tee "$OUT/info.txt"

log "validate every GPU backend against float64"
timeout 240 $python -m sparseft.bench.gpu_validate --json "$OUT/validate.json" 2>&1 | tail -40 | tee -a "$OUT/log.txt"

if $python -c "import pytest" 2>/dev/null; then
  log "GPU tests"
  # TRITON_INTERPRET=0: tests/conftest.py turns the interpreter on unless told otherwise.
  TRITON_INTERPRET=0 timeout 180 $python -m pytest -q tests/test_ce_cuda.py tests/test_sparse_linear.py \
    tests/test_sparse_adamw.py -k "cuda or gpu" -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
  log "pytest rc=$?"; tail -3 "$OUT/pytest.txt" | tee -a "$OUT/log.txt"
else
  log "pytest is not installed here: the validation above stands in for it"
fi

log "benchmark: cross-entropy (bf16)"
timeout 300 $python -m sparseft.cli bench ce --device cuda --dtype bfloat16 --shapes llama3,smollm2 \
  --tokens 4096,8192 --repeats 5 --json "$OUT/bench_ce.json" 2>&1 | tail -30 | tee -a "$OUT/log.txt"

log "benchmark: sparse updates"
timeout 240 $python -m sparseft.cli bench sparse --device cuda --full --repeats 5 \
  --json "$OUT/bench_sparse.json" 2>&1 | tail -30 | tee -a "$OUT/log.txt"
log "done"
