"""Load test of the web demo: concurrent clients against `ofa-ufo serve` through Gradio's HTTP API.

    .venv/bin/python benchmarks/load_test.py [--model DIR] [--clients 8] [--duration 60] [--bad-every 6]

Starts `python -m ofa_ufo serve` on a free port of 127.0.0.1 (with `--model`, else a tiny random model
saved to a temporary directory), then `--clients` threads each send requests back to back for
`--duration` seconds with `gradio_client`: mixed tasks (caption, vqa, grounding, detection,
classification, itm, face similarity of two images, free prompt) on real and generated photos, and every
`--bad-every`-th request a bad one (bytes that are no image, a truncated PNG, an empty file, no image).
It checks that every good request is answered, every bad one gets a clear error (its message names the
problem: `ImageLoadError: <file>: ...` or `ValueError: ... needs an image`), the server is alive at the
end and its memory flat (the largest RSS of the last `--window` seconds within 10% or 64 MiB of the
first window's). Prints latency p50/p95, requests/s, errors by kind, the server's RSS and the CPU; exits
1 when a check fails. Needs the `[serve]` extra (gradio, which brings gradio_client).
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from gradio_client import Client, handle_file
from PIL import Image

import ofa_ufo
from ofa_ufo.core.timing import device_name
from ofa_ufo.data.real_photos import load_photo

TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, image_size=64, dropout=0.0)  # tests/conftest.py's tiny model
# (kind, task, image, text, labels, box, second image); images are names of files made by `make_images`
GOOD = [
    ("caption", "caption", "photo", "", "", "", None),
    ("vqa", "vqa", "photo", "what color is the suit?", "", "", None),
    ("grounding", "grounding", "photo", "the astronaut", "", "", None),
    ("detection", "detection", "noise", "", "", "", None),
    ("classification", "classification", "photo", "", "astronaut, cat, rocket", "", None),
    ("itm", "itm", "noise", "a cat on a sofa", "", "", None),
    ("face similarity", "face", "photo", "", "", "", "noise"),
    ("free prompt", "free prompt", "noise", "what is in the corner?", "", "", None),
]
BAD = [
    ("bad: not an image", "caption", "garbage", "", "", "", None),
    ("bad: truncated png", "grounding", "truncated", "the cat", "", "", None),
    ("bad: empty file", "detection", "empty", "", "", "", None),
    ("bad: no image", "caption", None, "", "", "", None),
]
CLEAR_ERROR = re.compile(r"^(ImageLoadError: \S+|ValueError: task '\w+' needs an image)")
STARTUP_S = 180


@dataclass
class Record:
    kind: str
    seconds: float
    outcome: str  # "answer", "clear error" or "failure: <message>"


def make_images(folder: Path) -> dict[str, str]:
    """The files requests send: a real photo (or a generated one), noise, and three bad files."""
    try:
        photo = load_photo("astronaut").resize((256, 256))
    except ImportError:  # scikit-image is optional: a generated photo instead
        photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    files = {"photo.png": buffer.getvalue(), "garbage.png": b"this is not an image" * 10,
             "truncated.png": buffer.getvalue()[:300], "empty.png": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    noise.save(folder / "noise.png")
    return {Path(name).stem: str(folder / name) for name in [*files, "noise.png"]}


def tiny_model(folder: Path) -> Path:
    """A random tiny model saved as a checkpoint directory (what the test suite serves)."""
    ofa_ufo.create_model("ofa_ufo_tiny", **TINY).eval().save_pretrained(folder)
    ofa_ufo.create_processor("ofa_ufo_tiny", image_size=TINY["image_size"]).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    """`python -m ofa_ufo serve`; returns once the page answers."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ofa_ufo", "serve", "--model", str(model), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


class MemoryWatch(threading.Thread):
    """Samples the server's RSS every `every` seconds: (time, bytes) pairs."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.process, self.every, self.samples = psutil.Process(pid), every, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.process.memory_info().rss))
            self.stop.wait(self.every)

    def peak(self, start: float, end: float) -> int:
        return max(rss for t, rss in self.samples if start <= t <= end)


def send(client: Client, request: tuple, images: dict[str, str]) -> Record:
    """One request; its outcome judged by whether it was meant to fail."""
    kind, task, image, text, labels, box, second = request
    upload = {name: handle_file(images[name]) for name in (image, second) if name}
    start = time.perf_counter()
    try:
        answer = client.predict(task, upload.get(image), text, labels, box, upload.get(second), api_name="/run")[0]
        outcome = "answer" if answer and not kind.startswith("bad") else f"failure: answered {answer!r}"
    except Exception as error:  # noqa: BLE001  (every error is judged, none is let through)
        message = str(error)
        clear = kind.startswith("bad") and CLEAR_ERROR.match(message)
        outcome = "clear error" if clear else f"failure: {type(error).__name__}: {message[:200]}"
    return Record(kind, time.perf_counter() - start, outcome)


def client_loop(url: str, seed: int, deadline: float, bad_every: int, images: dict[str, str], out: list) -> None:
    """One user: requests back to back until `deadline`, the kinds in turn (each client starting at its
    `seed`-th), every `bad_every`-th a bad one."""
    client = Client(url, verbose=False)
    count = 0
    while time.monotonic() < deadline:
        count += 1
        pool, turn = (BAD, count // bad_every) if count % bad_every == 0 else (GOOD, count)
        out.append(send(client, pool[(turn + seed) % len(pool)], images))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(records: list[Record], seconds: float, memory: dict[str, int], alive: bool) -> list[str]:
    """Prints the table; returns the failed checks."""
    mib = {name: value / 2**20 for name, value in memory.items()}
    good = [r for r in records if not r.kind.startswith("bad")]
    latencies = [r.seconds for r in good]
    print(f"| requests | {len(records)} ({len(good)} good, {len(records) - len(good)} bad) in {seconds:.0f} s |")
    print(f"| requests/s | {len(records) / seconds:.2f} |")
    print(f"| latency of good requests p50 / p95 | {percentile(latencies, 50):.2f} s / {percentile(latencies, 95):.2f} s |")
    print("| server RSS after warm-up / peak first window / peak last window | "
          f"{mib['warm']:.0f} / {mib['first']:.0f} / {mib['last']:.0f} MiB |")
    print(f"| server alive at the end | {'yes' if alive else 'NO'} |")
    print("\n| kind | requests | answered | clear errors | failures | p50 s | p95 s |\n|---|---|---|---|---|---|---|")
    for kind in [k for k, *_ in GOOD + BAD]:
        mine = [r for r in records if r.kind == kind]
        counts = collections.Counter(r.outcome.split(":")[0] for r in mine)
        times = [r.seconds for r in mine]
        print(f"| {kind} | {len(mine)} | {counts['answer']} | {counts['clear error']} | {counts['failure']} | "
              f"{percentile(times, 50):.2f} | {percentile(times, 95):.2f} |")
    failures = collections.Counter(r.outcome for r in records if r.outcome.startswith("failure"))
    for outcome, count in failures.items():
        print(f"  {count} x {outcome}")
    checks = {"a good request was not answered or a bad one got no clear error": not failures,
              "the server died": alive, "memory grew": memory["last"] <= max(memory["first"] * 1.1, memory["first"] + 64 * 2**20),
              "a kind of request was never sent": all(any(r.kind == k for r in records) for k, *_ in GOOD + BAD)}
    return [name for name, ok in checks.items() if not ok]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a save_pretrained model directory (default: a tiny random model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--bad-every", type=int, default=6, help="every n-th request of a client is a bad one")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of the first and last memory windows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = make_images(folder)
        model = Path(args.model) if args.model else tiny_model(folder / "model")
        port = free_port()
        server = start_server(model, port, folder / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}/"
            for request in GOOD:  # warm-up: first calls of each task (not counted)
                send(Client(url, verbose=False), request, images)
            watch = MemoryWatch(server.pid)
            warm = watch.process.memory_info().rss
            watch.start()
            records: list[Record] = []
            start = time.monotonic()
            threads = [threading.Thread(target=client_loop, args=(url, seed, start + args.duration, args.bad_every,
                                                                  images, records)) for seed in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - start
            watch.stop.set()
            watch.join()
            alive = server.poll() is None
            memory = {"warm": warm, "first": watch.peak(start, start + args.window),
                      "last": watch.peak(start + seconds - args.window, start + seconds)}
            print(f"Load test: {args.clients} clients for {args.duration:.0f} s against `ofa-ufo serve` on 127.0.0.1, "
                  f"model {args.model or 'tiny random (d_model 32)'}; server and clients on {device_name()}\n")
            failed = report(records, seconds, memory, alive)
        finally:
            server.terminate()
            server.wait(timeout=30)
    for name in failed:
        print(f"FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
