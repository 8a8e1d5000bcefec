#!/usr/bin/env bash
# Trains configs/fashion_mnist_small.py from scratch and reports the final test
# accuracy, the wall time of the whole command and the machine.
#
#   bash benchmarks/fashion_mnist_small.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir=${1:-runs/bench_fashion_mnist_small}
rm -rf "$workdir"
mkdir -p "$(dirname "$workdir")"
data_dir=$(bash scripts/prepare_data.sh)
start=$(date +%s.%N)
.venv/bin/dnl-zoo train --config configs/fashion_mnist_small.py --workdir "$workdir" \
  --config.dataset.data_dir="$data_dir" --config.progress_bar=False | tee "$workdir.log"
end=$(date +%s.%N)

echo "wall time of the train command: $(python3 -c "print(round($end - $start))") s"
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1)," \
  "$(free -g | awk '/Mem:/ {print $2}') GiB"
.venv/bin/python -c "import jax; print('jax', jax.__version__, jax.devices())"
