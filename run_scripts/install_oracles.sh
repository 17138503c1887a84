#!/usr/bin/env bash
# Create (or reuse) .venv-oracle: torch pinned to the CPU wheel, ofa_ufo editable with [test], and the
# reference implementations used by the `oracle` tests (tests/test_parity_modelscope.py):
#   modelscope 1.40.2 (base install, no extras) + addict, and fairseq-fixed 0.12.3.1 (--no-deps, C++ build
#   of about 4 minutes) with the few runtime deps fairseq needs (see ../shared/reference/environment.md).
# Nothing in site-packages is edited: the four incompatibilities of modelscope's OFA with transformers 5
# are patched at import time by tests/oracle_shims.py.
# Usage: bash run_scripts/install_oracles.sh   then
#        .venv-oracle/bin/python -m pytest -m oracle tests/test_parity_modelscope.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OFA_UFO_ORACLE_VENV:-$ROOT/.venv-oracle}"
CONSTRAINTS="$ROOT/.ci/constraints.txt"
PIN=(-c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS")
STAMP="$VENV/.ofa_ufo_oracle_stamp"
want="$(cat "$ROOT/setup.py" "$CONSTRAINTS" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
start=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  echo "[oracle] creating virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[oracle] $VENV is up to date"
else
  "$PY" -m pip install -q -U pip
  "$PY" -m pip install -q "${PIN[@]}" "torch==2.13.0"
  "$PY" -m pip install -q "${PIN[@]}" --config-settings editable_mode=compat -e "$ROOT[test]"
  # modelscope: base install only (its extras downgrade datasets/hub/protobuf).
  "$PY" -m pip install -q "${PIN[@]}" "modelscope==1.40.2" addict einops "sentencepiece>=0.2"
  # fairseq 0.12.2 does not install on Python 3.11; the fork fairseq-fixed ships the same `fairseq` package.
  # cython/numpy must be present for its extension build; --no-deps keeps pip from touching torch.
  "$PY" -m pip install -q "${PIN[@]}" cython cffi
  "$PY" -m pip install -q "${PIN[@]}" --no-deps "fairseq-fixed==0.12.3.1"
  "$PY" -m pip install -q "${PIN[@]}" "hydra-core==1.3.2" "omegaconf==2.3.0" bitarray sacrebleu scikit-learn
  # taming-transformers (VQGAN parity, tests/test_vqgan_parity.py): --no-deps, its pins would replace torch.
  "$PY" -m pip install -q "${PIN[@]}" --no-deps "taming-transformers-rom1504==0.0.6"
  if "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
    echo "[oracle] WARNING: torchvision got installed; tests/oracle_shims.py defines its op schemas" >&2
  fi
  echo "$want" > "$STAMP"
fi
# Smoke check: modelscope's OFA imports through the shims.
(cd "$ROOT" && "$PY" -c "
import sys; sys.path.insert(0, 'tests')
import oracle_shims
OFAConfig, OFAModel = oracle_shims.modelscope_ofa()
print('[oracle] modelscope OFA ok:', OFAModel.__module__)
")
echo "[oracle] done in $((SECONDS - start)) s"
