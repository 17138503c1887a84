#!/usr/bin/env python
"""Foundation benchmark of OFA-UFO on this machine's CPU.

Measures, side by side in one process, for each model preset:

1. parameters;
2. the encoder forward (ResNet stem + transformer encoder) at --batch images of --image-size px:
   FLOPs counted once with `torch.utils.flop_counter.FlopCounterMode`, the median wall time after
   warmup, the achieved GFLOP/s, and that rate as a share of an fp32 matmul measured just before;
3. greedy and beam-5 `generate` of exactly --new-tokens tokens for one image with and without the
   KV cache: new tokens per second and the cached/uncached speed-up (also with the encoder left
   out, "decode only", by passing precomputed `encoder_outputs`);
4. `pipeline("ofa-ufo")` captioning throughput: --batch images in one batched call against the
   same images one call each.

Prints progress lines as measurements complete, then ONE table with the goals next to the ratios.
On a shared machine, timed runs during which other processes used the CPU are detected (Linux
/proc/stat) and repeated after a short wait; see benchmarks/LOG.md, "Shared machines". Every wall
time comes from `ofa_ufo.core.timing.time_call`, the timer the other benchmarks share.

    python benchmarks/bench_foundation.py            # tiny and base, 384 px, batch 8 (~5 min on 2 cores)
    python benchmarks/bench_foundation.py --quick    # smoke run: tiny, 128 px, small sizes (< 1 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.flop_counter import FlopCounterMode

import ofa_ufo
from ofa_ufo.core.timing import device_name, time_call
from ofa_ufo.models.ofa import OFAUFOEncoderOutput

CAPTION_PROMPT = " what does the image describe?"

# Goals checked against the measured ratios (PASS / MISS in the table).
ENCODER_EFFICIENCY_GOAL = 0.60  # encoder GFLOP/s over fp32 matmul GFLOP/s ...
ENCODER_GOAL_MODELS = ("ofa_ufo_base",)  # ... judged at base only (other models: shown for information)
CACHE_SPEEDUP_GOAL = 5.0  # cached over uncached new tokens/s, end-to-end generate()
PIPELINE_SPEEDUP_GOAL = 4.0  # batched over one-call-per-image images/s

FULL = dict(models=["ofa_ufo_tiny", "ofa_ufo_base"], image_size=384, batch=8, new_tokens=32, repeats=3,
            pipeline_new_tokens=16, matmul_size=2048)
QUICK = dict(models=["ofa_ufo_tiny"], image_size=128, batch=2, new_tokens=8, repeats=1,
             pipeline_new_tokens=4, matmul_size=512)

START = time.perf_counter()


def log(message: str) -> None:
    """A progress line with the elapsed time, flushed at once."""
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# other processes on the CPU


class CpuMonitor:
    """How many cores' worth of CPU other processes use: /proc/stat busy time minus our own.

    On a machine without /proc/stat (not Linux) it reports 0 and never waits.
    """

    def __init__(self, threshold: float, wait_budget: float):
        self.threshold = threshold  # cores used by others above which a timed run counts as disturbed
        self.wait_budget = wait_budget  # seconds this run may still spend waiting for a quiet CPU
        self.waited = 0.0
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = os.path.exists("/proc/stat")

    def sample(self) -> tuple[float, float, float] | None:
        """(system busy CPU seconds, this process's CPU seconds, wall clock)."""
        if not self.available:
            return None
        with open("/proc/stat", encoding="ascii") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / self.tick
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def others(self, since: tuple[float, float, float] | None) -> float:
        """Average cores used by other processes since `since` (a `sample()`)."""
        now = self.sample()
        if since is None or now is None:
            return 0.0
        wall = max(now[2] - since[2], 1e-6)
        return max(0.0, (now[0] - since[0]) - (now[1] - since[1])) / wall

    def wait_quiet(self, window: float = 1.0) -> float:
        """Sleep in `window`-second steps until others use < threshold cores; bounded by the budget."""
        waited = 0.0
        while self.available and self.wait_budget > 0:
            since = self.sample()
            time.sleep(window)
            busy = self.others(since)
            waited += window
            self.wait_budget -= window
            if busy < self.threshold:
                break
        self.waited += waited
        return waited

    def settle(self) -> None:
        """Before a measurement: a quick look (0.25 s) and, if the CPU is busy, wait for quiet."""
        since = self.sample()
        time.sleep(0.25)
        if self.others(since) >= self.threshold:
            waited = self.wait_quiet()
            if waited:
                log(f"  (waited {waited:.0f}s for other processes to leave the CPU)")


# --------------------------------------------------------------------------------------------
# timing and counting


@dataclass
class Timing:
    """Wall times of the kept timed runs (warmup excluded) and what happened on the way."""

    times: list[float]
    disturbed: list[float] = field(default_factory=list)  # runs dropped because others used the CPU
    slow: bool = False  # timed once: the first run exceeded --slow-seconds
    contaminated: bool = False  # no undisturbed run could be had: `times` are disturbed runs

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def runs(self) -> int:
        return len(self.times)


class Bench:
    """Settings plus the CPU monitor; `measure` is the one timing loop every measurement uses."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.monitor = CpuMonitor(args.busy_cores, args.max_wait)
        self.notes: list[str] = []  # slow or contaminated measurements, printed under the table

    def measure(self, label: str, fn: Callable[[], Any], repeats: int | None = None, quiet: bool = False) -> Timing:
        """`--warmup` untimed runs, then timed runs until `repeats` undisturbed ones are kept.

        A run during which other processes used >= --busy-cores cores is dropped, and the loop
        waits for a quiet CPU before the next (at most --retries extra runs). A configuration
        whose first kept run takes longer than --slow-seconds is timed once.
        """
        args, monitor = self.args, self.monitor
        repeats = repeats or args.repeats
        monitor.settle()
        for _ in range(args.warmup):
            fn()
        timing = Timing(times=[])
        attempts = 0
        while len(timing.times) < repeats and attempts < repeats + args.retries:
            attempts += 1
            since = monitor.sample()
            elapsed = time_call(fn)
            others = monitor.others(since)
            if others >= monitor.threshold:
                timing.disturbed.append(elapsed)
                if not quiet:
                    log(f"  {label}: run of {elapsed:.3f}s disturbed (other processes used {others:.1f} cores); "
                        "dropped, waiting for a quiet CPU")
                if elapsed > args.slow_seconds and len(timing.disturbed) >= 2:
                    break  # slow and repeatedly disturbed: stop spending time on it
                monitor.wait_quiet()
                continue
            timing.times.append(elapsed)
            if elapsed > args.slow_seconds and len(timing.times) < repeats:
                timing.slow = True
                break
        if not timing.times:
            timing.times, timing.contaminated = list(timing.disturbed), True
        if timing.slow:
            self.notes.append(f"{label}: one run took {timing.times[0]:.1f}s > --slow-seconds "
                              f"{args.slow_seconds:g}, so it was timed once instead of {repeats}x")
        if timing.contaminated:
            self.notes.append(f"{label}: every timed run was disturbed by other processes; figure is unreliable (*)")
        if not quiet:
            shown = ", ".join(f"{t:.3f}" for t in timing.times)
            flags = " SLOW: timed once" if timing.slow else ""
            flags += " DISTURBED" if timing.contaminated else ""
            log(f"  {label}: median {timing.median:.3f}s over {timing.runs} run(s) [{shown}]{flags}")
        return timing


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v: (B, H, Lq, d) x (B, H, Lk, d) -> 2*B*H*Lq*Lk*(d + dv).

    `FlopCounterMode` has formulas for the CUDA SDPA kernels but not for the CPU one, so
    attention would otherwise count as zero on CPU.
    """
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    rows = int(np.prod(batch)) if batch else 1
    return 2 * rows * lq * lk * d + 2 * rows * lq * lk * dv


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one call of `fn` and the per-module totals (FlopCounterMode, depth 2)."""
    mapping = {torch.ops.aten.scaled_dot_product_attention: _sdpa_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    counter = FlopCounterMode(display=False, depth=2, custom_mapping=mapping)
    with counter:
        fn()
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def matmul_reference(bench: Bench) -> tuple[float, Timing]:
    """Median GFLOP/s of fp32 (n x n) @ (n x n), each timed run doing enough products to last ~0.3 s."""
    size = bench.args.matmul_size
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    for _ in range(2):
        torch.mm(a, b, out=out)
    count = max(1, round(0.3 / max(time_call(lambda: torch.mm(a, b, out=out)), 1e-6)))

    def products():
        for _ in range(count):
            torch.mm(a, b, out=out)

    timing = bench.measure(f"matmul {size}^3", products, repeats=max(bench.args.repeats, 5), quiet=True)
    return 2 * size**3 * count / timing.median / 1e9, timing


# --------------------------------------------------------------------------------------------
# inputs


def make_images(count: int, seed: int) -> list[Image.Image]:
    """Photo-like RGB images of varied sizes: smooth colour gradients, shapes, blur and noise."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (512, 512), (800, 533), (333, 500), (1024, 768), (256, 192), (720, 405)]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        x, y = x / width, y / height
        low, high = rng.uniform(0, 120, 3), rng.uniform(135, 255, 3)
        mix = np.stack([x, y, 0.5 * (x + 1 - y)], -1)  # (H, W, 3) in [0, 1]
        image = Image.fromarray((low + (high - low) * mix).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            x1, y1 = x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(radius=1.5))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def model_inputs(batch, rows: int | None = None) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_mask")
    return {k: batch[k][:rows] if rows else batch[k] for k in keys}


def fresh_encoder_outputs(encoded: OFAUFOEncoderOutput) -> OFAUFOEncoderOutput:
    """A new output object per generate() call: generate expands it in place for beams and the
    decoder memoises its cross-attention position keys in it, neither of which may carry over."""
    return OFAUFOEncoderOutput(
        last_hidden_state=encoded.last_hidden_state,
        padding_mask=encoded.padding_mask,
        position_embeddings=encoded.position_embeddings,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the measurements


def bench_encoder(bench: Bench, model, batch) -> dict[str, Any]:
    args = bench.args
    encoder = model.get_encoder()
    inputs = model_inputs(batch)
    with torch.inference_mode():
        flops, per_module = count_flops(lambda: encoder(**inputs))
        stem_flops = per_module.get(f"{type(encoder).__name__}.embed_images", 0)
        log(f"  encoder FLOPs: {flops / 1e9:.1f} GFLOP per forward of {args.batch} images "
            f"(ResNet stem {stem_flops / 1e9:.1f}, {100 * stem_flops / flops:.0f}%)")
        reference, reference_timing = matmul_reference(bench)
        log(f"  fp32 matmul reference ({args.matmul_size}^3): {reference:.1f} GFLOP/s")

        marks: dict[str, float] = {}
        shares: list[float] = []  # ResNet stem time / encoder time, per call (hooks time the stem)
        pre = encoder.embed_images.register_forward_pre_hook(lambda *_: marks.__setitem__("stem", time.perf_counter()))
        post = encoder.embed_images.register_forward_hook(
            lambda *_: marks.__setitem__("stem", time.perf_counter() - marks["stem"])
        )

        def forward():
            seconds = time_call(lambda: encoder(**inputs))  # the hooks set marks["stem"] during the call
            shares.append(marks["stem"] / seconds)

        try:
            timing = bench.measure("encoder forward", forward)
        finally:
            pre.remove()
            post.remove()
    stem_time = statistics.median(shares[args.warmup :] or shares) * timing.median
    achieved = flops / timing.median / 1e9
    rest_flops, rest_time = flops - stem_flops, max(timing.median - stem_time, 1e-9)
    log(f"  encoder: {achieved:.1f} GFLOP/s = {100 * achieved / reference:.0f}% of matmul; "
        f"ResNet stem {stem_flops / max(stem_time, 1e-9) / 1e9:.1f} GFLOP/s ({stem_time:.3f}s), "
        f"transformer part {rest_flops / rest_time / 1e9:.1f} GFLOP/s ({rest_time:.3f}s)")
    return dict(
        gflop=flops / 1e9, stem_gflop=stem_flops / 1e9, seconds=timing.median, runs=timing.runs,
        stem_seconds=stem_time, gflops=achieved, matmul_gflops=reference, efficiency=achieved / reference,
        contaminated=timing.contaminated or reference_timing.contaminated,
    )


def bench_generation(bench: Bench, model, batch) -> dict[str, Any]:
    args = bench.args
    inputs = model_inputs(batch, rows=1)
    with torch.inference_mode():
        encoded = model.get_encoder()(**inputs)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    out: dict[str, Any] = {}
    for beams in (1, 5):
        kind = "greedy" if beams == 1 else f"beam-{beams}"
        for use_cache in (True, False):
            for scope in ("end-to-end", "decode-only"):
                label = f"{kind} {'cached' if use_cache else 'uncached'} {scope}"

                def run(beams=beams, use_cache=use_cache, scope=scope, label=label):
                    feed = inputs if scope == "end-to-end" else dict(encoder_outputs=fresh_encoder_outputs(encoded))
                    with torch.inference_mode():
                        sequences = model.generate(**feed, **settings, num_beams=beams, use_cache=use_cache)
                    new = sequences.shape[1] - 1  # the decoder start token is not new
                    if new != args.new_tokens:
                        raise RuntimeError(f"{label}: generated {new} new tokens, expected {args.new_tokens}")

                timing = bench.measure(label, run)
                out[label] = dict(seconds=timing.median, runs=timing.runs, tokens_per_s=args.new_tokens / timing.median,
                                  contaminated=timing.contaminated)
        for scope in ("end-to-end", "decode-only"):
            cached, uncached = out[f"{kind} cached {scope}"], out[f"{kind} uncached {scope}"]
            out[f"{kind} speedup {scope}"] = cached["tokens_per_s"] / uncached["tokens_per_s"]
        log(f"  {kind}: {out[f'{kind} cached end-to-end']['tokens_per_s']:.1f} tok/s cached, "
            f"{out[f'{kind} uncached end-to-end']['tokens_per_s']:.1f} uncached -> "
            f"{out[f'{kind} speedup end-to-end']:.2f}x (decode only {out[f'{kind} speedup decode-only']:.2f}x)")
    return out


def bench_pipeline(bench: Bench, model, processor, images: list[Image.Image]) -> dict[str, Any]:
    from transformers import pipeline

    args = bench.args
    settings = dict(task="caption", max_new_tokens=args.pipeline_new_tokens,
                    min_new_tokens=args.pipeline_new_tokens, num_beams=5)
    with tempfile.TemporaryDirectory(prefix="bench_ofa_ufo_") as directory:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        pipe = pipeline("ofa-ufo", model=directory)
    log(f"  pipeline loaded ({len(images)} images, beam 5, {args.pipeline_new_tokens} new tokens each)")

    def batched():
        answers = pipe(images, batch_size=len(images), **settings)
        if len(answers) != len(images) or any("error" in a for a in answers):
            raise RuntimeError(f"pipeline failed on the batch: {answers}")

    def single():
        for image in images:
            answer = pipe(image, **settings)
            if "error" in answer:
                raise RuntimeError(f"pipeline failed on an image: {answer}")

    batched_t = bench.measure(f"pipeline batch_size={len(images)}", batched)
    single_t = bench.measure(f"pipeline {len(images)} single calls", single)
    rate_batched, rate_single = len(images) / batched_t.median, len(images) / single_t.median
    log(f"  pipeline: {rate_batched:.2f} img/s batched, {rate_single:.2f} img/s single -> "
        f"{rate_batched / rate_single:.2f}x")
    return dict(
        batched_images_per_s=rate_batched, single_images_per_s=rate_single, speedup=rate_batched / rate_single,
        batched_runs=batched_t.runs, single_runs=single_t.runs,
        batched_contaminated=batched_t.contaminated, single_contaminated=single_t.contaminated,
    )


def bench_model(bench: Bench, name: str, images: list[Image.Image]) -> dict[str, Any]:
    args = bench.args
    log(f"== {name} ==")
    seed_everything(args.seed)
    model = ofa_ufo.create_model(name, image_size=args.image_size).eval()
    processor = ofa_ufo.create_processor(name, image_size=args.image_size)
    params = sum(p.numel() for p in model.parameters())
    stem = sum(p.numel() for p in model.get_encoder().embed_images.parameters())
    log(f"  {params / 1e6:.1f}M parameters (ResNet stem {stem / 1e6:.1f}M)")
    batch = processor(images=images, text=[CAPTION_PROMPT] * len(images), return_tensors="pt")
    result: dict[str, Any] = dict(params_m=params / 1e6)
    notes_before = len(bench.notes)
    result["encoder"] = bench_encoder(bench, model, batch)
    result["generation"] = bench_generation(bench, model, batch)
    result["pipeline"] = bench_pipeline(bench, model, processor, images)
    bench.notes[notes_before:] = [f"{name}: {note}" for note in bench.notes[notes_before:]]
    del model
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------
# report


def build_table(results: dict[str, dict], args: argparse.Namespace) -> tuple[str, list[str]]:
    """One table: a row per metric, a column per model, then the goal. Returns it and the misses."""
    names = list(results)
    rows: list[tuple[str, list[str], str]] = []
    misses: list[str] = []

    def add(metric: str, cell: Callable[[str, dict], str], goal: str = "") -> None:
        rows.append((metric, [cell(n, results[n]) for n in names], goal))

    def judged(name: str, what: str, value: float, goal: float, text: str, goal_text: str,
               applies: bool = True) -> str:
        if not applies:
            return f"{text} (info)"
        status = "PASS" if value >= goal else "MISS"
        if status == "MISS":
            misses.append(f"{name} {what} {text} (goal {goal_text})")
        return f"{text} {status}"

    def mark(runs: int, contaminated: bool) -> str:
        """' (n=1)' when fewer timed runs than --repeats were kept, '*' when all were disturbed."""
        return (f" (n={runs})" if runs != args.repeats else "") + ("*" if contaminated else "")

    b, px, tok = args.batch, args.image_size, args.new_tokens
    add("parameters (M)", lambda n, r: f"{r['params_m']:.1f}")
    add(f"encoder GFLOP / forward (b={b}, {px}px)", lambda n, r: f"{r['encoder']['gflop']:.1f}")
    add("  of which ResNet stem", lambda n, r: f"{100 * r['encoder']['stem_gflop'] / r['encoder']['gflop']:.0f}%")
    add("encoder time, median (s)",
        lambda n, r: f"{r['encoder']['seconds']:.3f}" + mark(r["encoder"]["runs"], r["encoder"]["contaminated"]))
    add("  of which ResNet stem", lambda n, r: f"{100 * r['encoder']['stem_seconds'] / r['encoder']['seconds']:.0f}%")
    add("encoder achieved GFLOP/s", lambda n, r: f"{r['encoder']['gflops']:.1f}")
    add(f"fp32 matmul {args.matmul_size}^3 GFLOP/s (reference)", lambda n, r: f"{r['encoder']['matmul_gflops']:.1f}")
    goal = f">= {100 * ENCODER_EFFICIENCY_GOAL:.0f}%"
    add("encoder / matmul",
        lambda n, r: judged(n, "encoder/matmul", r["encoder"]["efficiency"], ENCODER_EFFICIENCY_GOAL,
                            f"{100 * r['encoder']['efficiency']:.0f}%", goal, applies=n in ENCODER_GOAL_MODELS),
        f"{goal} (base)")
    for kind in ("greedy", "beam-5"):
        for scope in ("end-to-end", "decode-only"):
            suffix = "" if scope == "end-to-end" else ", decode only"
            for cache in ("cached", "uncached"):
                key = f"{kind} {cache} {scope}"
                add(f"{kind} {cache} tok/s (b=1, {tok} new{suffix})",
                    lambda n, r, key=key: f"{r['generation'][key]['tokens_per_s']:.1f}"
                    + mark(r["generation"][key]["runs"], r["generation"][key]["contaminated"]))
            if scope == "end-to-end":
                add(f"{kind} cached / uncached",
                    lambda n, r, kind=kind: judged(
                        n, f"{kind} cache speed-up", r["generation"][f"{kind} speedup end-to-end"],
                        CACHE_SPEEDUP_GOAL, f"{r['generation'][f'{kind} speedup end-to-end']:.2f}x",
                        f">= {CACHE_SPEEDUP_GOAL:g}x"),
                    f">= {CACHE_SPEEDUP_GOAL:g}x")
            else:
                add(f"{kind} cached / uncached, decode only",
                    lambda n, r, kind=kind: f"{r['generation'][f'{kind} speedup decode-only']:.2f}x (info)")
    p = args.pipeline_new_tokens
    add(f"pipeline batch_size={b} img/s (beam 5, {p} tok)",
        lambda n, r: f"{r['pipeline']['batched_images_per_s']:.2f}"
        + mark(r["pipeline"]["batched_runs"], r["pipeline"]["batched_contaminated"]))
    add(f"pipeline {b} single calls img/s (beam 5, {p} tok)",
        lambda n, r: f"{r['pipeline']['single_images_per_s']:.2f}"
        + mark(r["pipeline"]["single_runs"], r["pipeline"]["single_contaminated"]))
    add("pipeline batched / single",
        lambda n, r: judged(n, "pipeline speed-up", r["pipeline"]["speedup"], PIPELINE_SPEEDUP_GOAL,
                            f"{r['pipeline']['speedup']:.2f}x", f">= {PIPELINE_SPEEDUP_GOAL:g}x"),
        f">= {PIPELINE_SPEEDUP_GOAL:g}x")
    add(f"  ceiling: {b} single calls time / b={b} encoder time",
        lambda n, r: f"{b / r['pipeline']['single_images_per_s'] / r['encoder']['seconds']:.2f}x (info)")

    headers = ["metric", *names, "goal"]
    widths = [max(len(headers[0]), *(len(r[0]) for r in rows))]
    widths += [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    widths += [max(len("goal"), *(len(r[2]) for r in rows))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "| " + " | ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([metric, *cells, goal]) for metric, cells, goal in rows]
    return "\n".join(out), misses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=ofa_ufo.list_models(),
                        help=f"presets to compare (default: {' '.join(FULL['models'])}; --quick: ofa_ufo_tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution in px (default 384; --quick 128)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per encoder forward and per batched pipeline call (default 8; --quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="exact new tokens per generate(), min = max (default 32; --quick 8)")
    parser.add_argument("--pipeline-new-tokens", type=int, default=None,
                        help="exact new tokens per pipeline caption (default 16; --quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--slow-seconds", type=float, default=15.0,
                        help="a configuration whose first timed run takes longer than this is timed once")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 fp32 matmul reference (default 2048)")
    parser.add_argument("--busy-cores", type=float, default=0.3,
                        help="a timed run during which other processes used this many cores or more is dropped")
    parser.add_argument("--retries", type=int, default=3, help="extra timed runs allowed per measurement for dropped ones")
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="total seconds the run may spend waiting for other processes to leave the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="fast smoke run with small sizes (< 1 minute)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save/load bars would interleave with the progress lines
    bench = Bench(args)

    print(f"OFA-UFO foundation benchmark: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ofa_ufo {ofa_ufo.__version__}, "
          f"python {platform.python_version()}")
    print(device_name())
    print(f"settings: models {', '.join(args.models)}; {args.image_size}px; batch {args.batch}; "
          f"{args.new_tokens} new tokens (generate), {args.pipeline_new_tokens} (pipeline); "
          f"{args.warmup} warmup + {args.repeats} timed run(s); seed {args.seed}", flush=True)

    images = make_images(args.batch, args.seed)
    results = {name: bench_model(bench, name, images) for name in args.models}
    table, misses = build_table(results, args)
    total = time.perf_counter() - START

    print()
    print(f"Results ({args.image_size}px, batch {args.batch}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} timed run(s) after {args.warmup} warmup unless (n=) says otherwise):")
    print(table)
    for note in bench.notes:
        print(f"note: {note}")
    print("Goals: " + ("all met." if not misses else "MISSED: " + "; ".join(misses)))
    print(f"Total runtime {total:.0f}s ({total / 60:.1f} min), of which {bench.monitor.waited:.0f}s "
          "waiting for other processes to leave the CPU")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(dict(args=vars(args), results=results, misses=misses, notes=bench.notes,
                           total_seconds=total), handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
