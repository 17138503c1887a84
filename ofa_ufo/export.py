"""Export a model directory to ONNX: encoder + decoder-with-past graphs that ONNX Runtime serves.

`pipeline("ofa-ufo", model=OUTPUT)` and `AutoModelForSeq2SeqLM.from_pretrained(OUTPUT)` load the result.

    python -m ofa_ufo.export --model caption_subnet/ --format onnx --output caption_onnx/
    python -m ofa_ufo.export --model caption_subnet/ --format onnx --output caption_int8/ --quantize int8
    ofa-ufo export --model SUPERNET_DIR --task grounding --format onnx --output grounding_onnx/

A routed UFO supernet is exported only with `--task` (its subnet for that task is extracted first).
Details and measured parity: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers import AutoModelForSeq2SeqLM, AutoProcessor

from ofa_ufo.deploy.onnx_export import DEFAULT_OPSET, QUANTIZATIONS, export_onnx

FORMATS = ("onnx",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.export", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--model", required=True, help="a save_pretrained model directory (PyTorch weights)")
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="int8: ONNX Runtime dynamic quantisation")
    parser.add_argument("--task", help="for a routed UFO supernet: the task whose subnet to export")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    args = parser.parse_args(argv)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
        output = export_onnx(model, args.output, processor, task=args.task, quantize=args.quantize,
                             opset=args.opset, source=args.model)
    except (ValueError, TypeError, OSError) as error:  # OSError: a missing or unreadable model directory
        print(f"export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"wrote {output}: encoder + decoder-with-past graphs ({args.quantize or 'fp32'}, opset {args.opset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
