"""Resident memory and read throughput of the streamed training data (`ofa_ufo.data.streaming`).

Writes `--examples` small examples twice in a temporary folder (OFA caption TSV shards with tiny base64
PNG images, and one canonical JSON Lines file of VQA examples), then draws them through the trainer's
path: a `StreamSource` per task and `Mixture.micro_batch` (caption 3 : vqa 1), every drawn example
built (the TSV images decoded). Prints the process's resident memory every `--every` examples (the
curve: flat when nothing is kept) and the read throughput in examples/s, set against the trainer's
step rate quoted from benchmarks/README.md. `--eager N` also loads N TSV examples into a list the way
the old path did (`list(load_ofa_tsv(...))`), to show what materialising costs.

    python benchmarks/streaming_memory.py                 # 200k examples, curve every 20k
    python benchmarks/streaming_memory.py --eager 200000  # and the materialised list for contrast
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from ofa_ufo.core.timing import device_name
from ofa_ufo.data.loaders import load_ofa_tsv
from ofa_ufo.data.streaming import open_shards
from ofa_ufo.training.mixture import Mixture, StreamSource

# examples/s the trainer consumes (benchmarks/README.md, "bench_train.py"): tiny on the 2-core CPU,
# batch 8, 256 px; base on one H200, batch 256 with 12 data workers
TRAINER_RATES = {"ofa_ufo_tiny, 2-core CPU": 4.52, "ofa_ufo_base, H200, batch 256": 812.1}
QUOTAS = {"caption": 3, "vqa": 1}


def rss_mib() -> float:
    """This process's resident set size (VmRSS of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def tiny_pngs(count: int, size: int) -> list[str]:
    """`count` distinct small PNG images, base64-encoded."""
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (i * 16 % 256, 255 - i * 16 % 256, 90)).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return images


def write_data(folder: Path, examples: int, shards: int, size: int) -> tuple[Path, Path]:
    """`examples` TSV caption rows in `shards` files and `examples` JSONL VQA rows; (TSV folder, JSONL file)."""
    images, tsv = tiny_pngs(16, size), folder / "caption"
    tsv.mkdir()
    per_shard = -(-examples // shards)
    for s in range(shards):
        with open(tsv / f"part-{s:03d}.tsv", "w") as handle:
            for i in range(s * per_shard, min(examples, (s + 1) * per_shard)):
                handle.write(f"c{i}\timg{i}\ta small shape number {i}\tshape\t{images[i % 16]}\n")
    Image.open(io.BytesIO(base64.b64decode(images[0]))).save(folder / "img.png")
    jsonl = folder / "vqa.jsonl"
    with open(jsonl, "w") as handle:
        for i in range(examples):
            row = {"id": f"q{i}", "task": "vqa", "image": "img.png", "text": f"what is shape {i}?", "target": "red"}
            handle.write(json.dumps(row) + "\n")
    return tsv, jsonl


def stream(tsv: Path, jsonl: Path, examples: int, every: int) -> None:
    """Draw `examples` through the mixture; print the memory curve and throughput."""
    sources = {"caption": StreamSource("caption", open_shards(tsv, "caption"), seed=0),
               "vqa": StreamSource("vqa", open_shards(jsonl), seed=0)}
    mixture, batch = Mixture(sources, QUOTAS), sum(QUOTAS.values())
    print(f"{'examples':>9} {'RSS (MiB)':>10} {'examples/s':>11}")
    start, drawn, images = time.perf_counter(), 0, 0
    print(f"{0:>9} {rss_mib():>10.1f} {'':>11}")
    for step in range(examples // batch):
        for example in mixture.micro_batch(step, 0, 1):
            images += example["image"] is not None
        drawn += batch
        if drawn % every < batch:
            print(f"{drawn:>9} {rss_mib():>10.1f} {drawn / (time.perf_counter() - start):>11.0f}")
    rate = drawn / (time.perf_counter() - start)
    print(f"read throughput: {rate:.0f} examples/s over {drawn} examples ({images} with an image)")
    for name, trainer_rate in TRAINER_RATES.items():
        print(f"  vs the trainer's {trainer_rate} examples/s ({name}): {rate / trainer_rate:.0f}x")


def eager(tsv: Path, count: int) -> None:
    """RSS before and after materialising `count` TSV examples in a list (the pre-streaming path)."""
    before, kept = rss_mib(), []
    for path in sorted(tsv.iterdir()):
        kept.extend(load_ofa_tsv(path, "caption"))
        if len(kept) >= count:
            break
    print(f"eager list of {len(kept[:count])} TSV examples: RSS {before:.1f} -> {rss_mib():.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200_000, help="examples per format (default 200000)")
    parser.add_argument("--every", type=int, default=20_000, help="print memory every N drawn examples")
    parser.add_argument("--shards", type=int, default=10, help="TSV shard files (default 10)")
    parser.add_argument("--image-size", type=int, default=8, help="side of the PNG images, px (default 8)")
    parser.add_argument("--eager", type=int, default=0, help="also materialise N TSV examples in a list")
    args = parser.parse_args()
    print(f"{device_name()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tsv, jsonl = write_data(Path(tmp), args.examples, args.shards, args.image_size)
        print(f"wrote {args.examples} TSV + {args.examples} JSONL examples in {time.perf_counter() - start:.1f} s")
        stream(tsv, jsonl, args.examples, args.every)
        if args.eager:
            eager(tsv, args.eager)


if __name__ == "__main__":
    main()
