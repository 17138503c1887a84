"""Training-step benchmark: samples/s and peak memory of the trainer's step for tiny and base.

    .venv/bin/python benchmarks/bench_train.py [--image-size 256] [--batch-size 8] [--steps 5] [--data-workers 0]
    .venv/bin/python benchmarks/bench_train.py --precision fp32 bf16   # the same steps in both, side by side
    .venv/bin/python benchmarks/bench_train.py --config pretrain_demo_base --precision fp32 bf16   # a config's step

Each model runs in its own subprocess (so peak RSS is its own): the real `Trainer.train_step`
(mixture batch of caption/VQA/grounding/detection/classification, forward, backward, clipping,
AdamW) after warm-up steps. FLOPs per step come from torch's FlopCounterMode on one step, so
the table also shows achieved GFLOP/s; on a GPU (bf16 autocast) it adds MFU against the
device's dense bf16 peak (`--peak-tflops`, default 989 for an H100/H200 SXM).

The step includes building the batch (rendering generated scenes, tokenising) on the CPU. A
second timing replays batches built beforehand, so "model step" is the forward, backward and
update alone: on a GPU the two differ by the data pipeline, and MFU is given for both.
`--data-workers N` builds the batches in N DataLoader workers while the model trains (the
trainer's `data_workers`), which is what closes that gap. `--stem-warmup N` also times the ResNet stem's
warm-up (`stem_warmup_images: N`, 4 x 4 sub-cells, as the embedded defaults run it before step 0) in each
precision, with its held-out object-cell accuracy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

TASKS = {"caption": 1.0, "vqa": 1.0, "grounding": 1.0, "detection": 1.0, "classification": 1.0}


def config_for(model: str, image_size: int, batch_size: int, steps: int, warmup: int, data_workers: int,
               precision: str, tmp: str, config_name: str | None):
    """The 5-task mixture at `image_size` / `batch_size` for `model`, or the named config as it trains (its model,
    size, batch, tasks, frozen parts and losses) from random weights: no stem warm-up, no growth."""
    from ofa_ufo.training import TrainConfig
    from ofa_ufo.training.config import load_config

    if config_name:
        return load_config(config_name, [f"precision={precision}", f"output_dir={tmp}", "eval_examples=0",
                                         f"max_steps={warmup + 2 * steps + 1}", f"data_workers={data_workers}",
                                         "stem_warmup_images=0", "grow_from=''", "grow_overrides=[]"])
    return TrainConfig(model=model, model_overrides={"image_size": image_size, "dropout": 0.1},
                       tasks=TASKS, batch_size=batch_size, max_steps=warmup + 2 * steps + 1, lr=1e-4,
                       eval_examples=0, output_dir=tmp, data_workers=data_workers, precision=precision)


def measure(model: str, image_size: int, batch_size: int, steps: int, warmup: int,
            data_workers: int, precision: str, stem_images: int = 0, config_name: str | None = None,
            profile: bool = False) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ofa_ufo.core.timing import device_name
    from ofa_ufo.training import Trainer
    from ofa_ufo.training.stem_warmup import warm_up_stem

    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(model, image_size, batch_size, steps, warmup, data_workers, precision, tmp, config_name)
        trainer = Trainer(config, resume="never")
        stem = {}
        if stem_images:
            stem = warm_up_stem(trainer.unwrapped, trainer.processor, stem_images, subcells=4,
                                show_progress=False, dtype=trainer.precision.dtype)
        trainer._train_mode()  # as the training loop sets it: a frozen stem's BatchNorm on running statistics
        gpu = torch.cuda.is_available()

        def step() -> None:
            trainer.train_step()
            trainer.step += 1  # as the training loop does: the next step's batches

        for _ in range(warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        prepared = []
        for _ in range(steps):
            prepared.append(trainer._micro_batches())
            trainer.step += 1
        trainer._micro_batches = iter(prepared).__next__
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if gpu:
            torch.cuda.synchronize()
        model_seconds = (time.perf_counter() - start) / steps
        params = sum(p.numel() for p in trainer.unwrapped.parameters())
        top_ops = ""
        if profile:
            trainer._micro_batches = iter([trainer.batches.for_step(trainer.step)]).__next__
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                trainer.train_step()
            events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
            top_ops = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ({e.count})" for e in events[:8])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"params_m": params / 1e6, "step_s": seconds, "samples_s": config.batch_size / seconds,
            "image_size": trainer.unwrapped.config.image_size, "batch_size": config.batch_size,
            "model_step_s": model_seconds, "gflop_step": flops / 1e9, "gflops_s": flops / seconds / 1e9,
            "model_gflops_s": flops / model_seconds / 1e9, "peak_mib": peak,
            "device": device_name("cuda" if gpu else "cpu"), "gpu": gpu, "precision": trainer.precision.precision,
            "stem_warmup": stem, "top_ops": top_ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ofa_ufo_tiny", "ofa_ufo_base"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--data-workers", type=int, default=0, help="DataLoader workers building the batches")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                        help="the trainer's precision; several: each model timed in each")
    parser.add_argument("--stem-warmup", type=int, default=0, metavar="IMAGES",
                        help="also time the stem warm-up on this many generated scenes")
    parser.add_argument("--config", help="time this training config's own step (model, size, batch, tasks, frozen "
                        "parts) instead of --models at --image-size / --batch-size, e.g. pretrain_demo_base")
    parser.add_argument("--profile", action="store_true",
                        help="also the ops taking most self CPU time in one model step (torch.profiler)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.image_size, args.batch_size, args.steps, args.warmup,
                                 args.data_workers, args.precision[0], args.stem_warmup, args.config,
                                 args.profile)))
        return
    rows = []
    for model in [args.config] if args.config else args.models:
        for precision in args.precision:
            command = [sys.executable, __file__, "--child", model, "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--data-workers", str(args.data_workers), "--precision", precision,
                       "--stem-warmup", str(args.stem_warmup)] + (["--config", args.config] if args.config else [])
            command += ["--profile"] if args.profile else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{model} ({precision}): the measuring process failed (exit {done.returncode}):\n"
                         f"{done.stderr[-4000:]}")
            rows.append((model, json.loads(done.stdout.strip().splitlines()[-1])))
    first = rows[0][1]
    mixture = f"config {args.config}" if args.config else "5-task mixture"
    print(f"train step, {first['image_size']} px, batch {first['batch_size']} ({mixture}), {args.steps} timed steps, "
          f"{args.data_workers} data workers")
    print("| model | precision | params (M) | device | step (s) | model step (s) | samples/s | GFLOP/step | GFLOP/s "
          "| peak memory (MiB) | MFU step / model step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, r in rows:
        mfu = "-"
        if r["gpu"]:
            peak = args.peak_tflops * 1e3
            mfu = f"{r['gflops_s'] / peak:.1%} / {r['model_gflops_s'] / peak:.1%}"
        print(f"| {model} | {r['precision']} | {r['params_m']:.1f} | {r['device']} | {r['step_s']:.3f} | "
              f"{r['model_step_s']:.3f} | {r['samples_s']:.2f} | {r['gflop_step']:.1f} | {r['gflops_s']:.1f} | "
              f"{r['peak_mib']:.0f} | {mfu} |")
    for model, r in rows if args.profile else []:
        print(f"{model} ({r['precision']}), one model step, top ops (self ms, calls): {r['top_ops']}")
    if args.stem_warmup:
        print(f"\nstem warm-up, {args.stem_warmup} generated scenes at {args.image_size} px "
              "(batch 32, 4 x 4 sub-cells)")
        print("| model | precision | seconds | held-out object-cell accuracy |")
        print("|---|---|---|---|")
        for model, r in rows:
            w = r["stem_warmup"]
            print(f"| {model} | {w['precision']} | {w['seconds']:.1f} | {w['object_cell_accuracy']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"image_size": args.image_size, "batch_size": args.batch_size, "data_workers": args.data_workers,
                       "rows": [dict(r, model=model) for model, r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
