#!/usr/bin/env bash
# Sets up .venv and the local Fashion-MNIST, then runs the main job: evaluate
# every shipped checkpoint and print the depth table (Markdown), with its plot
# in runs/depth_table/depth_table.png. Extra arguments go to the command, e.g.
#   bash scripts/main.sh --train --budget quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data_dir=$(bash scripts/prepare_data.sh)
.venv/bin/dnl-zoo reproduce depth-table --data-dir "$data_dir" "$@"
