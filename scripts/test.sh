#!/usr/bin/env bash
# Sets up .venv, then runs the linters and the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/ruff format --check .
.venv/bin/ruff check .
# Two workers, one test file each at a time: the suite is mostly
# compiling, which leaves a core idle in a single process.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
