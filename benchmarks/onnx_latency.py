"""Caption latency and token agreement: PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    .venv/bin/python benchmarks/onnx_latency.py [--preset ofa_ufo_tiny] [--image-size 256] [--beams 5]
        [--new-tokens 16] [--repeats 5] [--threads N] [--model DIR] [--images 8]

The model is a randomly initialised preset, or a trained `save_pretrained` directory (`--model`), exported
with `ofa_ufo.deploy.onnx_export.export_onnx` (fp32, and int8 through ONNX Runtime's dynamic
quantisation). Latency is the median wall time of one `generate` call (batch 1, beam search, exactly
`--new-tokens` new tokens so that every backend does the same work) after a warm-up, with the same
thread count for torch and ONNX Runtime (`ofa_ufo.core.timing`, which also names the CPU). Token
agreement compares each ONNX backend's beam-search tokens with PyTorch's on `--images` images
(free length): the share of sequences that are identical and of token positions that agree. On a random
model int8 agreement is a floor: its logits are nearly flat, so small int8 errors flip the argmax.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

import ofa_ufo
from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.deploy.onnx_export import export_onnx
from ofa_ufo.tasks import get_task


def load(args: argparse.Namespace):
    """(model, processor, what it is) from --model or a random --preset."""
    if args.model:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
        return model, AutoProcessor.from_pretrained(args.model), args.model
    torch.manual_seed(0)
    model = ofa_ufo.create_model(args.preset, image_size=args.image_size).eval()
    processor = ofa_ufo.create_processor(args.preset, image_size=args.image_size)
    return model, processor, f"{args.preset} (random init), {args.image_size} px"


def images(count: int) -> list[Image.Image]:
    """Seeded random photos-to-be: smooth colour fields with noise, 320 x 240."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        base = rng.integers(0, 256, (3, 4, 3)).astype(np.float32)
        field = np.array(Image.fromarray(base.astype(np.uint8)).resize((320, 240), Image.BICUBIC), dtype=np.float32)
        out.append(Image.fromarray(np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)))
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(share of identical sequences, share of agreeing positions over the longer of each pair)."""
    same = sum(a == b for a, b in zip(reference, other)) / len(reference)
    agree = total = 0
    for a, b in zip(reference, other):
        total += max(len(a), len(b))
        agree += sum(x == y for x, y in zip(a, b))
    return same, agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="ofa_ufo_tiny")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", help="a trained save_pretrained directory instead of a random preset")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8, help="images for the token agreement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, processor, what = load(args)
    prompt = get_task("caption").prompt()
    backends = {"PyTorch fp32": model}
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("fp32", "int8"):
            start = time.perf_counter()
            quantize = None if precision == "fp32" else precision
            path = export_onnx(model, Path(scratch) / precision, processor, quantize=quantize)
            size = sum(p.stat().st_size for p in path.glob("*.onnx")) / 2**20
            print(f"export {precision}: {time.perf_counter() - start:.1f} s, graphs {size:.0f} MiB")
            backends[f"ORT {precision}"] = AutoModelForSeq2SeqLM.from_pretrained(path, threads=args.threads)
        photos = images(args.images)
        timed = processor(images=photos[:1], text=[prompt])
        fixed = dict(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        free = dict(num_beams=args.beams, max_new_tokens=args.new_tokens)
        rows, tokens = [], {}
        for name, backend in backends.items():
            with torch.inference_mode():
                seconds = median_time(lambda: backend.generate(**timed, **fixed), repeats=args.repeats)
                tokens[name] = [backend.generate(**processor(images=[p], text=[prompt]), **free)[0].tolist()
                                for p in photos]
            rows.append((name, seconds))
    print(f"\n{what}; caption, batch 1, beam {args.beams}, {args.new_tokens} new tokens; "
          f"median of {args.repeats} after a warm-up")
    print(device_name(), f"| ONNX Runtime {onnxruntime.__version__} threads {args.threads} | "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("\n| backend | latency (s) | vs PyTorch | identical sequences | agreeing tokens |")
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for name, seconds in rows:
        same, agree = agreement(tokens["PyTorch fp32"], tokens[name])
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {same:.0%} | {agree:.1%} |")


if __name__ == "__main__":
    main()
