# Sourced by the run scripts: create or reuse the project's virtual environment (.venv).
# Pins torch to the CPU build (see ../shared/reference/environment.md) as constraint and build
# constraint so pip never pulls a multi-GB CUDA wheel, then installs this package (editable).
# Re-installs only when setup.py or the pins change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OFA_UFO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/.ci/constraints.txt"
STAMP="$VENV/.ofa_ufo_install_stamp"
want="$(cat "$ROOT/setup.py" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[env] installing ofa_ufo and its dependencies (torch pinned by $CONSTRAINTS)"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS" "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS" \
    --config-settings editable_mode=compat -e "$ROOT[test]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$ROOT/.cache/huggingface}"
cd "$ROOT"
