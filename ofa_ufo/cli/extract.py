"""`ofa-ufo extract`: a dense per-task subnet of a UFO supernet, saved as a model directory of its own.

    ofa-ufo extract --model SUPERNET_DIR --task grounding --output grounding_subnet/
    ofa-ufo extract --model SUPERNET_DIR --task grounding --arch smallest --output grounding_chip/

The subnet has no routers and only the expert each block routes the task to (`ofa_ufo.extract_subnet`);
`pipeline("ofa-ufo", model=OUTPUT)` serves it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from transformers import AutoModelForSeq2SeqLM, AutoProcessor

from ofa_ufo.deploy.subnets import extract_subnet, largest_arch, smallest_arch

ARCHS = {"current": None, "largest": largest_arch, "smallest": smallest_arch}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ofa-ufo extract", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="a save_pretrained directory of a routed supernet")
    p.add_argument("--task", required=True, help="the task whose route to keep (one of the model's task_names)")
    p.add_argument("--output", required=True, help="the directory to write")
    p.add_argument("--arch", choices=ARCHS, default="current",
                   help="elastic arch: the model's current one (default), or the largest / smallest of its ranges")
    args = p.parse_args(argv)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    arch = ARCHS[args.arch](model.config) if ARCHS[args.arch] else None
    subnet = extract_subnet(model, args.task, arch)
    subnet.save_pretrained(args.output)
    AutoProcessor.from_pretrained(args.model).save_pretrained(args.output)
    kept = sum(p.numel() for p in subnet.parameters())
    print(f"wrote {args.output}: task {args.task!r}, {kept / 1e6:.1f}M parameters "
          f"(supernet {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)")
    return 0
