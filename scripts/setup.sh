#!/usr/bin/env bash
# Creates .venv with the pinned packages of requirements/ci.txt and dnl_zoo
# itself (editable). Quick when nothing changed: a stamp records what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat requirements/ci.txt pyproject.toml | sha256sum | cut -d' ' -f1)

# Fashion-MNIST's original files, for the offline TFDS build (Debian package).
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq dataset-fashion-mnist
fi

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "setup: installing the pinned packages (about a minute on a fresh machine)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements/ci.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
