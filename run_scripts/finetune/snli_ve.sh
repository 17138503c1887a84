#!/usr/bin/env bash
# SNLI-VE fine-tuning (OFA-Base settings). Data (tasks/snli_ve.yaml):
#   $SNLI_VE_ROOT/snli_ve_train.jsonl (snli_ve_dev.jsonl for evaluation),
#   images $FLICKR30K_ROOT/flickr30k_images/.
# Settings: ofa_ufo/training/configs/finetune/snli_ve.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated scenes, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/snli_ve "$@"
