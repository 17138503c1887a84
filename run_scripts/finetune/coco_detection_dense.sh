#!/usr/bin/env bash
# COCO detection with the dense DAMO-YOLO head (one forward pass; docs/dense_detection.md). Data
# (tasks/coco_detection_dense.yaml): $COCO_ROOT/annotations/instances_train2017.json, images
# $COCO_ROOT/train2017/ (instances_val2017.json + val2017/ for evaluation).
# Settings: ofa_ufo/training/configs/finetune/coco_detection_dense.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated scenes, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/coco_detection_dense "$@"
