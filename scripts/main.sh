#!/usr/bin/env bash
# Sets up .venv, then runs the main job.
#
# NOTE: the main job of dnl_zoo is `dnl-zoo reproduce depth-table` (evaluate the
# shipped checkpoints and print the depth table). No checkpoint ships yet, so
# until then this runs a smaller real job: list the registry, then build
# DenseNet-BC-100 for Fashion-MNIST-sized input, print its stages and run a
# timed forward pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/dnl-zoo models
.venv/bin/dnl-zoo summary densenet_bc100_k12 --in-channels 1 --image-size 28
