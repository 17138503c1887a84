#!/usr/bin/env bash
# Stanford Online Products retrieval fine-tuning (UFO AllInOne product settings). Data (tasks/sop.yaml):
#   $SOP_ROOT/Ebay_train.txt (training), $SOP_ROOT/Ebay_test.txt (evaluation), images under $SOP_ROOT.
# Settings: ofa_ufo/training/configs/finetune/sop.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated products, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/sop "$@"
