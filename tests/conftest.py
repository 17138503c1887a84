"""Shared tiny fixtures: a d_model-32 model over the real default tokenizer layout."""

from __future__ import annotations

import os

import pytest
import torch

import ofa_ufo

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (run_scripts/test.sh): N workers share the cores; each one's torch, and the processes its tests
    # start, get an equal share instead of all of them, which oversubscribes the cores and slows every worker
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

TINY = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, image_size=64, dropout=0.0,
)


def tiny_model(seed: int = 0, **overrides) -> ofa_ufo.OFAUFOForConditionalGeneration:
    torch.manual_seed(seed)
    return ofa_ufo.create_model("ofa_ufo_tiny", **{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def processor():
    return ofa_ufo.create_processor("ofa_ufo_tiny", image_size=TINY["image_size"])


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model, processor):
    """A saved tiny model + processor directory, as pipeline('ofa-ufo', model=dir) expects."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


class RunsCode:
    """Pickles to a call of os.system that writes `marker`: a checkpoint loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))
