#!/usr/bin/env bash
# Market-1501 person ReID fine-tuning (UFO AllInOne person settings). Data (tasks/market1501.yaml):
#   $MARKET1501_ROOT/bounding_box_train/ (training), query/ and bounding_box_test/ (evaluation).
# Settings: ofa_ufo/training/configs/finetune/market1501.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated people, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/market1501 "$@"
