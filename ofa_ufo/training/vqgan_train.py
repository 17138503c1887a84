"""Train a VQGAN image tokenizer on the demo scenes, and measure it on held-out scenes.

    python -m ofa_ufo.training.vqgan_train --preset vqgan_demo --steps 600 --image-size 64 \\
        --output-dir checkpoints/vqgan_demo.demo_scenes
    python -m ofa_ufo.training.vqgan_train --config my_vqgan.yaml --steps 50     # flags override the file

The images are the OFA trainer's demo scenes (drawn at 256 px) resized with LANCZOS to `image_size`,
exactly as `text_to_image` / `image_infill` encode their targets, so the codes the VQGAN learns are
the ones the OFA model is then trained to generate.

Losses (taming-transformers' recipe without the parts that need downloads):
- pixel reconstruction, L1 (default) or L2, optionally weighted towards object pixels (`object_weight`);
- the quantiser's own term: plain VQ codebook + beta * commitment, or for Gumbel quantisation
  `kl_weight` * KL(code distribution || uniform) while the Gumbel-softmax temperature is annealed
  (cosine, as taming's `LambdaWarmUpCosineScheduler`) from `temperature_start` to `temperature_end`;
- no perceptual (LPIPS) term: it needs pretrained VGG weights, which are not available offline;
- an optional patch-GAN adversarial term (`disc_weight` > 0; off by default), hinge loss, from
  step `disc_start`, with a fixed weight (taming scales it adaptively by gradient norms).

Before and after training: reconstruction PSNR and codebook usage (perplexity of the code histogram,
fraction of codes used) on held-out scenes. The output directory holds the trained VQGAN
(`VQGANModel.save_pretrained`: the training config's `vqgan: DIR`), `metrics.json`,
`reconstructions.png` (rows: originals, untrained, trained) and `vqgan_train_config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE, DemoScenes, check_object_size
from ofa_ufo.hf.modeling_vqgan import VQGANModel, create_vqgan_config
from ofa_ufo.metrics.image import psnr
from ofa_ufo.tasks.image_gen import pixels_to_images
from ofa_ufo.training.checkpoint import export_into
from ofa_ufo.training.config import ConfigError, checked_dataclass, read_yaml
from ofa_ufo.training.optimization import linear_schedule

CONFIG_FILE = "vqgan_train_config.yaml"
GRID_FILE = "reconstructions.png"


@dataclass
class VQGANTrainConfig:
    preset: str = "vqgan_demo"  # a VQGAN preset (ofa_ufo.list_vqgans())
    vqgan_overrides: dict[str, Any] = field(default_factory=dict)  # VQGANConfig fields, e.g. {n_embed: 512}
    image_size: int = 64  # training side; saved as the config's `resolution` (the tasks' default size)
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    end_lr: float = 1e-4  # linear decay to this after `warmup_steps` of linear warmup
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.5, 0.9)  # taming's Adam betas
    pixel_loss: str = "l1"  # l1 | l2
    # > 0: pixels that differ from their image's median colour (objects on the demo scenes' plain
    # backgrounds) weigh 1 + object_weight in the pixel loss, so small objects keep their colours
    object_weight: float = 0.0
    temperature_start: float = 0.9  # Gumbel only: cosine annealing of the Gumbel-softmax temperature
    temperature_end: float = 0.0625
    # "vq" only: every this many steps, codes unused since the last restart move to random encoder outputs
    # of the batch (dead-code restart, as in Jukebox); none in the last 20% of the steps; 0: never
    restart_every: int = 25
    disc_weight: float = 0.0  # > 0: add a patch-GAN hinge loss with this weight
    disc_start: int = 0  # step at which the discriminator starts
    train_scenes: int = 4000  # demo scenes of the OFA trainer's "train" split (same seed: the same scenes)
    eval_scenes: int = 64  # held-out scenes ("val" split) for the metrics
    max_objects: int = 3
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE  # (min, max) object side / image side, as the trainer's
    flip: bool = True  # random horizontal flips of training images
    grid_images: int = 8  # columns of reconstructions.png
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads (0: torch's default)
    log_every: int = 50
    output_dir: str = "checkpoints/vqgan_demo.demo_scenes"

    def to_yaml(self) -> str:
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return yaml.safe_dump(plain, sort_keys=False)


_POSITIVE = ("image_size", "steps", "batch_size", "lr", "train_scenes", "eval_scenes", "max_objects",
             "log_every", "temperature_start", "temperature_end")
_NON_NEGATIVE = ("end_lr", "object_weight", "warmup_steps", "restart_every", "disc_weight", "disc_start", "grid_images", "num_threads", "seed")


def make_config(raw: dict[str, Any], source: str = "config") -> VQGANTrainConfig:
    """A checked config from plain values (ConfigError naming the field for unknown keys, wrong types,
    values out of range)."""
    return checked_dataclass(VQGANTrainConfig, raw, source, _check)


def _check(config: VQGANTrainConfig) -> None:
    bad = [n for n in _POSITIVE if getattr(config, n) <= 0] + [n for n in _NON_NEGATIVE if getattr(config, n) < 0]
    if bad:
        raise ConfigError(f"field(s) {bad} out of range (must be > 0: {list(_POSITIVE)}; >= 0: {list(_NON_NEGATIVE)})")
    try:
        check_object_size(config.object_size)
    except ValueError as error:
        raise ConfigError(f"field 'object_size': {error}") from None
    if config.pixel_loss not in ("l1", "l2"):
        raise ConfigError(f"field 'pixel_loss' must be 'l1' or 'l2', got {config.pixel_loss!r}")


# ---- data ---------------------------------------------------------------------------------------


def demo_pixels(split: str, count: int, size: int, seed: int, max_objects: int,
                object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE) -> torch.Tensor:
    """`count` demo scenes of `split` as the VQGAN sees them: (count, 3, size, size) in [-1, 1]
    (drawn at 256 px, LANCZOS-resized as `text_to_image` / `image_infill` encode their targets)."""
    scenes = DemoScenes(split, count, seed=seed, max_objects=max_objects, object_size=object_size)
    return torch.stack([_to_pixels(scenes[i].image, size) for i in range(count)])


def _to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The pixel conversion of `ofa_ufo.tasks.image_gen.image_to_pixels`, without a model: (3, S, S)."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def sample_batch(pixels: torch.Tensor, batch_size: int, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """A random batch (with replacement), each image flipped left-right with probability 1/2 when `flip`."""
    batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
    if flip:
        mirrored = torch.rand(batch_size, generator=generator) < 0.5
        batch[mirrored] = batch[mirrored].flip(-1)
    return batch


# ---- model, losses --------------------------------------------------------------------------------


def build_vqgan(config: VQGANTrainConfig) -> VQGANModel:
    """The preset at `image_size`: `resolution` becomes the image size and attention stays at the same
    levels (its resolutions scale with it), so the saved config says which size the codes are for."""
    base = create_vqgan_config(config.preset, **config.vqgan_overrides)
    size = config.image_size
    if size % base.downsample_factor:
        raise ConfigError(f"image_size {size} is not a multiple of the VQGAN's downsampling factor "
                          f"{base.downsample_factor}")
    attention = [r * size // base.resolution for r in base.attn_resolutions]
    torch.manual_seed(config.seed)
    return VQGANModel(create_vqgan_config(config.preset, **{**config.vqgan_overrides, "resolution": size,
                                                            "attn_resolutions": attention}))


def gumbel_temperature(step: int, total: int, start: float, end: float) -> float:
    """Cosine annealing from `start` (step 0) to `end` (step `total`)."""
    progress = min(step / max(total, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def object_weights(target: torch.Tensor, weight: float, threshold: float = 0.2) -> torch.Tensor:
    """(B, 1, H, W) pixel weights: 1 + `weight` where a pixel of `target` (B, C, H, W) in [-1, 1] differs
    from its image's median colour by more than `threshold` in some channel, else 1."""
    median = target.flatten(2).median(-1).values[..., None, None]  # (B, C, 1, 1)
    differs = (target - median).abs().amax(1, keepdim=True) > threshold  # (B, 1, H, W)
    return 1 + weight * differs.to(target.dtype)


def pixel_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1",
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 or L2 error; with `weights` (broadcast over channels) the weighted mean."""
    difference = reconstruction - target
    error = difference.abs() if kind == "l1" else difference.pow(2)
    if weights is None:
        return error.mean()
    return (error * weights).mean() / weights.mean()


class PatchDiscriminator(nn.Sequential):
    """taming's `NLayerDiscriminator` (pix2pix PatchGAN), small: (B, 3, H, W) -> (B, 1, h, w) real/fake
    logits per patch; conv 4x4 stride 2, then `layers` - 1 more with BatchNorm, a stride-1 layer, a 1-channel head."""

    def __init__(self, width: int = 32, layers: int = 2):
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            channels = out
        super().__init__(*blocks, nn.Conv2d(channels, 1, 4, 1, 1))


@torch.no_grad()
def restart_dead_codes(codebook: nn.Embedding, counts: torch.Tensor, features: torch.Tensor,
                       generator: torch.Generator | None = None) -> int:
    """Codebook rows with `counts` 0 take the values of random encoder outputs `features` (B, D, h, w)
    (a code nothing maps to gets no gradient and would stay dead); returns how many were restarted."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (B*h*w, D)
    codebook.weight[dead] = flat[torch.randint(len(flat), (len(dead),), generator=generator)]
    return len(dead)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


# ---- metrics ----------------------------------------------------------------------------------------


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """From a code histogram (n_embed,): `perplexity` = exp(entropy of the code frequencies) (n_embed when
    all codes are equally used, 1 when one code is), `usage` = fraction of codes used at least once."""
    counts = counts.double().flatten()
    if counts.sum() <= 0:
        return {"perplexity": 0.0, "usage": 0.0, "codes_used": 0}
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "usage": used / counts.numel(), "codes_used": used}


@torch.no_grad()
def evaluate_vqgan(vqgan: VQGANModel, pixels: torch.Tensor, batch_size: int = 32) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out metrics of `pixels` (N, 3, S, S) and the reconstructions (N, 3, S, S), clamped to [-1, 1].

    `psnr` (dB) compares the 8-bit images (the `psnr` metric); `l1` is the mean absolute error in [-1, 1]
    units; codebook usage as `codebook_usage` on the codes of all images (the deterministic `encode`)."""
    was_training = vqgan.training
    vqgan.eval()
    codes, recons = [], []
    for chunk in pixels.split(batch_size):
        codes.append(vqgan.encode(chunk))
        recons.append(vqgan.decode(codes[-1]))
    vqgan.train(was_training)
    codes, recon = torch.cat(codes), torch.cat(recons)
    metrics = {**psnr(pixels_to_images(recon), pixels_to_images(pixels)),
               "l1": float((recon - pixels).abs().mean()),
               **codebook_usage(torch.bincount(codes.flatten(), minlength=vqgan.config.n_embed))}
    return metrics, recon


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = (), captions: Sequence[str] = (),
               scale: int = 2, pad: int = 2) -> Image.Image:
    """Images in rows (each upscaled `scale` x, nearest), a label left of each row and, optionally, a
    caption under each column (wrapped to the column width)."""
    cell = max(image.size[0] for row in rows for image in row) * scale
    label_width = 8 + 6 * max((len(label) for label in labels), default=0) if labels else 0
    lines = [_wrap(c, max(1, cell // 6)) for c in captions]
    caption_height = 11 * max((len(line) for line in lines), default=0) + (4 if lines else 0)
    columns = max(len(row) for row in rows)
    width = label_width + columns * (cell + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (cell + pad) + pad + caption_height), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = pad + r * (cell + pad)
        if r < len(labels):
            draw.text((4, top + cell // 2 - 5), labels[r], fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + pad + c * (cell + pad), top))
    for c, line in enumerate(lines):
        x, y = label_width + pad + c * (cell + pad), len(rows) * (cell + pad) + pad
        draw.multiline_text((x, y), "\n".join(line), fill="black", spacing=1)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


# ---- training ----------------------------------------------------------------------------------------


@dataclass
class VQGANTrainResult:
    output_dir: Path
    losses: list[float]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    seconds: float


class VQGANTrainer:
    """Holds the run's parts; `fit()` is the loop."""

    def __init__(self, config: VQGANTrainConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.vqgan = build_vqgan(config)
        self.gumbel = self.vqgan.config.quantizer == "gumbel"
        size = config.image_size
        self.train_pixels = demo_pixels("train", config.train_scenes, size, config.seed, config.max_objects,
                                        config.object_size)
        self.eval_pixels = demo_pixels("val", config.eval_scenes, size, config.seed, config.max_objects,
                                       config.object_size)
        self.optimizer = torch.optim.Adam(self.vqgan.parameters(), lr=config.lr, betas=config.betas)
        self.scheduler = _lr_schedule(self.optimizer, config)
        self.disc = PatchDiscriminator() if config.disc_weight > 0 else None
        if self.disc is not None:
            self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=config.betas)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.code_counts = torch.zeros(self.vqgan.config.n_embed, dtype=torch.long)
        self.losses: list[float] = []

    def train_step(self, step: int) -> dict[str, float]:
        """One update of the VQGAN (and of the discriminator when on); the step's loss terms."""
        config = self.config
        if self.gumbel:
            self.vqgan.quantize.temperature = gumbel_temperature(step, config.steps, config.temperature_start,
                                                                 config.temperature_end)
        batch = sample_batch(self.train_pixels, config.batch_size, self.generator, config.flip)
        vqgan = self.vqgan
        features = vqgan.encode_features(batch)  # (B, embed_dim, h, w)
        z_q, quantizer_loss, codes = vqgan.quantize(features)
        reconstruction = vqgan.decoder(vqgan.post_quant_conv(z_q))  # VQGANModel.forward, keeping the features
        weights = object_weights(batch, config.object_weight) if config.object_weight else None
        terms = {"pixel": pixel_loss(reconstruction, batch, config.pixel_loss, weights), "quantizer": quantizer_loss}
        adversarial = self.disc is not None and step >= config.disc_start
        if adversarial:
            terms["gan"] = -config.disc_weight * self.disc(reconstruction).mean()
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if adversarial:
            terms["disc"] = self._disc_step(batch, reconstruction.detach())
        result = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        return {**result, **self._track_codes(step, codes, features)}

    def _track_codes(self, step: int, codes: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
        """Count code use; for "vq", restart the codes unused over the last `restart_every` steps."""
        every = self.config.restart_every
        self.code_counts += torch.bincount(codes.flatten(), minlength=len(self.code_counts))
        if self.gumbel or not every or (step + 1) % every or step >= 0.8 * self.config.steps:
            return {}
        restarted = restart_dead_codes(self.vqgan.quantize.embedding, self.code_counts, features, self.generator)
        self.code_counts.zero_()
        return {"restarted": float(restarted)}

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        loss = hinge_d_loss(self.disc(real), self.disc(fake))
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        return loss.detach()

    def fit(self) -> VQGANTrainResult:
        config, start = self.config, time.perf_counter()
        before, recon_before = evaluate_vqgan(self.vqgan, self.eval_pixels)
        print(f"untrained: {_summary(before)}")
        self.vqgan.train()
        bar = tqdm(range(config.steps), desc="vqgan", unit="step")
        for step in bar:
            terms = self.train_step(step)
            self.losses.append(terms["loss"])
            bar.set_postfix(loss=f"{terms['loss']:.4f}", pixel=f"{terms['pixel']:.4f}")
            if (step + 1) % config.log_every == 0 and not sys.stderr.isatty():
                print(f"step {step + 1}/{config.steps} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                      flush=True)
        bar.close()
        after, recon_after = evaluate_vqgan(self.vqgan, self.eval_pixels)
        seconds = time.perf_counter() - start
        print(f"trained:   {_summary(after)}  ({config.steps} steps, {seconds:.0f} s)")
        self._export(before, after, [self.eval_pixels, recon_before, recon_after], seconds)
        return VQGANTrainResult(Path(config.output_dir), self.losses, before, after, seconds)

    def _export(self, before: dict[str, float], after: dict[str, float], rows: list[torch.Tensor],
                seconds: float) -> None:
        """The VQGAN (save_pretrained), metrics.json, reconstructions.png and the config, written atomically."""
        config = self.config
        report = {"steps": config.steps, "seconds": round(seconds, 1), "metrics_untrained": before,
                  "metrics_trained": after, "losses": self.losses, "config": yaml.safe_load(config.to_yaml())}
        n = config.grid_images
        grid = image_grid([pixels_to_images(row[:n]) for row in rows], ["original", "untrained", "trained"]) if n else None

        def write(tmp: Path) -> None:
            self.vqgan.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(report, indent=1))
            (tmp / CONFIG_FILE).write_text(config.to_yaml())
            if grid is not None:
                grid.save(tmp / GRID_FILE)

        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        export_into(config.output_dir, write)
        print(f"VQGAN, metrics.json and {GRID_FILE} written to {config.output_dir}")


def _lr_schedule(optimizer: torch.optim.Optimizer, config: VQGANTrainConfig):
    """The OFA trainer's schedule (`linear_schedule`) over this run's steps."""
    schedule = partial(linear_schedule, warmup=config.warmup_steps, total=config.steps, floor=config.end_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _summary(metrics: dict[str, float]) -> str:
    return (f"PSNR {metrics['psnr']:.2f} dB, L1 {metrics['l1']:.4f}, codebook perplexity "
            f"{metrics['perplexity']:.1f}, codes used {metrics['codes_used']} ({metrics['usage']:.1%})")


def train_vqgan(config: VQGANTrainConfig) -> VQGANTrainResult:
    """Train a VQGAN on demo scenes and write it with its report to `config.output_dir`."""
    return VQGANTrainer(config).fit()


# ---- command line ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> VQGANTrainConfig:
    """`--config FILE.yaml` (fields of VQGANTrainConfig) and one `--field-name VALUE` flag per field
    (values read as YAML, e.g. `--vqgan-overrides "{n_embed: 512}"`); flags win over the file."""
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.training.vqgan_train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a YAML file of VQGANTrainConfig fields")
    for item in dataclasses.fields(VQGANTrainConfig):
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, metavar="VALUE",
                            help=f"default: {_default(item)}")
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    raw = _read_config_file(Path(path)) if path else {}
    raw.update({k: read_yaml(v) for k, v in args.items() if v is not None})
    return make_config(raw, path or "command line")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"no config file {str(path)!r}")
    raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _default(item: dataclasses.Field) -> Any:
    return item.default_factory() if item.default is dataclasses.MISSING else item.default


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        print(f"VQGAN {config.preset} at {config.image_size} px, {config.steps} steps x {config.batch_size} images, "
              f"output {config.output_dir}")
        train_vqgan(config)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
