"""`ofa-ufo COMMAND ...`: predict, evaluate, train, convert, extract, search, export, presets, serve.

Every command has `--help`. Exit codes: 0 done, 1 bad input (a file, an image, data or a model that
cannot be used; the error on one line), 2 usage (unknown command or option). `--debug` anywhere shows
the traceback instead of the one-line error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ofa_ufo.cli import extract, predict, serve
from ofa_ufo.converters import fairseq, hf_port, taming
from ofa_ufo.data import convert as data_convert
from ofa_ufo.evaluate import main as evaluate_main
from ofa_ufo.export import main as export_main
from ofa_ufo.hf.presets import preset_table
from ofa_ufo.search import main as search_main
from ofa_ufo.training.__main__ import main as train_main

__all__ = ["COMMANDS", "main"]

Runner = Callable[[Sequence[str]], "int | None"]


@dataclass(frozen=True)
class Command:
    run: Runner
    summary: str


def _presets(argv: Sequence[str]) -> int:
    """Print the preset table (parameter counts computed on the meta device)."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: ofa-ufo presets\n\nPrint every named architecture with its parameter count.")
        return 0
    if argv:
        print(f"ofa-ufo presets: error: unexpected arguments {list(argv)}", file=sys.stderr)
        return 2
    print(preset_table())
    return 0


CONVERTERS: dict[str, Runner] = {
    "data": data_convert.main, "fairseq": fairseq.main, "hf-port": hf_port.main, "taming": taming.main,
}


def _convert(argv: Sequence[str]) -> int | None:
    """`convert data|fairseq|hf-port|taming ...`: dataset formats to canonical JSON Lines, or OFA / taming
    checkpoints to save_pretrained directories; the rest of the line goes to that converter."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CONVERTERS:
        print("usage: ofa-ufo convert {" + ",".join(CONVERTERS) + "} ...\n\n" + (_convert.__doc__ or "").split("\n")[0],
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return CONVERTERS[argv[0]](list(argv[1:]))


COMMANDS: dict[str, Command] = {
    "predict": Command(predict.main, "answer a task or a prompt on images, folders or a JSON Lines file"),
    "evaluate": Command(evaluate_main, "score a model directory on a task spec"),
    "train": Command(train_main, "run the trainer on an experiment config"),
    "convert": Command(_convert, "convert datasets to canonical JSON Lines, or OFA / taming checkpoints"),
    "extract": Command(extract.main, "cut a dense per-task subnet out of a UFO supernet"),
    "search": Command(search_main, "find the task subnet that best fits a device budget, and extract it"),
    "export": Command(export_main, "write ONNX graphs (fp32 or int8) that ONNX Runtime serves"),
    "presets": Command(_presets, "list the named architectures with parameter counts"),
    "serve": Command(serve.main, "web demo of a model directory (Gradio) on 127.0.0.1"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {command.summary}" for name, command in COMMANDS.items())
    return f"usage: ofa-ufo [--debug] COMMAND [ARGS]\n\ncommands:\n{rows}\n\n`ofa-ufo COMMAND --help` for its options."


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ofa-ufo: error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name].run(rest) or 0
    except SystemExit as stop:  # argparse: 0 after --help, 2 for a usage error
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001  (any failure becomes one line; --debug shows where)
        if debug:
            raise
        print(f"ofa-ufo {name}: error: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point (`ofa-ufo`)."""
    raise SystemExit(main())
