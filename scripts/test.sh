#!/usr/bin/env bash
# Run the test suite: creates .venv if missing, installs glowtrain with its test extra, lints with ruff, runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_flows.py -k logdet
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -m ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
