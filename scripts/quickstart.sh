#!/usr/bin/env bash
# First run: creates .venv if missing, installs glowtrain, trains the bundled digits default
# (a few minutes on a laptop CPU) and samples a grid at temperature 0.7.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
.venv/bin/glowtrain fit --out "$run_dir" "$@"
echo
echo "samples at temperature 0.7:"
.venv/bin/glowtrain sample --run "$run_dir" --temp 0.7
echo
echo "next:  .venv/bin/glowtrain sample --run $run_dir --temp 0.5 --temp 1.0"
echo "       .venv/bin/tensorboard --logdir $run_dir/tb"
