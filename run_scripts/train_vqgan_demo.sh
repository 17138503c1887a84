#!/usr/bin/env bash
# Train the demo VQGAN (preset vqgan_demo, 64 px, 8x8 codes) on generated demo scenes; it writes the
# VQGAN, metrics.json (held-out PSNR and codebook usage before and after) and reconstructions.png to
# checkpoints/vqgan_demo.demo_scenes, the `vqgan` of the config pretrain_demo_t2i. Arguments go to
# python -m ofa_ufo.training.vqgan_train, e.g. --steps 100 --output-dir /tmp/vqgan (see docs/vqgan.md).
source "$(dirname "$0")/_env.sh"
exec python -m ofa_ufo.training.vqgan_train --preset vqgan_demo --image-size 64 --object-weight 4 "$@"
