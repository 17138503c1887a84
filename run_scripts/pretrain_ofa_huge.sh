#!/usr/bin/env bash
# OFA-Huge pretraining. With $OFA_PRETRAIN_DATA set (a folder of canonical JSON Lines per task, streamed, see
# docs/training.md) it runs OFA's recipe (config pretrain_ofa_huge); with no data it runs the embedded
# default on generated demo scenes (config pretrain_demo_base). Arguments are passed to the trainer: config
# overrides as key=value (max_steps=100 model_overrides={image_size: 128}) or --resume never.
source "$(dirname "$0")/_env.sh"
if [ -n "${OFA_PRETRAIN_DATA:-}" ]; then
  exec python -m ofa_ufo.training --config pretrain_ofa_huge "$@"
fi
# embedded default: Huge's 16 heads of 80 cannot hold the tiny's heads of 64, so the tiny default is trained with
# heads of 80 (d_model 320, 4 heads, FFN 1280: a quarter of Huge's widths) and grown 4x; 50 Huge steps after it
SMALL="'model_overrides={image_size: 64, dropout: 0.0, d_model: 320, encoder_attention_heads: 4, decoder_attention_heads: 4, encoder_ffn_dim: 1280, decoder_ffn_dim: 1280}'"
exec python -m ofa_ufo.training --config pretrain_demo_base model=ofa_ufo_huge output_dir=checkpoints/ofa_ufo_huge.pretrain_demo "grow_overrides=[eval_every=0, $SMALL, output_dir=checkpoints/ofa_ufo_tiny_h80.pretrain_demo]" max_steps=50 "$@"
