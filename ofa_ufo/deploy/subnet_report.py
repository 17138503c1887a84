"""Parameters and measured latency of a supernet checkpoint, each task subnet and a chip subnet.

    python -m ofa_ufo.deploy.subnet_report --model DIR [--repeats 3] [--image-size 384]

Latency is the median wall time of one image-and-prompt forward (encoder + one decoder step)
at batch 1 on this machine, after a warmup.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.deploy.subnets import extract_subnet, smallest_arch
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration


def _latency(model, task_ids: torch.Tensor | None, image_size: int, repeats: int) -> float:
    inputs = dict(input_ids=torch.tensor([[0, 100, 200, 2]]), pixel_values=torch.randn(1, 3, image_size, image_size),
                  decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    if task_ids is not None:
        inputs["task_ids"] = task_ids
    with torch.inference_mode():
        return median_time(lambda: model(**inputs, use_cache=False), repeats)


def report(model, image_size: int, repeats: int) -> list[tuple[str, float, float]]:
    """Rows (name, parameters in millions, latency in ms)."""
    def row(name, net, ids=None):
        return name, sum(p.numel() for p in net.parameters()) / 1e6, 1e3 * _latency(net, ids, image_size, repeats)

    vision = model.config.vision_config
    rows = [row("supernet (routed, caption)", model, torch.tensor([vision.route_id("caption")]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained routers are reported once below, not per task
        rows += [row(f"subnet {task}", extract_subnet(model, task)) for task in vision.task_names]
        rows.append(row("chip subnet caption (smallest arch)", extract_subnet(model, "caption", smallest_arch(model.config))))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.deploy.subnet_report", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a save_pretrained directory with a routed supernet")
    parser.add_argument("--image-size", type=int, help="input size (default: the model config's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = OFAUFOForConditionalGeneration.from_pretrained(args.model).eval()
    image_size = args.image_size or model.config.image_size
    print(f"measured on {device_name()}")
    print(f"| model ({image_size} px, batch 1) | params (M) | latency (ms) |\n|---|---|---|")
    for name, params, latency in report(model, image_size, args.repeats):
        print(f"| {name} | {params:.2f} | {latency:.1f} |")


if __name__ == "__main__":
    main()
