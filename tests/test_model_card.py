"""The model card (README.md) that `save_pretrained` and a training run's export write beside the weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, tiny_model
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForSeq2SeqLM

import ofa_ufo
from ofa_ufo.hf.model_card import MARKER
from ofa_ufo.training import Trainer
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.outputs import export_model, write_report

ROUTED = dict(supernet_layers=1, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0)


def _card(directory: Path) -> tuple[ModelCard, str]:
    card = ModelCard.load(directory / "README.md")
    return card, card.text


def _code_block(text: str, language: str) -> str:
    (block,) = re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)
    return block


def _model(kind: str):
    if kind == "plain":
        return tiny_model()
    routed = tiny_model(vision_config=ROUTED)
    if kind == "routed supernet":
        return routed
    with pytest.warns(UserWarning, match="never trained"):
        return ofa_ufo.extract_subnet(routed, "grounded_caption")


SUPERNET_ROWS = {
    "plain": "none (exactly OFA)",
    "routed supernet": "1 blocks x d32, 4 heads, routed by task",
    "extracted subnet": "1 blocks x d32, 4 heads, extracted subnet for 'grounded_caption'",
}


@pytest.mark.parametrize("kind", list(SUPERNET_ROWS))
def test_save_pretrained_writes_a_card_whose_example_runs(tmp_path, monkeypatch, processor, kind):
    model = _model(kind)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    card, text = _card(tmp_path / "model")
    assert card.data.library_name == "ofa_ufo" and card.data.pipeline_tag == "image-text-to-text"
    assert {"ofa_ufo", "transformers"} <= set(card.data.tags)
    assert ("ufo-supernet" in card.data.tags) == (kind != "plain")
    assert text.startswith(MARKER)
    tasks = re.search(r"Tasks: (.*)\.", text).group(1)
    assert tasks == ", ".join(f"`{name}`" for name in model.config.vision_config.task_names)
    for row in ("| d_model | 32 |", "| layers (encoder / decoder) | 2 / 2 |", "| ResNet stem | resnet50 |",
                "| attention heads (encoder / decoder) | 4 / 4 |", "| image size | 64 px |",
                f"| UFO supernet | {SUPERNET_ROWS[kind]} |"):
        assert row in text, row
    assert f'pipeline("ofa-ufo", model="{tmp_path / "model"}")' in text
    assert ("task_ids=" in text) == (kind == "routed supernet")
    assert "## Training" not in text and "## Metrics" not in text

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save("photo.jpg")
    exec(compile(_code_block(text, "python"), "README.md", "exec"), {})  # the card's usage example runs as written


def test_a_readme_the_user_wrote_is_kept(tmp_path, model):
    (tmp_path / "README.md").write_text("# My notes\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My notes\n"
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path) is not None


def test_the_librarys_own_card_is_rewritten_and_edits_survive_without_the_marker(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_model(d_model=64).save_pretrained(tmp_path)
    assert "| d_model | 64 |" in (tmp_path / "README.md").read_text()  # the card describes what was saved last
    edited = (tmp_path / "README.md").read_text().replace(MARKER + "\n", "") + "My edit.\n"
    (tmp_path / "README.md").write_text(edited)
    tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == edited


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two VQA steps with a 2-example evaluation before and after, exported as a training run does."""
    output_dir = tmp_path_factory.mktemp("run")
    config = config_from_dict(dict(model_overrides=dict(TINY), tasks={"vqa": 1}, batch_size=2, max_steps=2,
                                   eval_examples=2, demo_train_scenes=16, log_every=1, num_threads=1, lr=1e-3,
                                   output_dir=str(output_dir)), "test")
    threads = torch.get_num_threads()
    try:
        Trainer(config, resume="never").fit()
    finally:
        torch.set_num_threads(threads)
    return output_dir


def test_exported_card_carries_the_training_config_and_metrics(trained):
    card, text = _card(trained)
    assert card.data.library_name == "ofa_ufo" and text.startswith(MARKER)
    saved_config = (trained / "train_config.yaml").read_text()
    assert _code_block(text, "yaml") == saved_config
    assert yaml.safe_load(_code_block(text, "yaml"))["max_steps"] == 2
    assert "2 steps with this config" in text
    metrics = json.loads((trained / "metrics.json").read_text())
    before, after = metrics["metrics_untrained"], metrics["metrics_trained"]
    assert after["vqa"]
    for name, value in after["vqa"].items():
        assert f"| vqa | {name} | {before['vqa'][name]:.4g} | {value:.4g} |" in text, name
    assert f'pipeline("ofa-ufo", model="{trained}")' in text


def test_export_keeps_a_readme_the_user_wrote_in_the_run_directory(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("# About this run\n")
    model = AutoModelForSeq2SeqLM.from_pretrained(trained)
    export_model(run, model, ofa_ufo.create_processor("ofa_ufo_tiny", image_size=TINY["image_size"]), None,
                 torch.nn.ModuleDict())
    metrics = json.loads((trained / "metrics.json").read_text())
    history = {key: metrics[key] for key in ("eval", "losses", "lr")}
    write_report(run, history, metrics["steps"], config_from_dict(dict(output_dir=str(run)), "test"))
    assert (run / "README.md").read_text() == "# About this run\n"
    assert (run / "model.safetensors").is_file() and (run / "metrics.json").is_file()
