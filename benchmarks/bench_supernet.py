"""UFO supernet speed, side by side in one run: routed supernet vs extracted task subnet vs a dense
model of the same dims built directly; a chip subnet (about a quarter of the supernet FLOPs) vs the
full task subnet; a mixed-task batch of 8 vs 8 single-task calls.

    .venv/bin/python benchmarks/bench_supernet.py [--model ofa_ufo_tiny_ufo] [--image-size 256] [--repeats 5]

Latency is the median wall time of one forward (encoder + one decoder step) after a warmup, in
`torch.inference_mode()`, on this machine's CPU (`ofa_ufo.core.timing`, which also names the CPU).
The chip comparison times the supernet module alone (ResNet + OFA layers are identical in both and
would hide it); FLOPs are counted with `torch.utils.flop_counter` plus attention
(2 * B * H * N^2 * head_dim * 2).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import ofa_ufo
from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.deploy.subnets import extract_subnet
from ofa_ufo.models.ufo import SupernetArch


def full_forward(model, batch: int, image_size: int, task_ids: torch.Tensor | None):
    inputs = dict(input_ids=torch.tensor([[0, 100, 200, 300, 2]] * batch),
                  pixel_values=torch.randn(batch, 3, image_size, image_size),
                  decoder_input_ids=torch.zeros(batch, 1, dtype=torch.long))
    if task_ids is not None:
        inputs["task_ids"] = task_ids
    return lambda: model(**inputs, use_cache=False)


def supernet_flops(supernet, tokens: torch.Tensor, ids: torch.Tensor, task_ids: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        supernet(tokens, ids, task_ids)
    arch = supernet.arch or supernet.largest_arch()
    n = tokens.shape[1]
    attention = sum(4 * tokens.shape[0] * arch.heads[i] * n * n * supernet.blocks[i].attn.head_dim for i in range(arch.depth))
    return counter.get_total_flops() + attention


def dense_twin(model, task: str):
    """A dense model with the extracted subnet's dims but its own random weights, built directly."""
    subnet_config = extract_subnet(model, task).config
    torch.manual_seed(1)
    return ofa_ufo.OFAUFOForConditionalGeneration(copy.deepcopy(subnet_config)).eval()


def quarter_arch(supernet) -> SupernetArch:
    """Half the depth, half the heads, half the FFN width: about a quarter of the supernet FLOPs."""
    full = supernet.largest_arch()
    depth = max(1, full.depth // 2)
    return SupernetArch(depth, tuple(max(1, h // 2) for h in full.heads[:depth]), tuple(h // 2 for h in full.hidden[:depth]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ofa_ufo_tiny_ufo")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task", default="grounding")
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    model = ofa_ufo.create_model(args.model, image_size=args.image_size).eval()
    one = torch.tensor([model.config.vision_config.route_id(args.task)])
    subnet, twin = extract_subnet(model, args.task), dense_twin(model, args.task)
    rows = []
    print(f"{args.model} at {args.image_size} px, task {args.task!r}, median of {args.repeats}; {device_name()}")
    with torch.inference_mode():
        routed = median_time(full_forward(model, 1, args.image_size, one), args.repeats)
        extracted = median_time(full_forward(subnet, 1, args.image_size, None), args.repeats)
        direct = median_time(full_forward(twin, 1, args.image_size, None), args.repeats)
    rows += [("routed supernet (1 task), ms", routed * 1e3, ""), ("extracted task subnet, ms", extracted * 1e3, ""),
             ("dense model of the same dims, ms", direct * 1e3, ""),
             ("routed / extracted", routed / extracted, "<= 1.05"), ("extracted / dense", extracted / direct, "<= 1.03")]

    supernet = subnet.get_encoder().supernet
    grid = args.image_size // 16
    tokens, ids = torch.randn(1, grid * grid, 1024), torch.arange(1, grid * grid + 1)
    chip = extract_subnet(model, args.task, quarter_arch(model.get_encoder().supernet)).get_encoder().supernet
    zero = torch.zeros(1, dtype=torch.long)
    full_flops, chip_flops = supernet_flops(supernet, tokens, ids, zero), supernet_flops(chip, tokens, ids, zero)
    with torch.inference_mode():
        full_time = median_time(lambda: supernet(tokens, ids, zero), args.repeats * 4)
        chip_time = median_time(lambda: chip(tokens, ids, zero), args.repeats * 4)
    rows += [("chip / task subnet, supernet FLOPs", chip_flops / full_flops, "about 0.25"),
             ("chip / task subnet, supernet latency", chip_time / full_time, "<= 0.35")]

    tasks = model.config.vision_config.task_names
    mixed_ids = torch.tensor([model.config.vision_config.route_id(tasks[i % len(tasks)]) for i in range(8)])
    with torch.inference_mode():
        mixed = median_time(full_forward(model, 8, args.image_size, mixed_ids), args.repeats)
        singles = median_time(
            lambda: [full_forward(model, 1, args.image_size, mixed_ids[i : i + 1])() for i in range(8)],
            max(1, args.repeats // 2))
    rows += [("mixed-task batch of 8, ms", mixed * 1e3, ""), ("8 single-task calls, ms", singles * 1e3, ""),
             ("singles / mixed batch", singles / mixed, "")]
    print("| metric | value | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value:.3f} | {goal} |")


if __name__ == "__main__":
    main()
