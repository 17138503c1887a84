#!/usr/bin/env bash
# COCO captioning fine-tuning in OFA's two stages (OFA-Base settings):
#   1. cross-entropy (ofa_ufo/training/configs/finetune/coco_caption.yaml) -> checkpoints/coco_caption
#   2. SCST with a CIDEr-D reward (finetune/coco_caption_scst.yaml), from stage 1's model
#      -> checkpoints/coco_caption_scst
# Data: tasks/coco_caption.yaml, i.e. Karpathy's $COCO_ROOT/annotations/dataset_coco.json with images
# $COCO_ROOT/<filepath>/<filename> (train2014/, val2014/): trains on train+restval (one example per caption),
# evaluates on the 5,000 test images against all their captions. docs/finetuning.md has the details.
# Usage: coco_caption.sh [--stage 1|2] [--demo] [--resume ...] [key=value ...]
#   --stage 1|2      run one stage only (default: both)
#   output_dir=DIR   stage 1 writes DIR, stage 2 reads DIR and writes DIR_scst
#   model=DIR        the model stage 1 starts from (with --stage 2: the model SCST starts from)
# Other arguments pass through to `python -m ofa_ufo.training` for both stages.
source "$(dirname "$0")/../_env.sh"
stage=all
out=checkpoints/coco_caption
model=()
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="${2:-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    --stage=*) stage="${1#*=}"; shift ;;
    output_dir=*) out="${1#*=}"; shift ;;
    model=*) model=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$stage" in
  1|2|all) ;;
  *) echo "coco_caption.sh: --stage must be 1 or 2, got '$stage'" >&2; exit 2 ;;
esac
if [ "$stage" != 2 ]; then
  echo "[coco_caption] stage 1: cross-entropy -> $out"
  python -m ofa_ufo.training --config finetune/coco_caption "${model[@]}" output_dir="$out" "${args[@]}"
fi
if [ "$stage" != 1 ]; then
  start="$out"
  if [ "$stage" = 2 ] && [ ${#model[@]} -gt 0 ]; then start="${model[0]#model=}"; fi
  if [ ! -d "$start" ]; then
    echo "coco_caption.sh: stage 2 (SCST) starts from stage 1's model, but $start is not a directory;" \
         "run --stage 1 first or pass model=DIR (a save_pretrained directory)" >&2
    exit 2
  fi
  echo "[coco_caption] stage 2: SCST from $start -> ${out}_scst"
  exec python -m ofa_ufo.training --config finetune/coco_caption_scst model="$start" output_dir="${out}_scst" \
    "${args[@]}"
fi
