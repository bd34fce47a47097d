#!/usr/bin/env bash
# Every GPU benchmark of issue 13 in one command (on a machine with an H100/H200; about 10 minutes, at most 14):
#   bash benchmarks/gpu_all.sh
# writes benchmarks/results/gpu_kernels.json and gpu_e2e.json and prints their README tables.
# Each script is bounded (timeout) and saves after every section, so a slow step keeps the rest.
# With $OUT set (a lent device machine), the JSON files are also copied there to come back.
set -uo pipefail
cd "$(dirname "$0")"
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 420 python gpu_kernels.py; k=$?
timeout 420 python gpu_e2e.py; e=$?
python gpu_kernels.py --table results/gpu_kernels.json || true
python gpu_e2e.py --table results/gpu_e2e.json || true
if [ -n "${OUT:-}" ]; then cp results/gpu_kernels.json results/gpu_e2e.json "$OUT"/ 2>/dev/null || true; fi
echo "gpu_kernels exit $k, gpu_e2e exit $e"
exit $(( k != 0 || e != 0 ))
