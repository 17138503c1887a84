#!/usr/bin/env python
"""Does a text-to-image model trained on demo scenes draw what its captions say? A colour test.

For held-out demo scenes ("val" split, never trained on) the model generates one image from each
scene's caption ("a red circle, a blue star and ..."). A simple pixel colour classifier reads the
generated image: every pixel goes to the nearest demo colour (object colours and background tones),
and the most frequent object colour is the image's dominant colour (none if object colours cover
under 2% of the pixels). Figures, as fractions of the scenes:

- `first_color`: the dominant colour is the caption's first colour (its leftmost object's);
- `any_color`: the dominant colour is one of the caption's colours.

The same is measured for (a) images generated from shuffled captions (another held-out scene's
caption; scored against the scene's own caption: chance), (b) the scenes themselves and (c) their
VQGAN reconstructions (what a perfect generator would score through this VQGAN). A small CNN, the
scene reader, trained here on VQGAN reconstructions of `--reader-images` training scenes to name the
shapes and colours present, then reads all four sets of images: the fractions whose most likely
shape (colour) is one the scene's caption names (`shape_named`, `color_named`).

Before any sampling it reports `caption_information`: the teacher-forced negative log-likelihood of
each scene's VQGAN codes under its own caption and under a shuffled one; their difference (nats per
image) is what the caption tells the model about the image (0 when it ignores the caption). The
same with only the first object's shape word (colour word) swapped for another, `shape_information`
(`color_information`), says what that one word tells it, whether or not sampling shows it yet.
`--information-only` stops there (seconds; for checkpoints during a run). It also reports
the PSNR of the model's (greedy) infilling of the held-out scenes, next to two references: the
VQGAN reconstruction of the whole scene (the ceiling) and of the scene with its centre left grey.

    python benchmarks/t2i_demo_eval.py --model checkpoints/ofa_ufo_tiny.pretrain_demo_t2i
    python benchmarks/t2i_demo_eval.py --model DIR --vqgan VQGAN_DIR --scenes 200 --output /tmp/t2i_eval
    python benchmarks/t2i_demo_eval.py --model DIR --guidance-scale 3   # classifier-free guidance

Writes `t2i_eval.json` and `t2i_samples.png` (per caption: the scene, its VQGAN reconstruction, the
model's image for the caption, the model's infilling of the scene) to `--output` (default: the model
directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa_ufo.data.demo_examples import caption_example, make_examples  # noqa: E402
from ofa_ufo.data.demo_scenes import (  # noqa: E402
    BACKGROUNDS,
    COLORS,
    DEFAULT_OBJECT_SIZE,
    SHAPES,
    DemoScenes,
    Scene,
    SceneObject,
)
from ofa_ufo.tasks.image_gen import image_to_pixels  # noqa: E402

MIN_OBJECT_FRACTION = 0.02  # below this share of object-coloured pixels an image has no dominant colour


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an OFA-UFO save_pretrained directory trained with text_to_image")
    parser.add_argument("--vqgan", default=None, help="VQGAN directory (default: <model>/vqgan)")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes (val split)")
    parser.add_argument("--max-objects", type=int, default=None,
                        help="objects per scene (default: demo_max_objects of the model's train_config.yaml, else 3)")
    parser.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="object side / image side (default: demo_object_size of the model's train_config.yaml, "
                             "else 0.15 0.45)")
    parser.add_argument("--seed", type=int, default=0, help="demo split seed and sampling seed")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of OFA's top-k 256 sampling")
    parser.add_argument("--reader-images", type=int, default=3000,
                        help="training scenes for the shape/colour reader (VQGAN reconstructions)")
    parser.add_argument("--reader-epochs", type=int, default=20,
                        help="passes over them (6 left the reader naming only 0.47 of big single shapes right)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: none; for models trained with caption_dropout)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--grid", type=int, default=8, help="captions shown in t2i_samples.png")
    parser.add_argument("--information-only", action="store_true",
                        help="only the caption-information figure (teacher-forced, no sampling; seconds)")
    parser.add_argument("--output", default=None, help="folder for t2i_eval.json and t2i_samples.png")
    args = parser.parse_args(argv)
    trained = _training_scenes(Path(args.model))
    if args.max_objects is None:
        args.max_objects = trained.get("demo_max_objects", 3)
    args.object_size = tuple(args.object_size or trained.get("demo_object_size", DEFAULT_OBJECT_SIZE))
    return args


def _training_scenes(model: Path) -> dict:
    """The demo-scene settings the model was trained with (its train_config.yaml), so that held-out
    scenes look like its training scenes; {} when the folder has no training config."""
    path = model / "train_config.yaml"
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {k: config[k] for k in ("demo_max_objects", "demo_object_size") if k in config}


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(COLORS) + [f"background:{b}" for b in BACKGROUNDS]
    return names, np.asarray(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)  # (K, 3)


def dominant_color(image) -> str | None:
    """The most frequent object colour (nearest demo colour per pixel, backgrounds excluded), or None
    when object colours cover less than MIN_OBJECT_FRACTION of the image."""
    names, palette = _palette()
    pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)  # (H*W, 3)
    nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)  # (H*W,)
    counts = Counter(names[i] for i in nearest if i < len(COLORS))
    if not counts or counts.most_common(1)[0][1] < MIN_OBJECT_FRACTION * len(pixels):
        return None
    return counts.most_common(1)[0][0]


def color_scores(images, scenes) -> dict[str, float]:
    """`first_color` and `any_color` match rates of `images` against the captions of `scenes`."""
    dominant = [dominant_color(image) for image in images]
    first = [d == scene.objects[0].color for d, scene in zip(dominant, scenes)]
    named = [d in {o.color for o in scene.objects} for d, scene in zip(dominant, scenes)]
    return {"first_color": float(np.mean(first)), "any_color": float(np.mean(named)),
            "no_object_color": float(np.mean([d is None for d in dominant]))}


class SceneReader(torch.nn.Module):
    """A small CNN that names the shapes and colours present in a 64 px demo image (multi-label), trained
    here on VQGAN reconstructions of training scenes so that it reads what this VQGAN can draw."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 128):
            layers += [torch.nn.Conv2d(width, out, 3, stride=2, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
            width = out
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(width, len(SHAPES) + len(COLORS))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels))  # (B, shapes + colours) logits


def _labels(scene) -> torch.Tensor:
    target = torch.zeros(len(SHAPES) + len(COLORS))
    for o in scene.objects:
        target[SHAPES.index(o.shape)] = 1.0
        target[len(SHAPES) + list(COLORS).index(o.color)] = 1.0
    return target


def train_reader(vqgan, size: int, images: int, max_objects: int, seed: int,
                 object_size: tuple[float, float], epochs: int = 20) -> SceneReader:
    """Fit a SceneReader on `images` generated training scenes as this VQGAN reconstructs them."""
    torch.manual_seed(seed)
    scenes = DemoScenes("train", images, seed=seed + 1, max_objects=max_objects, object_size=object_size)
    pixels, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(scenes), 64):
            chunk = [scenes[i] for i in range(start, min(start + 64, len(scenes)))]
            batch = torch.cat([image_to_pixels(s.image, size, vqgan) for s in chunk])
            pixels.append(vqgan.decode(vqgan.encode(batch)).clamp(-1, 1))  # (b, 3, S, S)
            targets += [_labels(s) for s in chunk]
    pixels, targets = torch.cat(pixels), torch.stack(targets)
    reader = SceneReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(pixels)).split(64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(reader(pixels[idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return reader.eval()


def reader_scores(reader: SceneReader, images, scenes, size: int) -> dict[str, float]:
    """Fractions of `images` whose most likely shape (colour) per the reader is one the scene's caption
    names: `shape_named` (`color_named`)."""
    pixels = torch.stack([torch.from_numpy(np.asarray(i.convert("RGB").resize((size, size)), np.float32) / 127.5 - 1)
                          for i in images]).permute(0, 3, 1, 2)  # (N, 3, S, S)
    with torch.inference_mode():
        logits = reader(pixels)
    shapes, colors = logits[:, : len(SHAPES)].argmax(1), logits[:, len(SHAPES) :].argmax(1)
    shape = [SHAPES[int(k)] in {o.shape for o in s.objects} for k, s in zip(shapes, scenes)]
    color = [list(COLORS)[int(k)] in {o.color for o in s.objects} for k, s in zip(colors, scenes)]
    return {"shape_named": float(np.mean(shape)), "color_named": float(np.mean(color))}


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A random permutation with no fixed point (every caption goes to another scene)."""
    while True:
        order = rng.permutation(n)
        if n < 2 or not (order == np.arange(n)).any():
            return order.tolist()


def code_nll(model, processor, vqgan, scenes, captions: list[str], batch_size: int) -> torch.Tensor:
    """Teacher-forced negative log-likelihood (nats, summed over the image's codes and </s>) of each
    scene's VQGAN codes given `captions` (N,)."""
    from ofa_ufo.training.mixture import build_batch

    totals = []
    for start in range(0, len(scenes), batch_size):
        examples = [{"task": "text_to_image", "image": scene.image, "text": caption}
                    for scene, caption in zip(scenes[start : start + batch_size], captions[start : start + batch_size])]
        batch = build_batch(processor, examples, model.config, vqgan=vqgan)
        labels = batch.pop("labels")
        with torch.inference_mode():
            logits = model(**batch, labels=labels).logits  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        totals.append(nll.sum(1))  # (B,)
    return torch.cat(totals)


def caption_information(model, processor, vqgan, scenes, captions: list[str], order: list[int], batch_size: int) -> dict:
    """How much the caption tells the model about the image: the drop in the codes' negative
    log-likelihood from a shuffled caption to the scene's own (nats per image; 0 when the model ignores
    the caption), next to the codes' NLL itself; then the same for the first object's shape word and colour
    word alone (`swapped_caption`: the caption with only that word changed)."""
    own = code_nll(model, processor, vqgan, scenes, captions, batch_size)
    other = code_nll(model, processor, vqgan, scenes, [captions[j] for j in order], batch_size)
    report = {"nll_own_caption": round(float(own.mean()), 3), "nll_shuffled_caption": round(float(other.mean()), 3),
              "information_nats_per_image": round(float((other - own).mean()), 3),
              "images_more_likely_under_own_caption": round(float((own < other).float().mean()), 3)}
    for part in ("shape", "color"):
        other = code_nll(model, processor, vqgan, scenes, [swapped_caption(s, part) for s in scenes], batch_size)
        report[f"{part}_information_nats_per_image"] = round(float((other - own).mean()), 3)
        report[f"images_more_likely_than_with_another_{part}"] = round(float((own < other).float().mean()), 3)
    return report


def swapped_caption(scene, part: str) -> str:
    """The scene's caption with its first object's shape (`part` "shape") or colour ("color") replaced by
    the next one in the demo's list, everything else kept."""
    first, *rest = scene.objects
    if part == "shape":
        changed = SceneObject(SHAPES[(SHAPES.index(first.shape) + 1) % len(SHAPES)], first.color, first.box)
    else:
        names = list(COLORS)
        changed = SceneObject(first.shape, names[(names.index(first.color) + 1) % len(names)], first.box)
    return caption_example(Scene(scene.image, [changed, *rest], scene.background))["target"]


def generate(pipe, captions: list[str], vqgan, args, seed: int) -> list:
    torch.manual_seed(seed)
    options = dict(do_sample=False) if args.greedy else {}
    if args.guidance_scale != 1.0:
        options["guidance_scale"] = args.guidance_scale
    results = pipe([None] * len(captions), task="text_to_image", text=captions, vqgan=vqgan,
                   batch_size=args.batch_size, **options)
    return [r["image"] for r in results]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline

    import ofa_ufo  # noqa: F401  (registers the pipeline)
    from ofa_ufo.metrics.image import psnr
    from ofa_ufo.tasks import get_task
    from ofa_ufo.tasks.image_gen import pixels_to_images, resolve_vqgan
    from ofa_ufo.training.vqgan_train import image_grid

    pipe = pipeline("ofa-ufo", model=args.model)
    vqgan = resolve_vqgan(args.vqgan, pipe.model)
    size = vqgan.config.resolution
    split = DemoScenes("val", args.scenes, seed=args.seed, max_objects=args.max_objects,
                       object_size=args.object_size)
    scenes = [split[i] for i in range(len(split))]
    captions = [make_examples(s, split.example_rng(i), ("text_to_image",))[0]["text"] for i, s in enumerate(scenes)]
    order = derangement(len(captions), np.random.default_rng(args.seed))
    information = caption_information(pipe.model, pipe.processor, vqgan, scenes, captions, order, args.batch_size)
    if args.information_only:
        print(json.dumps({"model": str(args.model), "scenes": len(scenes), "caption_information": information}, indent=1))
        return 0
    start = time.perf_counter()
    generated = generate(pipe, captions, vqgan, args, args.seed)
    shuffled = generate(pipe, [captions[j] for j in order], vqgan, args, args.seed)
    seconds = time.perf_counter() - start
    references = [s.image.resize((size, size), Image.LANCZOS) for s in scenes]
    with torch.inference_mode():
        pixels = torch.cat([image_to_pixels(s.image, size, vqgan) for s in scenes])  # (N, 3, S, S)
        reconstructions = pixels_to_images(vqgan.decode(vqgan.encode(pixels)))
        blanked = get_task("image_infill").prepare_pixels(pixels)
        grey_centre = pixels_to_images(vqgan.decode(vqgan.encode(blanked)))
    reader = train_reader(vqgan, size, args.reader_images, args.max_objects, args.seed, args.object_size,
                          args.reader_epochs)
    read = {name: reader_scores(reader, images, scenes, size) for name, images in
            [("generated", generated), ("shuffled_captions (chance)", shuffled), ("scenes", references),
             ("vqgan_reconstructions", reconstructions)]}
    report = {
        "model": str(args.model), "scenes": len(scenes), "decoding": "greedy" if args.greedy else "top-k 256 sampling",
        "guidance_scale": args.guidance_scale,
        "caption_information": information,
        "generated": color_scores(generated, scenes),
        "shuffled_captions (chance)": color_scores(shuffled, scenes),
        "scenes (classifier check)": color_scores(references, scenes),
        "vqgan_reconstructions": color_scores(reconstructions, scenes),
        "scene_reader": read,
        "generation_seconds": round(seconds, 1),
    }
    infilled = [r["image"] for r in pipe([s.image for s in scenes], task="image_infill", vqgan=vqgan,
                                        batch_size=args.batch_size, do_sample=False)]
    report["psnr"] = {"image_infill (greedy)": psnr(infilled, references)["psnr"],
                      "grey centre (baseline)": psnr(grey_centre, references)["psnr"],
                      "vqgan_reconstruction": psnr(reconstructions, references)["psnr"]}
    output = Path(args.output or args.model)
    output.mkdir(parents=True, exist_ok=True)
    (output / "t2i_eval.json").write_text(json.dumps(report, indent=1))
    n = min(args.grid, len(scenes))
    grid = image_grid([references[:n], reconstructions[:n], generated[:n], infilled[:n]],
                      ["scene", "VQGAN", "generated", "infilled"], captions[:n])
    grid.save(output / "t2i_samples.png")
    print(json.dumps(report, indent=1))
    print(f"t2i_eval.json and t2i_samples.png written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
