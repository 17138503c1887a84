"""The machine's real roofline: bf16 vs fp32 (encoder, train step, beam-5 caption) and int8 vs fp32 (greedy
decode), side by side in one run, on the CPU it runs on (issue 34).

    .venv/bin/python benchmarks/precision.py            # base, 384 px (train step: 96 px, batch 10)
    .venv/bin/python benchmarks/precision.py --quick    # a tiny model, under a minute
    .venv/bin/python benchmarks/precision.py --force-bf16   # time bf16 even where it is emulated
    .venv/bin/python benchmarks/precision.py --model DIR --parts caption --agreement-images 50   # a trained model

The first line is the ISA line: the CPU, the flags that decide bf16, and the decision. Where bf16 is not
fast (no AMX / AVX512-BF16: bf16 is emulated, ~150x slower than fp32) the bf16 rows are skipped with the
reason, unless `--force-bf16` (or `--quick`, whose tiny bf16 rows are labelled "emulated"). bf16 here
means bf16 weights and pixels for inference (what `precision="bf16"` loads) and bf16 autocast over fp32
weights for training (what the trainer does). Peak memory of a train step is the process's resident
high-water mark (VmHWM, reset before each measurement through /proc/self/clear_refs; Linux only).
The ModelScope comparison needs the oracle environment: benchmarks/bench_vs_modelscope.py.
Agreement is over random colour fields for a random preset; with `--model` (a trained `save_pretrained`
directory, at its own image size) over generated demo scenes, where a trained model's answers are not the
near-ties of random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ofa_ufo
from ofa_ufo.core.hardware import cpu_flags, cpuinfo_path, precision_support
from ofa_ufo.core.timing import cpu_name, interleaved_times, median_time
from ofa_ufo.hf.modeling import with_precision

REPO = Path(__file__).resolve().parents[1]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128)
PROMPT = " what does the image describe?"
PARTS = ("encoder", "train", "caption", "int8")


def isa_line() -> str:
    """The CPU, which of the flags that matter it has, and what that decides."""
    flags = cpu_flags(cpuinfo_path())
    present = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)
    return f"ISA: {cpu_name(cpuinfo_path())} | flags: {present} | {precision_support('cpu').summary}"


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(count)]


def demo_images(count: int) -> list[Image.Image]:
    """Generated demo scenes as the trainer draws them (256 px, the processor resizes), a split of their own."""
    from ofa_ufo.data.demo_scenes import DemoScenes

    scenes = DemoScenes("precision_agreement", count, seed=0)
    return [scenes[i].image for i in range(count)]


def build(preset: str, image_size: int, quick: bool, model_dir: str | None = None):
    """(fp32 model in eval mode, processor) of a random preset at `image_size`, or of `model_dir` (its own size)."""
    if model_dir:
        return (ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(model_dir).eval(),
                ofa_ufo.OFAUFOProcessor.from_pretrained(model_dir))
    torch.manual_seed(0)
    overrides = dict(TINY) if quick else {}
    model = ofa_ufo.create_model(preset, image_size=image_size, dropout=0.0, **overrides).eval()
    return model, ofa_ufo.create_processor(preset, image_size=image_size)


def as_bf16(model):
    """A bf16-weight copy (what `from_pretrained(..., precision="bf16")` loads: on a CPU, Linear weights
    packed for oneDNN)."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return with_precision(twin, "bf16")


def inputs_for(processor, count: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    batch = processor(images=images(count), text=[PROMPT] * count, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def encoder_times(model, bf16, processor, batch: int, repeats: int) -> tuple[float, float | None]:
    """Median seconds of one encoder forward of `batch` images: fp32, then bf16 (None when not run), the two
    timed in interleaved rounds so that a machine whose speed drifts hands the drift to neither."""
    with torch.inference_mode():
        fp32_inputs = inputs_for(processor, batch, torch.float32)
        fns = {"fp32": lambda: model.get_encoder()(**fp32_inputs)}
        if bf16 is not None:
            bf16_inputs = inputs_for(processor, batch, torch.bfloat16)
            fns["bf16"] = lambda: bf16.get_encoder()(**bf16_inputs)
        times = interleaved_times(fns, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians["fp32"], medians.get("bf16")


def train_step_stats(model, processor, batch: int, autocast: bool, repeats: int) -> tuple[float, int]:
    """(median seconds of one AdamW step on `batch` caption examples, peak resident bytes while stepping)."""
    model = type(model)(model.config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs = inputs_for(processor, batch, torch.float32)
    labels = torch.randint(4, 1000, (batch, 12))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates the optimizer state: part of the steady-state peak
    reset_hwm()
    seconds = median_time(step, repeats, warmup=0)
    return seconds, hwm_bytes()


def caption(model, processor, image: Image.Image, dtype: torch.dtype, beams: int, tokens: int, fixed: bool):
    """Token ids of one caption (exactly `tokens` new ones when `fixed`, so that timings do the same work)."""
    inputs = inputs_for(processor, 1, dtype) if image is None else processor(images=image, text=PROMPT,
                                                                             return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    lengths = dict(min_new_tokens=tokens) if fixed else {}
    with torch.inference_mode():
        return model.generate(**inputs, num_beams=beams, max_new_tokens=tokens, **lengths)[0].tolist()


def agreement(reference, other, processor, dtype, beams: int, pictures: list[Image.Image], tokens: int) -> float:
    """Share of `pictures` whose caption tokens are identical to the fp32 model's."""
    same = sum(caption(reference, processor, image, torch.float32, beams, tokens, False)
               == caption(other, processor, image, dtype, beams, tokens, False) for image in pictures)
    return same / len(pictures)


def row(figure: str, fp32: float | None, other: float | None, unit: str, higher_is_better: bool = False) -> str:
    if other is None or fp32 is None:
        return f"| {figure} | {fp32:.3f} {unit} | skipped | - |"
    ratio = other / fp32 if higher_is_better else fp32 / other
    return f"| {figure} | {fp32:.3f} {unit} | {other:.3f} {unit} | {ratio:.2f}x |"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a d_model-64 model at 64 px: under a minute")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU emulates it")
    parser.add_argument("--preset", default="ofa_ufo_base")
    parser.add_argument("--model", help="a trained save_pretrained directory instead of the random preset")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8, help="encoder forward batch")
    parser.add_argument("--train-image-size", type=int, default=96)
    parser.add_argument("--train-batch", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--agreement-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true",
                        help="where the time goes (torch.profiler): the bf16 encoder and caption, and with int8 "
                        "one greedy decode in fp32 and int8")
    parser.add_argument("--onnx", action="store_true",
                        help="with int8: also the greedy decode on ONNX Runtime fp32 and int8 graphs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    if not args.parts <= set(PARTS):
        parser.error(f"--parts: unknown {sorted(args.parts - set(PARTS))}; choose from {','.join(PARTS)}")
    if args.quick:
        args.preset, args.image_size, args.train_image_size, args.batch, args.train_batch = "ofa_ufo_tiny", 64, 64, 2, 2
        args.agreement_images, args.repeats, args.new_tokens, args.threads = 2, 1, 6, args.threads or 1
    return args


def main() -> None:
    args = parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(isa_line(), flush=True)
    fast = precision_support("cpu").bf16_fast
    run_bf16 = fast or args.force_bf16 or args.quick
    label = "bf16" if fast else "bf16 (emulated: this CPU has no native bf16)"
    if not run_bf16:
        print("bf16 is not used on this CPU (no amx_bf16 / avx512_bf16: it would be emulated, ~150x slower "
              "than fp32): bf16 rows skipped; --force-bf16 times them anyway", flush=True)
    what = args.model or f"{args.preset} (random init)"
    print(f"threads {torch.get_num_threads()}; model {what}; other jobs may share this machine", flush=True)
    model, processor = build(args.preset, args.image_size, args.quick, args.model)
    args.image_size = model.config.image_size
    args.pictures = (demo_images(args.agreement_images) if args.model
                     else images(args.agreement_images))
    bf16 = as_bf16(model) if run_bf16 else None
    lines = [f"| figure | fp32 | {label} / int8 | speed-up |", "|---|---|---|---|"]
    if "encoder" in args.parts:
        fp32_s, bf16_s = encoder_times(model, bf16, processor, args.batch, args.repeats)
        lines.append(row(f"encoder forward, {args.image_size} px, batch {args.batch} (bf16)", fp32_s, bf16_s, "s"))
        print(lines[-1], flush=True)
        if args.profile and bf16 is not None:
            encoder_inputs = inputs_for(processor, args.batch, torch.bfloat16)
            with torch.inference_mode():
                print(profile_line(f"bf16 encoder, batch {args.batch}",
                                   lambda: bf16.get_encoder()(**encoder_inputs), 8), flush=True)
    if "train" in args.parts:
        lines += train_rows(args, run_bf16)
    if "caption" in args.parts:
        lines += caption_rows(args, model, bf16, processor)
        if args.profile and bf16 is not None:
            print(profile_line("bf16 beam-5 caption", lambda: caption(bf16, processor, None, torch.bfloat16, 5,
                                                                      args.new_tokens, True), 8), flush=True)
    if "int8" in args.parts:
        lines += int8_rows(args, model, processor)
    print("\n".join(lines))
    print("ModelScope OFA comparison (beam-5 caption vs ModelScope fp32): run "
          f"{'.venv-oracle/bin/python' if (REPO / '.venv-oracle').is_dir() else '(no .venv-oracle here)'} "
          "benchmarks/bench_vs_modelscope.py; not part of this script")


def train_rows(args: argparse.Namespace, run_bf16: bool) -> list[str]:
    model, processor = build(args.preset, args.train_image_size, args.quick, args.model)
    fp32 = train_step_stats(model, processor, args.train_batch, False, args.repeats)
    bf16 = train_step_stats(model, processor, args.train_batch, True, args.repeats) if run_bf16 else (None, None)
    what = f"train step, {args.train_image_size} px, batch {args.train_batch} (bf16 autocast)"
    rows = [row(what, fp32[0], bf16[0], "s")]
    mib = [None if b is None else b / 2**20 for b in (fp32[1], bf16[1])]
    peak = f"| peak resident memory of that step | {mib[0]:.0f} MiB | " + (
        f"{mib[1]:.0f} MiB | {mib[1] / mib[0]:.2f}x of fp32 |" if mib[1] is not None else "skipped | - |")
    print("\n".join([*rows, peak]), flush=True)
    return [*rows, peak]


def caption_rows(args: argparse.Namespace, model, bf16, processor) -> list[str]:
    tokens = args.new_tokens
    fns = {"fp32": lambda: caption(model, processor, None, torch.float32, 5, tokens, True)}
    if bf16 is not None:
        fns["bf16"] = lambda: caption(bf16, processor, None, torch.bfloat16, 5, tokens, True)
    medians = {name: statistics.median(values) for name, values in interleaved_times(fns, args.repeats).items()}
    fp32, other = medians["fp32"], medians.get("bf16")
    rows = [row(f"beam-5 caption, {args.image_size} px, {tokens} new tokens (bf16)", fp32, other, "s")]
    if bf16 is not None:
        for beams, name in ((1, "greedy"), (5, "beam-5")):
            share = agreement(model, bf16, processor, torch.bfloat16, beams, args.pictures, tokens)
            rows.append(f"| {name} tokens identical to fp32 (bf16), {args.agreement_images} images | - | "
                        f"{share:.0%} | - |")
    print("\n".join(rows), flush=True)
    return rows


def decode_call(model, processor, tokens: int):
    """A greedy decode of exactly `tokens` tokens, batch 1, over an encoder output computed here once."""
    inputs = inputs_for(processor, 1, torch.float32)
    with torch.inference_mode():
        encoded = model.get_encoder()(**inputs)
    prompt = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], encoder_outputs=encoded)

    def call():
        with torch.inference_mode():
            return model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens)
    return call


def decode_speed(model, processor, tokens: int, repeats: int) -> float:
    """Greedy decoder tokens/s, batch 1: the encoder runs once before the clock (its cost is the encoder row's)."""
    return tokens / median_time(decode_call(model, processor, tokens), repeats)


def profile_line(label: str, call, top: int = 6) -> str:
    """The ops taking most self CPU time in one call of `call` (after one unprofiled call)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    return f"{label}: {total:.0f} ms of op time; top ops (self ms, calls): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ({e.count})" for e in events[:top])


def print_profile(models: dict, processor, tokens: int, top: int = 6) -> None:
    """Per model, the ops taking most self CPU time in one greedy decode (after one unprofiled call)."""
    for name, model in models.items():
        print(profile_line(f"{name}, greedy decode of {tokens} tokens", decode_call(model, processor, tokens), top),
              flush=True)


def int8_rows(args: argparse.Namespace, model, processor) -> list[str]:
    int8 = ofa_ufo.quantize_int8_dynamic(model)
    fp32_head = ofa_ufo.quantize_int8_dynamic(model, head=False)
    tokens = 2 * args.new_tokens
    calls = {name: decode_call(m, processor, tokens) for name, m in (("fp32", model), ("fp32 head", fp32_head),
                                                                     ("int8", int8))}
    speeds = [tokens / statistics.median(t) for t in interleaved_times(calls, args.repeats).values()]
    share = agreement(model, int8, processor, torch.float32, 1, args.pictures, args.new_tokens)
    what = f"greedy decode, {tokens} new tokens, encoder precomputed"
    rows = [row(f"{what} (int8 layers, fp32 output head)", speeds[0], speeds[1], "tokens/s", True),
            row(f"{what} (int8, output head included)", speeds[0], speeds[2], "tokens/s", True),
            f"| greedy tokens identical to fp32 (int8), {args.agreement_images} images | - | {share:.0%} | - |"]
    if args.onnx:
        rows += onnx_rows(args, model, processor, speeds[0], tokens, what)
    print("\n".join(rows), flush=True)
    if args.profile:
        print_profile({"fp32": model, "int8": int8}, processor, tokens)
    return rows


def onnx_rows(args: argparse.Namespace, model, processor, fp32_speed: float, tokens: int, what: str) -> list[str]:
    """The same greedy decode on ONNX Runtime graphs (`ofa-ufo export --format onnx [--quantize int8]`), with
    as many threads as torch, against PyTorch fp32."""
    from ofa_ufo.deploy.onnx_export import export_onnx, load_onnx_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for quantize in (None, "int8"):
            path = export_onnx(model, Path(scratch) / str(quantize), processor, quantize=quantize)
            ort = load_onnx_model(path, threads=torch.get_num_threads())
            speed = decode_speed(ort, processor, tokens, args.repeats)
            rows.append(row(f"{what} (ONNX Runtime {quantize or 'fp32'})", fp32_speed, speed, "tokens/s", True))
            if quantize:
                share = agreement(model, ort, processor, torch.float32, 1, args.pictures, args.new_tokens)
                rows.append(f"| greedy tokens identical to fp32 (ONNX Runtime int8), {args.agreement_images} images "
                            f"| - | {share:.0%} | - |")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
