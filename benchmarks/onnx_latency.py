"""Generation latency and token agreement: PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    .venv/bin/python benchmarks/onnx_latency.py [--preset ofa_ufo_tiny] [--image-size 256] [--beams 5]
        [--new-tokens 16] [--repeats 15] [--threads N] [--model DIR] [--images 8] [--demo-scenes]
        [--task caption|vqa|classification] [--unsimplified]

The model is a randomly initialised preset, or a trained `save_pretrained` directory (`--model`), exported
with `ofa_ufo.deploy.onnx_export.export_onnx`: fp32; int8 through ONNX Runtime's dynamic quantisation
(convolutions fp32); and int8 with int8 convolutions too, calibrated on `--calibration-images` images
that are not among the agreement images; with `--unsimplified` also fp32 and int8 graphs as traced
(`simplify=False`: onnxslim's folding of the shape arithmetic left out). Latency is the median wall
time of one `generate` call of `--task` (default caption; batch 1, beam search), twice: with exactly
`--new-tokens` new tokens so that every backend does the same work (end-of-sequence banned),
and at free length, the request as served (each backend's own answer for the first fixture; its token
agreement says whether the work was the same), the backends timed in interleaved rounds after a
warm-up (`ofa_ufo.core.timing.interleaved_times`: the machine's drift is shared, not handed to the
ratios), with the same thread count for torch and ONNX Runtime.
Token agreement compares each ONNX backend's beam-search tokens with PyTorch's on `--images` images
(free length): the share of sequences that are identical and of token positions that agree. Images are
smooth random colour fields, or with `--demo-scenes` generated demo scenes (for a model trained on
them). On a random model int8 agreement is a floor: its logits are nearly flat, so small int8 errors
flip the argmax.
"""

from __future__ import annotations

import argparse
import statistics
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
from ofa_ufo.core.timing import device_name, interleaved_times
from ofa_ufo.data.demo_examples import vqa_example
from ofa_ufo.data.demo_scenes import generate_scene
from ofa_ufo.deploy.onnx_export import export_onnx
from ofa_ufo.generation.constraints import end_banned
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


def fixtures(count: int, task: str, seed: int = 0, demo_scenes: bool = False) -> list[tuple[Image.Image, str]]:
    """(image, prompt) pairs of `task`: generated demo scenes (a VQA prompt asks one of the demo's
    answerable questions about its scene), or colour fields from `images` with a fixed question."""
    if not demo_scenes:
        question = "what color is the circle?" if task == "vqa" else None
        return [(image, get_task(task).prompt(question)) for image in images(count, seed)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = generate_scene(rng, 256)
        question = vqa_example(scene, rng)["text"] if task == "vqa" else None
        out.append((scene.image, get_task(task).prompt(question)))
    return out


def images(count: int, seed: int = 0) -> list[Image.Image]:
    """Seeded random photos-to-be: smooth colour fields with noise, 320 x 240."""
    rng = np.random.default_rng(seed)
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
    parser.add_argument("--task", choices=("caption", "vqa", "classification"), default="caption")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--images", type=int, default=8, help="images for the token agreement")
    parser.add_argument("--calibration-images", type=int, default=16, help="images calibrating the int8 convolutions")
    parser.add_argument("--demo-scenes", action="store_true", help="demo scenes instead of colour fields")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--unsimplified", action="store_true",
                        help="also time the fp32 and int8 graphs as traced (export_onnx(simplify=False))")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, processor, what = load(args)
    backends = {"PyTorch fp32": model}
    requests = fixtures(args.images, args.task, 0, args.demo_scenes)
    calibration = [image for image, _ in fixtures(args.calibration_images, args.task, 1, args.demo_scenes)]
    exports = {"ORT fp32": {}, "ORT int8": {"quantize": "int8"},
               "ORT int8, int8 convs": {"quantize": "int8", "calibration": calibration}}
    if args.unsimplified:
        exports.update({"ORT fp32, not simplified": {"simplify": False},
                        "ORT int8, not simplified": {"quantize": "int8", "simplify": False}})
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, options) in enumerate(exports.items()):
            start = time.perf_counter()
            path = export_onnx(model, Path(scratch) / str(index), processor, **options)
            size = sum(p.stat().st_size for p in path.glob("*.onnx")) / 2**20
            print(f"export {name}: {time.perf_counter() - start:.1f} s, graphs {size:.0f} MiB")
            backends[name] = AutoModelForSeq2SeqLM.from_pretrained(path, threads=args.threads)
        timed = processor(images=[requests[0][0]], text=[requests[0][1]])
        free = dict(num_beams=args.beams, max_new_tokens=args.new_tokens)
        fixed = dict(free, logits_processor=end_banned(model.generation_config.eos_token_id))
        with torch.inference_mode():
            times = interleaved_times({name: (lambda b=backend: b.generate(**timed, **fixed))
                                       for name, backend in backends.items()}, rounds=args.repeats)
            free_times = interleaved_times({name: (lambda b=backend: b.generate(**timed, **free))
                                            for name, backend in backends.items()}, rounds=args.repeats)
            tokens = {name: [backend.generate(**processor(images=[image], text=[prompt]), **free)[0].tolist()
                             for image, prompt in requests] for name, backend in backends.items()}
        rows = [(name, statistics.median(times[name]), statistics.median(free_times[name])) for name in backends]
    print(f"\n{what}; {args.task}, batch 1, beam {args.beams}, {args.new_tokens} new tokens; "
          f"median of {args.repeats} interleaved rounds after a warm-up")
    print(device_name(), f"| ONNX Runtime {onnxruntime.__version__} threads {args.threads} | "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    answer = len(tokens["PyTorch fp32"][0]) - 1  # new tokens, the end-of-sequence included
    print(f"\n| backend | latency, {args.new_tokens} tokens (ms) | / PyTorch fp32 | latency, free length "
          f"(PyTorch: {answer} new tokens) (ms) | / PyTorch fp32 | identical sequences | agreeing tokens |")
    print("|---|---|---|---|---|---|---|")
    base, free_base = rows[0][1], rows[0][2]
    for name, seconds, free_seconds in rows:
        same, agree = agreement(tokens["PyTorch fp32"], tokens[name])
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.2f}x | {1e3 * free_seconds:.1f} | "
              f"{free_seconds / free_base:.2f}x | {same:.0%} | {agree:.1%} |")


if __name__ == "__main__":
    main()
