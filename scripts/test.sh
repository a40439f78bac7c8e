#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; prints how long the tests took.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$SECONDS
status=0
.venv/bin/python -m pytest "$@" || status=$?
elapsed=$((SECONDS - start))
printf 'test suite: %dm%02ds wall time (pytest exit status %d)\n' $((elapsed / 60)) $((elapsed % 60)) "$status"
exit "$status"
