"""End-to-end demo run on generated scenes: build a preset, train a few steps, save, reload, predict.

`python -m ofa_ufo.training.demo --model ofa_ufo_base` is what `run_scripts/pretrain_ofa_base.sh`
runs with no data given. It trains captioning, VQA and grounding together on procedurally
generated scenes (no download), writes a `save_pretrained` checkpoint, reloads it through
`pipeline("ofa-ufo")` and prints predictions on held-out scenes. The training issue grows this
into the full multi-task pretraining loop.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ofa_ufo.data import DemoScenes, make_examples
from ofa_ufo.presets import create_model, create_processor
from ofa_ufo.supernet import largest_arch, sample_arch, set_arch, smallest_arch
from ofa_ufo.tasks import get_task, task_id

DEMO_TASKS = ("caption", "vqa", "grounding")


def build_batch(processor, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Examples of any of the demo tasks -> one padded training batch (mixed tasks)."""
    size = processor.image_processor.size
    input_size = (size, size)
    prompts, targets = [], []
    for example in examples:
        meta = dict(original_size=example["image"].size, input_size=input_size, box_codec=processor.box_codec)
        prompt, target = get_task(example["task"]).build_example(example, meta)
        prompts.append(prompt)
        targets.append(target)
    batch = processor(images=[e["image"] for e in examples], text=prompts, text_target=targets, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask", "labels")}
    inputs["task_ids"] = torch.tensor([task_id(e["task"]) for e in examples])  # routes a UFO supernet
    return inputs


def step_archs(config, step: int) -> list:
    """The supernet archs one training step trains: [None] (the model as is) unless the config
    asks for elastic sampling (`supernet_sample_arch`: `sample_arch(config, step)`, plus the
    largest and smallest arch with `supernet_sandwich`)."""
    vision = config.vision_config
    if not (vision.supernet_layers and vision.supernet_routed and vision.supernet_sample_arch):
        return [None]
    archs = [sample_arch(config, step)]
    return archs + ([largest_arch(config), smallest_arch(config)] if vision.supernet_sandwich else [])


def backward_step(model, batch: dict[str, torch.Tensor], step: int) -> float:
    """Forward and backward of one step over its archs (gradients accumulate); returns the mean loss."""
    archs = step_archs(model.config, step)
    total = 0.0
    for arch in archs:
        if arch is not None:
            set_arch(model, arch)
        loss = model(**batch).loss / len(archs)
        loss.backward()
        total += loss.item()
    if archs != [None]:
        set_arch(model, None)
    return total


def demo_examples(scenes: DemoScenes, index: int, step: int) -> list[dict[str, Any]]:
    return make_examples(scenes[index], scenes.example_rng(index, step), DEMO_TASKS)


def train(model, processor, scenes: DemoScenes, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Plain AdamW loop with linear warmup/decay; returns the loss per step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="train", unit="step")):
        indices = rng.integers(0, len(scenes), size=max(1, batch_size // len(DEMO_TASKS)))
        examples = [e for i in indices for e in demo_examples(scenes, int(i), step)][:batch_size]
        loss = backward_step(model, build_batch(processor, examples), step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def show_predictions(output_dir: Path, scenes: DemoScenes, count: int) -> None:
    """Reload the checkpoint through the public pipeline and print answers next to the truth."""
    from transformers import pipeline

    pipe = pipeline("ofa-ufo", model=str(output_dir))
    for index in range(count):
        caption, vqa, grounding = demo_examples(scenes, index, 0)
        print(f"scene {index}: objects = {[o.name for o in scenes[index].objects]}")
        print("  caption  :", pipe(caption["image"], task="caption"), "| truth:", caption["target"])
        print("  vqa      :", pipe(vqa["image"], task="vqa", text=vqa["text"]), "| truth:", vqa["target"])
        found = pipe(grounding["image"], task="grounding", text=grounding["text"])
        print("  grounding:", found, "| truth:", [round(v, 1) for v in grounding["box"]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ofa_ufo_base", help="preset name (see ofa_ufo.list_models())")
    parser.add_argument("--image-size", type=int, default=128, help="model input resolution (px, multiple of 16)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scenes", type=int, default=2000, help="number of generated training scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="held-out scenes to predict after training")
    parser.add_argument("--output-dir", default="checkpoints/ofa_ufo_base.pretrain_demo")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = create_model(args.model, image_size=args.image_size, dropout=0.0)
    processor = create_processor(args.model, image_size=args.image_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters, image {args.image_size}px, "
          f"{args.steps} steps x batch {args.batch_size}, tasks {', '.join(DEMO_TASKS)}")
    start = time.perf_counter()
    losses = train(model, processor, DemoScenes("train", args.scenes, seed=args.seed),
                   args.steps, args.batch_size, args.lr, args.seed)
    print(f"trained in {time.perf_counter() - start:.0f}s; loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} (last 5)")
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "train_log.json").write_text(json.dumps({"args": vars(args), "losses": losses}, indent=1))
    print(f"saved checkpoint to {output_dir}")
    show_predictions(output_dir, DemoScenes("val", max(args.show, 1), seed=args.seed), args.show)


if __name__ == "__main__":
    main()
