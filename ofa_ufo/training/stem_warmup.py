"""Dense warm-up of the ResNet stem on generated demo scenes, before the first training step.

OFA starts its ResNet from ImageNet weights. Trained from scratch inside the full model, the
stem gets gradients about 1000x smaller than the decoder's and the encoder's image signal
collapses within the first steps (benchmarks/README.md, "Embedded defaults"). This stage is
the demo's stand-in for the pretrained stem: the stem alone, with a throw-away 1x1 convolution
on its feature grid, learns to name the object in each grid cell ("red circle", ..., or
background; `cell_labels`). Features that tell shapes and colours apart at every
position are what captioning, VQA, grounding, detection and classification all read.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE, SHAPES, DemoScenes, Scene, detection_labels
from ofa_ufo.models.resnet import ResNetStem
from ofa_ufo.tasks.box_mask import cell_coverage
from ofa_ufo.training.config import TrainConfig
from ofa_ufo.training.distillation import normalize_channels

BATCH_SIZE = 32
LR = 1e-3
WEIGHT_DECAY = 0.01
BACKGROUND_WEIGHT = 0.2  # most cells are empty; full weight teaches "background" everywhere first
HELD_OUT = 256  # scenes scored after the warm-up
COVERED = 0.25  # share of a cell an object must cover to label it
REFRESH_IMAGES = 256  # the last training scenes that re-estimate the distilled stem's BatchNorm statistics


def cell_labels(scene: Scene, grid: int, labels: list[str]) -> np.ndarray:
    """(grid, grid) label index per cell of the stem's output grid, len(labels) for background.

    A cell takes the largest object that covers at least a quarter of it, and a cell holding an
    object's box centre always takes that object (small objects keep their cell). Labelling every
    covered cell, not only the centre one, stops object pixels from being taught as background
    (a probe scored on centre cells only: object accuracy 0.50 -> 0.55 after 9,600 scenes)."""
    out = np.full((grid, grid), len(labels), np.int64)
    size = scene.image.width
    by_area = sorted(scene.objects, key=lambda o: o.area)  # larger objects overwrite smaller ones
    for obj in by_area:
        out[cell_coverage([obj.box], scene.image.size, grid, grid) >= COVERED] = labels.index(obj.name)
    for obj in by_area:
        cx, cy = (obj.box[0] + obj.box[2]) / 2 / size, (obj.box[1] + obj.box[3]) / 2 / size
        out[min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)] = labels.index(obj.name)
    return out


def _batch(scenes: DemoScenes, indices: range, processor, grid: int, labels: list[str],
           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = [scenes[i] for i in indices]  # each scene is generated on access: once
    targets = torch.from_numpy(np.stack([cell_labels(s, grid, labels) for s in chosen]))  # (B, grid, grid)
    return _pixels(chosen, processor, device), targets.to(device)


@torch.no_grad()
def _accuracy(stem: nn.Module, head: nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
              background: int) -> dict[str, float]:
    stem.eval()
    predicted = torch.cat([head(stem(chunk)).argmax(1) for chunk in pixels.split(BATCH_SIZE)])  # (N, grid, grid)
    stem.train()
    objects = targets != background
    hit, want = predicted[objects], targets[objects]
    named = hit != background
    # labels are colour-major ("red circle", "red square", ...): shape = index mod len(SHAPES); shape is the
    # part that takes the stem long to learn (colour is right in ~95% of object cells after 9,600 scenes)
    return {"object_cell_accuracy": (hit == want).float().mean().item(),
            "shape_cell_accuracy": (named & (hit % len(SHAPES) == want % len(SHAPES))).float().mean().item(),
            "colour_cell_accuracy": (named & (hit // len(SHAPES) == want // len(SHAPES))).float().mean().item(),
            "background_cell_accuracy": (predicted[~objects] == background).float().mean().item()}


def warm_up_stem(model, processor, images: int, seed: int = 0, max_objects: int = 3,
                 device: torch.device | str = "cpu", show_progress: bool = True,
                 subcells: int = 1, object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train `model`'s ResNet stem in place on `images` generated scenes (batch 32, AdamW 1e-3,
    5% warmup then cosine) to label every cell, or with `subcells` > 1 every sub-cell of an
    N x N split of each cell (a 1x1 convolution to N * N label maps, then pixel shuffle): the
    features must then say where in a cell an object lies, not only what it is, which box outputs
    (grounding, detection) read. Returns held-out accuracies over the labelled (sub-)cells. Runs
    under its own seed with the global RNG state restored afterwards, so it does not shift the
    training run's randomness. `dtype` bfloat16: the forward under bf16 autocast (fp32 weights, optimizer
    state and loss), as a run trains where the hardware is fast at it (the seconds are in the result)."""
    start = time.perf_counter()
    stem: ResNetStem = model.get_encoder().embed_images  # every preset's encoder, supernets included
    labels = detection_labels()
    background = len(labels)
    train_scenes = DemoScenes("stem_warmup", images, seed=seed, max_objects=max_objects, object_size=object_size)
    held_out = DemoScenes("stem_warmup_eval", HELD_OUT, seed=seed, max_objects=max_objects, object_size=object_size)
    stem.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        channels, grid = _grid(stem, processor, device)
        head = _label_head(channels, background + 1, subcells).to(device)
        grid *= subcells
        weight = _label_weights(background, device)

        def batch(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
            return _batch(train_scenes, indices, processor, grid, labels, device)

        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(outputs.float(), targets, weight=weight)

        loss = _fit(stem, head, batch, loss_fn, images, dtype, "stem warm-up", show_progress)
        pixels, targets = _batch(held_out, range(HELD_OUT), processor, grid, labels, device)
        result = _accuracy(stem, head, pixels, targets, background)
    return {"images": images, "label_grid": grid, "final_loss": loss, "precision": _name(dtype),
            "seconds": round(time.perf_counter() - start, 1), **result}


def distill_stem(model, teacher, processor, images: int, seed: int = 0, max_objects: int = 3,
                 device: torch.device | str = "cpu", show_progress: bool = True,
                 object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
                 dtype: torch.dtype = torch.float32, label_weight: float = 0.0, subcells: int = 1) -> dict[str, Any]:
    """Train `model`'s ResNet stem in place to reproduce a trained `teacher`'s stem features on `images`
    generated scenes (same schedule as `warm_up_stem`): a throw-away 1x1 convolution maps the student's grid
    to the teacher's channels, and the loss is the mean squared error against the teacher's features, each
    channel normalised over the batch's positions. Every cell carries a dense target of ~1000 numbers instead
    of one label, so a small stem learns what a large trained one sees far faster than from the labels
    (a small student's stem is what limits it on the image tasks). `label_weight` > 0 adds `warm_up_stem`'s
    cell-label loss (`subcells` as there) with that weight, through its own throw-away head. The teacher must
    have been trained at the processor's image size. Returns the held-out share of the teacher's feature
    variance explained (R^2, over 256 scenes) and the seconds."""
    size, teacher_size = processor.image_processor.size, teacher.config.image_size
    if size != teacher_size:
        raise ValueError(f"stem distillation: the student's images are {size} px but the teacher was trained at "
                         f"{teacher_size} px: its features at another scale are no target; use its image size")
    start = time.perf_counter()
    stem: ResNetStem = model.get_encoder().embed_images
    teacher_stem: ResNetStem = teacher.get_encoder().embed_images
    labels = detection_labels()
    background = len(labels)
    train_scenes = DemoScenes("stem_warmup", images, seed=seed, max_objects=max_objects, object_size=object_size)
    held_out = DemoScenes("stem_warmup_eval", HELD_OUT, seed=seed, max_objects=max_objects, object_size=object_size)
    stem.to(device)
    teacher_stem.to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher_dtype = next(teacher_stem.parameters()).dtype  # a teacher loaded in bf16 stays in bf16
        channels, grid = _grid(stem, processor, device)
        teacher_channels, _ = _grid(teacher_stem, processor, device, teacher_dtype)
        head = _StemHeads(channels, teacher_channels, (background + 1) if label_weight else 0, subcells).to(device)
        weight = _label_weights(background, device)

        def targets(scenes: DemoScenes, indices: range) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            pixels, cells = _batch(scenes, indices, processor, grid * subcells, labels, device)
            with torch.no_grad():
                features = torch.cat([teacher_stem(chunk.to(teacher_dtype)).float()
                                      for chunk in pixels.split(BATCH_SIZE)])
            return pixels, (_normalize(features), cells)  # (B, C_teacher, g, g), (B, g*s, g*s)

        def loss_fn(outputs: tuple[torch.Tensor, torch.Tensor | None], wanted: tuple[torch.Tensor, torch.Tensor]):
            loss = nn.functional.mse_loss(outputs[0].float(), wanted[0])
            if label_weight:
                loss = loss + label_weight * nn.functional.cross_entropy(outputs[1].float(), wanted[1], weight=weight)
            return loss

        loss = _fit(stem, head, lambda indices: targets(train_scenes, indices), loss_fn, images, dtype,
                    "stem distillation", show_progress)
        last = range(max(0, images - REFRESH_IMAGES), images)
        _refresh_batch_norm(stem, _pixels([train_scenes[i] for i in last], processor, device).split(BATCH_SIZE))
        pixels, (wanted, _) = targets(held_out, range(HELD_OUT))
        stem.eval()
        with torch.no_grad():
            fitted = torch.cat([head(stem(chunk))[0] for chunk in pixels.split(BATCH_SIZE)])
        stem.train()
        explained = 1.0 - float(((fitted - wanted) ** 2).mean() / wanted.var(unbiased=False))
    return {"images": images, "final_loss": loss, "precision": _name(dtype), "explained_variance": explained,
            "seconds": round(time.perf_counter() - start, 1)}


class _StemHeads(nn.Module):
    """distill_stem's throw-away heads on the stem's grid (B, C, g, g): the projection to the teacher's channels
    and, with `classes` > 0, warm_up_stem's label head (B, classes, g*s, g*s); its second output is None without."""

    def __init__(self, channels: int, teacher_channels: int, classes: int, subcells: int) -> None:
        super().__init__()
        self.features = nn.Conv2d(channels, teacher_channels, 1)
        self.labels = _label_head(channels, classes, subcells) if classes else None

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.features(grid), (self.labels(grid) if self.labels is not None else None)


def _label_head(channels: int, classes: int, subcells: int) -> nn.Module:
    """A 1x1 convolution to `classes` label maps per sub-cell, then pixel shuffle: (B, C, g, g) -> (B, classes,
    g*s, g*s)."""
    return nn.Sequential(nn.Conv2d(channels, classes * subcells**2, 1), nn.PixelShuffle(subcells))


def _label_weights(background: int, device: torch.device | str) -> torch.Tensor:
    """Cross-entropy class weights: 1 per object label, BACKGROUND_WEIGHT for background (index `background`)."""
    weight = torch.ones(background + 1, device=device)
    weight[background] = BACKGROUND_WEIGHT
    return weight


def _pixels(scenes: list[Scene], processor, device: torch.device | str) -> torch.Tensor:
    """The scenes' processed images (N, 3, S, S) on `device`."""
    return processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"].to(device)


def _refresh_batch_norm(stem: nn.Module, batches) -> None:
    """Set the stem's BatchNorm running statistics to the plain average over `batches` (pixels) of the trained
    weights' statistics. The usual running average lags behind features that were still moving at the last
    steps; evaluation mode reads these statistics."""
    norms = [m for m in stem.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    stem.train()
    with torch.no_grad():
        for pixels in batches:
            stem(pixels)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _normalize(features: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) features with each channel at mean 0 and variance 1 over the batch's positions (CWD's
    non-affine normalisation, `normalize_channels`, on the grid)."""
    rows, channels, side = features.shape[:3]
    flat = features.flatten(2).transpose(1, 2)  # (B, g*g, C)
    normal = normalize_channels(flat, torch.ones(flat.shape[:2], dtype=torch.bool, device=flat.device))
    return normal.transpose(1, 2).reshape(rows, channels, side, -1)  # (B, C, g, g)


def _grid(stem: nn.Module, processor, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(channels, grid side) of the stem's output at the processor's image size."""
    size = processor.image_processor.size
    probe = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad():  # eval mode: the shape probe leaves the BatchNorm statistics alone
        channels, grid = stem.eval()(probe).shape[1:3]  # (1, C, grid, grid)
    return channels, grid


def _fit(stem: nn.Module, head: nn.Module, batch, loss_fn, images: int, dtype: torch.dtype, desc: str,
         show_progress: bool) -> float:
    """Train stem + head on `images` examples in batches of 32 (`batch(indices)` -> (pixels, targets)), AdamW
    1e-3 (fused: one kernel for all tensors instead of ~6 per tensor), 5% warm-up then cosine, the forward under
    bf16 autocast when `dtype` is bfloat16. A stem whose weights were frozen (`requires_grad` off) is trained all
    the same and left frozen. Returns the last loss; the stem's gradients are cleared afterwards."""
    frozen = [param for param in stem.parameters() if not param.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        return _fit_steps(stem, head, batch, loss_fn, images, dtype, desc, show_progress)
    finally:
        for param in stem.parameters():
            param.grad = None
        for param in frozen:
            param.requires_grad_(False)


def _fit_steps(stem: nn.Module, head: nn.Module, batch, loss_fn, images: int, dtype: torch.dtype, desc: str,
               show_progress: bool) -> float:
    steps = math.ceil(images / BATCH_SIZE)
    device_type = next(stem.parameters()).device.type
    optimizer = torch.optim.AdamW(list(stem.parameters()) + list(head.parameters()), lr=LR, weight_decay=WEIGHT_DECAY,
                                  fused=device_type in ("cpu", "cuda"))
    warmup = max(1, round(0.05 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    stem.train()
    loss = torch.zeros(())
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not show_progress)
    for step in bar:
        pixels, targets = batch(range(step * BATCH_SIZE, min(images, (step + 1) * BATCH_SIZE)))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            outputs = head(stem(pixels))
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def _name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def warm_up_run_stem(model, processor, config: TrainConfig, device: torch.device, main: bool,
                     dtype: torch.dtype = torch.float32, teacher=None) -> dict[str, Any]:
    """`warm_up_stem` with a run's settings (`stem_warmup_*`, `demo_*`, `seed`) and precision (`dtype`), or with
    a `teacher` (a run with `distill.stem`) `distill_stem`; its result printed by the main process. Every process
    runs the same seeded warm-up; DDP then broadcasts rank 0's weights."""
    if teacher is not None:
        result = distill_stem(model, teacher, processor, config.stem_warmup_images, config.seed,
                              config.demo_max_objects, device, show_progress=main, object_size=config.demo_object_size,
                              dtype=dtype)
        if main:
            print(f"stem distillation ({result['precision']}) on {result['images']} generated scenes: the student's "
                  f"stem explains {result['explained_variance']:.3f} of the teacher's held-out stem features "
                  f"({result['seconds']:.0f} s)", flush=True)
        return result
    result = warm_up_stem(model, processor, config.stem_warmup_images, config.seed, config.demo_max_objects, device,
                          show_progress=main, subcells=config.stem_warmup_subcells,
                          object_size=config.demo_object_size, dtype=dtype)
    if main:
        print(f"stem warm-up ({result['precision']}) on {result['images']} generated scenes: held-out cell accuracy "
              f"{result['object_cell_accuracy']:.3f} on objects (shape {result['shape_cell_accuracy']:.3f}, colour "
              f"{result['colour_cell_accuracy']:.3f}), {result['background_cell_accuracy']:.3f} on background "
              f"({result['seconds']:.0f} s)",
              flush=True)
    return result
