#!/usr/bin/env bash
# The GPU column of docs/performance.md in one device call (under 8 minutes on an H100/H200):
#
#   bash benchmarks/gpu.sh --prepare   # here, before the call: Fashion-MNIST into .data/fashion-mnist
#   bash benchmarks/gpu.sh             # on the device machine, from the repo root, carrying .data/fashion-mnist
#   bash benchmarks/gpu.sh --dry-run   # every section on the CPU with tiny sizes
#
# The device call (docs/performance.md, "The GPU call"): run(command="bash benchmarks/gpu.sh",
# carry=[".data/fashion-mnist"], timeout_s=540). Writes $OUT/gpu.json (or runs/gpu_bench/gpu.json) after
# every section, so a run stopped by the time guard keeps what it measured; prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
data=.data/fashion-mnist
if [ "${1:-}" = "--prepare" ]; then
  src=/usr/share/datasets/fashion-mnist  # Debian's dataset-fashion-mnist
  [ -d "$src" ] || { echo "gpu.sh --prepare: $src is missing (apt-get install dataset-fashion-mnist)" >&2; exit 2; }
  mkdir -p "$data" && cp "$src"/*-ubyte.gz "$data"/ && ls -l "$data"
  exit 0
fi
out=${OUT:-runs/gpu_bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, timm, torchvision, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__)"
# The time guard: gpu.py starts no section after --budget-s (420 s); this kills it at 470 s whatever it does.
timeout --signal=INT --kill-after=10 470 python3 -m benchmarks.gpu --out "$out" --data-dir "$data" "$@"
