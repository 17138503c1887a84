#!/usr/bin/env bash
# The test command: set up (or reuse) .venv, then run the default test suite.
# Extra arguments go to pytest, e.g. `bash run_scripts/test.sh -m slow`; `-n 0` runs it in one process.
# pytest-xdist runs one worker per core (tests/conftest.py gives each worker its share of the cores' threads);
# tests marked with one xdist_group (the multi-process runs, the browser) run on one worker, one at a time.
source "$(dirname "$0")/_env.sh"
exec python -m pytest -q -n auto --dist loadgroup "$@"
