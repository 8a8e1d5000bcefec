#!/usr/bin/env bash
# Sets up .venv and the local Fashion-MNIST, then runs the main job: evaluate
# every shipped checkpoint and print the depth table (Markdown), with its plot
# in runs/depth_table/depth_table.png. Extra arguments go to the command, e.g.
#   bash scripts/main.sh --train --budget quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
.venv/bin/dnl-zoo data prepare fashion_mnist \
  --source /usr/share/datasets/fashion-mnist --data-dir "$data_dir" > /dev/null
.venv/bin/dnl-zoo reproduce depth-table --data-dir "$data_dir" "$@"
