#!/usr/bin/env bash
# VeRi-776 vehicle ReID fine-tuning (UFO AllInOne vehicle settings). Data (tasks/veri776.yaml):
#   $VERI776_ROOT/image_train/ (training), image_query/ and image_test/ (evaluation).
# Settings: ofa_ufo/training/configs/finetune/veri776.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated vehicles, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/veri776 "$@"
