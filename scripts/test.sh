#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; prints how long the tests took.
#
# The tests run in TEST_WORKERS pytest-xdist processes (default 3; 0 runs them in this
# process), one test module per process at a time (--dist loadfile: a module's shared
# node, Orthanc or model is started once), the longest modules first (tests/conftest.py;
# --no-loadscope-reorder keeps that order). More processes than the 2 cores of the
# reference machine pay: most tests spend most of their time waiting for a node, an
# Orthanc or a timeout. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${TEST_WORKERS:-3}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
start=$SECONDS
status=0
.venv/bin/python -m pytest "${parallel[@]}" --durations=15 "$@" || status=$?
elapsed=$((SECONDS - start))
printf 'test suite: %dm%02ds wall time with %s worker process(es) (pytest exit status %d)\n' \
  $((elapsed / 60)) $((elapsed % 60)) "$workers" "$status"
exit "$status"
