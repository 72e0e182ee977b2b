#!/usr/bin/env bash
# The GPU column of docs/performance.md in one device call (about 6 minutes on an H100/H200):
#
#   benchmarks/gpu.sh            # on the device machine, from the repo root, with the Fashion-MNIST .gz
#                                # files carried in .data/fashion-mnist (see docs/performance.md)
#   benchmarks/gpu.sh --dry-run  # every section on the CPU with tiny sizes
#
# Writes $OUT/gpu.json (or runs/gpu_bench/gpu.json) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-runs/gpu_bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)"
python3 -m benchmarks.gpu --out "$out" "$@"
