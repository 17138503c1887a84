#!/usr/bin/env bash
# The test command: set up (or reuse) .venv, then run the default test suite.
# Extra arguments go to pytest, e.g. `bash run_scripts/test.sh -m slow`.
source "$(dirname "$0")/_env.sh"
exec python -m pytest -q "$@"
