#!/usr/bin/env bash
# VQA v2 fine-tuning (OFA-Base settings). Data (tasks/vqav2.yaml):
#   $VQA_ROOT/v2_OpenEnded_mscoco_train2014_questions.json, $VQA_ROOT/v2_mscoco_train2014_annotations.json,
#   images $COCO_ROOT/train2014/ (the val2014 files for evaluation, answers decoded through the trie over the
#   3,129 most frequent training answers).
# Settings: ofa_ufo/training/configs/finetune/vqav2.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated scenes, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/vqav2 "$@"
