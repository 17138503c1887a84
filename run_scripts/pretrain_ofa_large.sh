#!/usr/bin/env bash
# OFA-Large pretraining. With $OFA_PRETRAIN_DATA set (a folder of canonical JSON Lines per task, streamed, see
# docs/training.md) it runs OFA's recipe (config pretrain_ofa_large); with no data it runs the embedded
# default on generated demo scenes (config pretrain_demo_base). Arguments are passed to the trainer: config
# overrides as key=value (max_steps=100 model_overrides={image_size: 128}) or --resume never.
source "$(dirname "$0")/_env.sh"
if [ -n "${OFA_PRETRAIN_DATA:-}" ]; then
  exec python -m ofa_ufo.training --config pretrain_ofa_large "$@"
fi
# embedded default: grown 4x from the tiny default, like base, with fewer steps (a step costs about 3x Base's)
exec python -m ofa_ufo.training --config pretrain_demo_base model=ofa_ufo_large output_dir=checkpoints/ofa_ufo_large.pretrain_demo max_steps=200 "$@"
