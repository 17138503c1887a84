#!/usr/bin/env bash
# RefCOCO+ grounding fine-tuning (OFA-Base settings). Data (tasks/refcocoplus.yaml):
#   $REFCOCO_ROOT/refcoco+/refs(unc).p (as distributed; read without running code, see docs/data.md),
#   $REFCOCO_ROOT/refcoco+/instances.json, images $COCO_ROOT/train2014/; split train (val for evaluation).
# Settings: ofa_ufo/training/configs/finetune/refcocoplus.yaml; docs/finetuning.md has the details.
# Arguments pass through to `python -m ofa_ufo.training`: --demo (generated scenes, no dataset),
# --resume auto|never|DIR, and key=value config overrides, e.g. model=DIR max_steps=500.
source "$(dirname "$0")/../_env.sh"
exec python -m ofa_ufo.training --config finetune/refcocoplus "$@"
