#!/usr/bin/env bash
# Face recognition fine-tuning scored on LFW (UFO AllInOne face settings). Data (tasks/lfw.yaml):
#   $FACE_TRAIN_ROOT/<identity>/<image> (training, e.g. MS1MV3 or CASIA-WebFace unpacked to JPEGs),
#   $LFW_ROOT/pairs.txt and $LFW_ROOT/<name>/<name>_<number>.jpg (evaluation).
# Settings: ofa_ufo/training/configs/finetune/lfw.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated faces, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/lfw "$@"
