"""`ofa-ufo serve`: the web demo (Gradio) for one model directory, on 127.0.0.1 unless told otherwise.

    ofa-ufo serve --model checkpoints/ofa_ufo_tiny.pretrain_demo
    ofa-ufo serve --model DIR --port 7860 --host 127.0.0.1

Pick a task, upload an image or choose a bundled photo, type a question or phrase, and see the answer
with its score, boxes drawn with labels and scores, top-k classes, the similarity of two images for
the embedding tasks, and generated images when a VQGAN is saved as `<model dir>/vqgan`. The model is
loaded once; users wait in Gradio's queue. The same requests are open to scripts through Gradio's API
(`gradio_client.Client(url).predict(..., api_name="/run")`). Needs `pip install 'ofa-ufo[serve]'`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ofa_ufo.cli.web_demo import Demo, build_app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-ufo serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="a save_pretrained model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--device", help="torch device for the model (default: the pipeline's choice)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="requests handled at once; model calls still run one at a time (default 2)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before new ones are refused")
    return p


def launch(demo: Demo, host: str, port: int, concurrency: int = 2, max_queue: int = 64, block: bool = True) -> Any:
    """Serve `demo` through Gradio's queue; returns the Blocks app (`block=False`: in a background thread,
    as tests and the load test use it; stop it with `app.close()`)."""
    app = build_app(demo).queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.launch(server_name=host, server_port=port, show_error=True, quiet=not block,
               prevent_thread_lock=not block, share=False)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        parser().error("--concurrency and --max-queue must be at least 1")
    if not Path(args.model, "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: not a save_pretrained model directory (no config.json)")
    if find_spec("gradio") is None:  # say so before the model loads
        raise ImportError("ofa-ufo serve needs gradio: pip install 'ofa-ufo[serve]'")
    launch(Demo(args.model, device=args.device), args.host, args.port, args.concurrency, args.max_queue)
    return 0
