"""Embeddings per second for a gallery batch (AllInOne tasks): routed UFO supernet vs the task's
extracted dense subnet, side by side in one run, same weights and images.

    .venv/bin/python benchmarks/bench_embeddings.py [--model ofa_ufo_tiny_ufo] [--image-size 256] \
        [--batch 64] [--repeats 3] [--tasks reid_person face] [--readout decoder|image]

Each figure is the median wall time of `model.embed` (`--readout decoder`: encoder + one decoder
step; `image`: the image embedding only, docs/retrieval.md) on one batch of `--batch` images with the task's prompt, after an untimed warm-up, in
`torch.inference_mode()` on this machine's CPU; the table also gives the largest difference
between the two models' embeddings (they must agree to 1e-5).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import ofa_ufo
from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.deploy.subnets import extract_subnet
from ofa_ufo.hf.configuration import EMBEDDING_READOUTS
from ofa_ufo.tasks import get_task

EMBEDDING_TASKS = ("reid_person", "reid_vehicle", "face", "product")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ofa_ufo_tiny_ufo")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["reid_person", "face"], choices=EMBEDDING_TASKS)
    parser.add_argument("--readout", default="decoder", choices=EMBEDDING_READOUTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # extract_subnet warns that a random supernet was never trained
    model = ofa_ufo.create_model(args.model, image_size=args.image_size, embedding_readout=args.readout).eval()
    processor = ofa_ufo.create_processor(args.model, image_size=args.image_size)
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1  # (B, 3, S, S), normalised range
    print(f"{args.model} at {args.image_size} px, {args.readout} read-out, gallery batch {args.batch}, "
          f"median of {args.repeats}; {device_name()}")
    print("| task | supernet (emb/s) | subnet (emb/s) | subnet / supernet | max abs diff |\n|---|---|---|---|---|")
    for task in args.tasks:
        prompt = processor.tokenizer([get_task(task).prompt()] * args.batch, return_tensors="pt")
        ids = torch.full((args.batch,), model.config.vision_config.route_id(task))
        subnet = extract_subnet(model, task)

        def routed() -> torch.Tensor:
            return model.embed(pixels, prompt["input_ids"], prompt["attention_mask"], ids)

        def dense() -> torch.Tensor:
            return subnet.embed(pixels, prompt["input_ids"], prompt["attention_mask"])

        with torch.inference_mode():
            diff = (routed() - dense()).abs().max().item()
            routed_s, dense_s = median_time(routed, args.repeats), median_time(dense, args.repeats)
        print(f"| {task} | {args.batch / routed_s:.1f} | {args.batch / dense_s:.1f} | {routed_s / dense_s:.2f}x "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
