#!/usr/bin/env bash
# Run the test suite: creates .venv if missing, installs glowtrain with its test extra, lints with ruff, runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_flows.py -k logdet (add -n 0 to run in this process,
# as --pdb needs).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -m ruff check --quiet .
# One pytest worker per core (pytest-xdist), at most 8: the tests run one thread each, and many wait on processes
# they start. On a GPU the suite runs in one process: its device tests were checked one at a time on one card.
workers=$(.venv/bin/python -c 'import math, os
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
try:  # a container limited to part of the machine (cgroup v2 quota): its share, not every core it can see
    quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
    cpus = min(cpus, math.ceil(int(quota) / int(period))) if quota != "max" else cpus
except (OSError, ValueError):
    pass
workers = min(cpus, 8)
print(workers if workers > 1 else 0)')
case "${GLOWTRAIN_TEST_DEVICE:-cpu}" in cuda*) workers=0 ;; esac
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
