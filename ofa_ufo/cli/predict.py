"""`ofa-ufo predict`: one JSON line per input image (or JSON Lines record), through `pipeline("ofa-ufo")`.

    ofa-ufo predict --model DIR --task caption photos/ cat.jpg > captions.jsonl
    ofa-ufo predict --model DIR --task vqa --text "what color is the car?" car.jpg
    ofa-ufo predict --model DIR --prompt " what is in the corner?" --output out.jsonl inputs.jsonl

Inputs are image files, folders (their images, sorted) and `.jsonl` files whose lines hold `image` (a
path relative to the file, or absolute) and optionally `text` and `id`. An input that cannot be answered
gets `{"error": ...}` and the others are still answered; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm
from transformers import pipeline

from ofa_ufo.core.images import IMAGE_SUFFIXES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-ufo predict", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or .jsonl files")
    p.add_argument("--model", required=True, help="a save_pretrained model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="a registered task (caption, vqa, grounding, detection, ...)")
    what.add_argument("--prompt", help="a free prompt, used as given")
    p.add_argument("--text", help="the task's text for every input (a question, an expression); "
                   "a .jsonl line's own `text` wins")
    p.add_argument("--style", default="ofa", help="prompt style (a table in prompts/)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    p.add_argument("--num-beams", type=int, help="beam size (default: the task's)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: the task's)")
    p.add_argument("--output", help="JSON Lines file to write (default: standard output)")
    p.add_argument("--image-dir",
                   help="where generated images are saved (default: <output>_images or ./predict_images)")
    return p


def read_inputs(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """One record {"id", "image", "text"?} per image file, image in a folder, or line of a .jsonl file."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from ({"id": str(p), "image": str(p)} for p in sorted(path.iterdir())
                        if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".jsonl":
            yield from _jsonl_records(path)
        else:
            yield {"id": name, "image": name}


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or "image" not in record:
            raise ValueError(f"{path}:{number}: expected a JSON object with an `image` field")
        image = record["image"]
        if isinstance(image, str) and not Path(image).is_absolute() and "://" not in image:
            image = str(path.parent / image)
        yield {"id": record.get("id", f"{path}:{number}"), "image": image, "text": record.get("text")}


def _jsonable(result: dict[str, Any], image_dir: Path, index: int) -> dict[str, Any]:
    """Generated images are saved as PNG and named by path; everything else is JSON already."""
    out = dict(result)
    if isinstance(out.get("image"), Image.Image):
        image_dir.mkdir(parents=True, exist_ok=True)
        target = image_dir / f"{index:06d}.png"
        out["image"].save(target)
        out["image"] = str(target)
    return out


def answer(pipe, records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The pipeline's results for one chunk of records, in order (errors as records)."""
    settings = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    texts = [r.get("text") or (args.text if args.task else args.prompt) for r in records]
    texts = texts if any(t is not None for t in texts) else None
    call = dict(task=args.task, text=texts) if args.task else dict(prompt=texts)
    return pipe([r["image"] for r in records], batch_size=args.batch_size, style=args.style, **call, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        parser().error(f"--batch-size must be at least 1, got {args.batch_size}")
    records = list(read_inputs(args.inputs))
    if not records:
        raise ValueError(f"no images found in {args.inputs}")
    pipe = pipeline("ofa-ufo", model=args.model)
    default_dir = f"{Path(args.output).with_suffix('')}_images" if args.output else "predict_images"
    image_dir = Path(args.image_dir or default_dir)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    failed, step = 0, args.batch_size * 4
    try:
        with tqdm(total=len(records), unit="input", desc="predict", file=sys.stderr) as bar:
            for start in range(0, len(records), step):
                chunk = records[start : start + step]
                for i, (record, result) in enumerate(zip(chunk, answer(pipe, chunk, args)), start):
                    failed += "error" in result
                    out.write(json.dumps({"id": record["id"], **_jsonable(result, image_dir, i)}) + "\n")
                bar.update(len(chunk))
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"ofa-ufo predict: {failed} of {len(records)} inputs could not be answered (see their `error`)",
              file=sys.stderr)
    return 1 if failed else 0
