#!/usr/bin/env bash
# ImageNet-1K fine-tuning (OFA settings). Data (tasks/imagenet.yaml):
#   $IMAGENET_ROOT/train/<class>/<image> ($IMAGENET_ROOT/val/ for evaluation).
# Settings: ofa_ufo/training/configs/finetune/imagenet.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated scenes, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/imagenet "$@"
