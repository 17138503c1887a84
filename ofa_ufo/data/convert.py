"""Convert any supported dataset format to canonical JSON Lines.

    python -m ofa_ufo.data.convert --format coco_captions --input captions_val2014.json \\
        --images val2014/ --output coco_val.jsonl [--on-error skip]

``--answers-output FILE`` (vqa_v2) also writes the answer vocabulary: the ``--answers top<N>``
(default top3129) most frequent answers of ``--annotations``, for a spec's ``answers:``.

The formats and their options are those of :mod:`ofa_ufo.data.sources`. Images that arrive decoded
(base64 in TSV, PIL from ``datasets``) are written as PNG files into ``<output stem>_images/`` next to
the output; the JSONL names images by paths relative to itself when they lie under its folder,
absolute otherwise. The output is written to a temporary file and renamed at the end, so a failed
run leaves no half-written dataset (:func:`ofa_ufo.data.writer.write_jsonl`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ofa_ufo.data.canonical import DataError
from ofa_ufo.data.loaders import (
    KARPATHY_UNITS, TSV_LAYOUTS, VQA_ANSWER_VOCABULARY_SIZE, LoadReport, write_answer_vocabulary,
)
from ofa_ufo.data.sources import SOURCES, MissingOptionError, answer_vocabulary, list_sources
from ofa_ufo.data.writer import write_jsonl

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.data.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--format", required=True, choices=list_sources("format"))
    parser.add_argument("--input", required=True, help="source file (questions/refs file for vqa_v2/refcoco, "
                        "dataset_coco.json for coco_karpathy) or folder")
    parser.add_argument("--output", required=True, help="canonical .jsonl to write")
    parser.add_argument("--images", help="image root folder (COCO, VQA, RefCOCO, SNLI-VE, LFW; coco_karpathy: the "
                        "COCO root holding train2014/ and val2014/; sop: default the list's folder)")
    parser.add_argument("--annotations", help="vqa_v2: annotations file; refcoco: instances.json")
    parser.add_argument("--layout", choices=sorted(TSV_LAYOUTS), help="ofa_tsv: which OFA TSV")
    parser.add_argument("--selected-cols", help="ofa_tsv: OFA-style column ids, e.g. 0,4,2")
    parser.add_argument("--split", help="refcoco: keep one split (train, val, testA, ...); coco_karpathy: splits "
                        "(default test; OFA trains on train,restval); market1501/msmt17/veri776: keep splits (e.g. "
                        "query,gallery); sop: the meta split (default from the file name)")
    parser.add_argument("--per", choices=KARPATHY_UNITS, help="coco_karpathy: one example per image (default, all "
                        "sentences as references) or per caption")
    parser.add_argument("--image-pattern", help="vqa_v2: image file name pattern, e.g. "
                        "COCO_val2014_{image_id:012d}.jpg; lfw_pairs: default {name}/{name}_{number:04d}.jpg")
    parser.add_argument("--task", help="hf: the canonical task; identity_folder: the embedding task (face, ...)")
    parser.add_argument("--columns", help="hf: field=column pairs, e.g. image=img,text=question,target=answer")
    parser.add_argument("--id-column", help="hf: column holding the example id")
    parser.add_argument("--answers", help=f"vqa_v2 with --answers-output: top<N>, the vocabulary size (default "
                        f"top{VQA_ANSWER_VOCABULARY_SIZE})")
    parser.add_argument("--answers-output", help="vqa_v2: also write the answer vocabulary of --annotations to this "
                        "JSON file")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _needs(error: MissingOptionError) -> str:
    """A missing option in the command line's words: its flag and the form expected."""
    flags = "; ".join(f"--{option.replace('_', '-')} ({form})" for option, form in error.needs.items())
    return f"--format {error.format} needs {flags}"


def _answers(args: argparse.Namespace) -> list[str]:
    """The answer vocabulary of the converted annotations (`--answers top<N>`), for a spec's `answers:`."""
    data = {"format": args.format, "annotations": args.annotations,
            "answers": args.answers or f"top{VQA_ANSWER_VOCABULARY_SIZE}"}
    return answer_vocabulary(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; a missing option or file, or a bad row (with --on-error raise), exits 1 with
    the error."""
    args = _parser().parse_args(argv)
    source, report = SOURCES[args.format], LoadReport()
    try:
        examples = source.read(source.options(vars(args)), report)  # missing options and files fail here
        answers = _answers(args) if args.answers_output else None  # so does a bad --answers, before any writing
        count = write_jsonl(examples, args.output, progress=not args.quiet)
        if answers is not None:
            write_answer_vocabulary(answers, args.answers_output)
            print(f"wrote {len(answers)} answers to {args.answers_output}", file=sys.stderr)
    except MissingOptionError as err:
        print(f"convert: {_needs(err)}", file=sys.stderr)
        return 1
    except (DataError, FileNotFoundError, ValueError) as err:  # bad data or a bad option (e.g. --task)
        print(f"convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} examples to {args.output} (skipped {report.skipped} bad rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
