#!/usr/bin/env bash
# Main job. With no data configured it runs the embedded default: OFA-Base architecture trained
# for a few steps on generated demo scenes (caption, VQA, grounding), saved with save_pretrained,
# reloaded through pipeline("ofa-ufo") and shown predicting. Arguments are passed through,
# e.g. `bash run_scripts/pretrain_ofa_base.sh --steps 100 --image-size 256`.
source "$(dirname "$0")/_env.sh"
exec python -m ofa_ufo.training.demo --model ofa_ufo_base --output-dir checkpoints/ofa_ufo_base.pretrain_demo "$@"
