#!/usr/bin/env bash
# Prepares the local Fashion-MNIST (Debian's files, no network) as a TFDS
# dataset in $TFDS_DATA_DIR (default ~/tensorflow_datasets) and prints that
# directory. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
.venv/bin/dnl-zoo data prepare fashion_mnist \
  --source /usr/share/datasets/fashion-mnist --data-dir "$data_dir" > /dev/null
echo "$data_dir"
