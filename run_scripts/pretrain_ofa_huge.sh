#!/usr/bin/env bash
# OFA-Huge pretraining. With $OFA_PRETRAIN_DATA set (a folder of canonical JSON Lines per task, streamed, see
# docs/training.md) it runs OFA's recipe (config pretrain_ofa_huge); with no data it runs the embedded
# default on generated demo scenes (config pretrain_demo_base). Arguments are passed to the trainer: config
# overrides as key=value (max_steps=100 model_overrides={image_size: 128}) or --resume never.
source "$(dirname "$0")/_env.sh"
if [ -n "${OFA_PRETRAIN_DATA:-}" ]; then
  exec python -m ofa_ufo.training --config pretrain_ofa_huge "$@"
fi
# embedded default: the tiny's warm-up recipe on Huge itself: its 16 heads of 80 cannot hold the tiny's heads of 64, so it is not grown
exec python -m ofa_ufo.training --config pretrain_demo_base model=ofa_ufo_huge output_dir=checkpoints/ofa_ufo_huge.pretrain_demo "grow_from=''" 'grow_overrides=[]' stem_warmup_images=19200 stem_warmup_subcells=4 max_steps=100 "$@"
