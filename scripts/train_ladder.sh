#!/usr/bin/env bash
# Trains the shipped Fashion-MNIST ladders with the project's train command and
# exports each finished run into checkpoints/ with its manifest entry.
#
#   bash scripts/train_ladder.sh                      # every rung, in order
#   bash scripts/train_ladder.sh dnl_conv_n2 ...      # some rungs
#   bash scripts/train_ladder.sh --park               # keep unfinished runs in git
#
# A run that is interrupted resumes from runs/ladder/NAME when started again.
# runs/ is not committed: --park copies the latest training checkpoint (with
# optimiser state) of every unfinished run to checkpoints/training/NAME, from
# which a fresh clone resumes; the export of the finished run removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --park ]; then
  for run in runs/ladder/*/; do
    name=$(basename "$run")
    [ -f "checkpoints/$name/model.json" ] && continue
    latest=$(ls "$run/checkpoints" 2> /dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
    [ -n "$latest" ] || continue
    rm -rf "checkpoints/training/$name"
    mkdir -p "checkpoints/training/$name/checkpoints"
    cp -r "$run/checkpoints/$latest" "checkpoints/training/$name/checkpoints/"
    cp "$run/metrics.jsonl" "checkpoints/training/$name/"
    # Orbax's commit markers name the absolute path they were written to.
    find "checkpoints/training/$name" -name commit_success.txt -delete
    echo "parked $name at step $latest"
  done
  exit 0
fi

bash scripts/setup.sh
data_dir=$(bash scripts/prepare_data.sh)

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(dnl_conv_n1 dnl_conv_n2 dnl_conv_n4 dnl_conv_n8 dnl_nonlocal_n1
    dnl_nonlocal_n2 dnl_nonlocal_n4 dnl_nonlocal_n8
    densenet_bc16_k12_fmnist densenet_bc22_k12_fmnist densenet_bc28_k12_fmnist
    densenet_bc40_k12_fmnist)
fi
for name in "${names[@]}"; do
  case $name in
    densenet_*) config=configs/fmnist_densenet_bc_ladder.py ;;
    dnl_*) config=configs/fmnist_dnl_ladder.py ;;
    *) echo "no ladder config for $name" >&2; exit 2 ;;
  esac
  if [ -f "checkpoints/$name/model.json" ] && [ -z "${RETRAIN:-}" ]; then
    echo "== $name: shipped already (RETRAIN=1 trains and exports it again)"
    continue
  fi
  workdir=runs/ladder/$name
  if [ ! -d "$workdir" ] && [ -d "checkpoints/training/$name" ]; then
    mkdir -p runs/ladder
    cp -r "checkpoints/training/$name" "$workdir"
  fi
  mkdir -p "$workdir"
  echo "== $name: $config -> $workdir"
  .venv/bin/dnl-zoo train --config "$config" --workdir "$workdir" \
    --config.model.name="$name" --config.dataset.data_dir="$data_dir"
  .venv/bin/dnl-zoo export "$name" --config "$config" --workdir "$workdir" \
    --config.dataset.data_dir="$data_dir"
  rm -rf "checkpoints/training/$name"
done
