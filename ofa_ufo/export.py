"""Export a model directory to ONNX (encoder + decoder-with-past graphs that ONNX Runtime serves), or to
a PyTorch directory with dynamic int8 Linear layers (`--format torch --quantize int8`).

`pipeline("ofa-ufo", model=OUTPUT)` and `AutoModelForSeq2SeqLM.from_pretrained(OUTPUT)` load the result.

    python -m ofa_ufo.export --model caption_subnet/ --format onnx --output caption_onnx/
    python -m ofa_ufo.export --model caption_subnet/ --format onnx --output caption_int8/ --quantize int8
    python -m ofa_ufo.export --model caption_subnet/ --format onnx --output caption_int8/ --quantize int8 \
        --calibration photos/    # int8 convolutions too, their activation ranges measured on these images
    ofa-ufo export --model SUPERNET_DIR --task grounding --format onnx --output grounding_onnx/
    ofa-ufo export --model SUPERNET_DIR --task caption --format torch --quantize int8 --output caption_int8_pt/

A routed UFO supernet is exported only with `--task` (its subnet for that task is extracted first).
The dense detector (a directory of `ofa_ufo.extract_dense_detector`, or a model with a dense head and
`--task dense_detection`) exports as one graph, model.onnx, that `OnnxDetector` runs:

    ofa-ufo export --model DETECTOR_DIR --format onnx --output detector_onnx/
    ofa-ufo export --model SUPERNET_DIR --task dense_detection --format onnx --output detector_onnx/
Details and measured parity: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from transformers import AutoConfig, AutoModelForObjectDetection, AutoModelForSeq2SeqLM, AutoProcessor

from ofa_ufo.core.images import IMAGE_SUFFIXES
from ofa_ufo.deploy.dense_detector import export_detector_onnx, extract_dense_detector
from ofa_ufo.deploy.onnx_export import DEFAULT_OPSET, QUANTIZATIONS, export_onnx
from ofa_ufo.deploy.quantize import quantize_int8_dynamic
from ofa_ufo.hf.image_processing_detection import OFAUFODetectorImageProcessor
from ofa_ufo.hf.modeling import DENSE_TASK
from ofa_ufo.hf.modeling_detection import OFAUFODetectorConfig

FORMATS = ("onnx", "torch")
CALIBRATION_IMAGES = 64  # activation ranges settle within a few dozen images; more only slows the export


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.export", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--model", required=True, help="a save_pretrained model directory (PyTorch weights)")
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="int8: dynamic quantisation (ONNX Runtime's for onnx, PyTorch's for torch)")
    parser.add_argument("--task", help="for a routed UFO supernet: the task whose subnet to export; "
                        "dense_detection: the dense detector (docs/dense_detection.md)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--calibration", metavar="DIR",
                        help="with --format onnx --quantize int8: a folder of images like those the model will see "
                        f"(the first {CALIBRATION_IMAGES}, sorted by name); the convolutions become int8 too")
    parser.add_argument("--no-simplify", dest="simplify", action="store_false",
                        help="with --format onnx: keep the traced graphs as they are (default: onnxslim folds "
                        "their shape arithmetic, which makes each decoder step faster)")
    args = parser.parse_args(argv)
    try:
        if args.task == DENSE_TASK or _is_detector(args.model):
            return export_detector(args)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
        if args.format == "torch":
            return export_torch(model, processor, args)
        output = export_onnx(model, args.output, processor, task=args.task, quantize=args.quantize,
                             opset=args.opset, source=args.model, calibration=calibration_images(args),
                             simplify=args.simplify)
    except (ValueError, TypeError, OSError) as error:  # OSError: a missing or unreadable model directory
        print(f"export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"wrote {output}: encoder + decoder-with-past graphs ({args.quantize or 'fp32'}, opset {args.opset})")
    return 0


def calibration_images(args: argparse.Namespace) -> list[Image.Image] | None:
    """The images of `--calibration` (None without it), checked against the other options."""
    if args.calibration is None:
        return None
    if args.format != "onnx" or args.quantize != "int8":
        raise ValueError("--calibration calibrates int8 convolutions: it needs --format onnx --quantize int8")
    folder = Path(args.calibration)
    if not folder.is_dir():
        raise ValueError(f"--calibration {folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:CALIBRATION_IMAGES]
    if not files:
        raise ValueError(f"--calibration {folder}: no images there ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise ValueError(f"--calibration: cannot read {file} as an image ({error})") from error
    return images


def export_torch(model, processor, args: argparse.Namespace) -> int:
    """The `torch` format: the (task subnet of the) model, with `--quantize int8` its dynamic int8 copy
    (`ofa_ufo.deploy.quantize`), saved with its processor for `pipeline("ofa-ufo", model=OUTPUT)`."""
    if args.quantize != "int8":
        raise ValueError("--format torch writes a quantised model: add --quantize int8 (a dense fp32 subnet is "
                         "`ofa-ufo extract`)")
    quantize_int8_dynamic(model, task=args.task).save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote {args.output}: PyTorch model with int8 dynamic Linear layers (load with from_pretrained)")
    return 0


def _is_detector(path: str) -> bool:
    """Whether `path` holds an extracted dense detector (a probe: an unreadable directory is left to the
    loader that follows, whose errors name the file)."""
    try:
        return isinstance(AutoConfig.from_pretrained(path), OFAUFODetectorConfig)
    except (OSError, ValueError):
        return False


def export_detector(args: argparse.Namespace) -> int:
    """The dense detector's ONNX graph: from a detector directory, or extracted (fused) from a model with a
    dense head (`--task dense_detection`)."""
    if args.format != "onnx":
        raise ValueError(f"the dense detector exports to onnx only, not --format {args.format}")
    if _is_detector(args.model):
        detector = AutoModelForObjectDetection.from_pretrained(args.model)
    else:
        detector = extract_dense_detector(AutoModelForSeq2SeqLM.from_pretrained(args.model), args.task, fuse=True)
    processor = OFAUFODetectorImageProcessor(size=detector.config.image_size)
    export_detector_onnx(detector, args.output, processor, quantize=args.quantize, opset=args.opset,
                         calibration=calibration_images(args))
    print(f"wrote {args.output}: dense detector graph ({args.quantize or 'fp32'}, opset {args.opset}, batch dynamic)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
