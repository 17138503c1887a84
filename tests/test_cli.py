"""The `ofa-ufo` command line: dispatch, exit codes, one-line errors, and each command on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, pipeline

import ofa_ufo
from ofa_ufo.cli.main import COMMANDS, main
from ofa_ufo.deploy.subnets import smallest_arch

SUPERNET = dict(supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0,
                supernet_elastic_heads=[2, 4], supernet_elastic_mlp_ratios=[1.0, 2.0], supernet_elastic_depths=[1, 2])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of two images and one file that is not an image, plus a .jsonl naming two of them."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / name)
    (folder / "c.png").write_bytes(b"not an image")
    lines = [{"id": "q1", "image": "a.png", "text": "what color?"}, {"image": str(folder / "b.png")}]
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("predict", "evaluate", "train", "convert", "extract", "presets"))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert "usage: " in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["predict", "--no-such-option"], ["convert", "nothing"],
                                  ["presets", "extra"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "missing"), "--task", "caption", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ofa-ufo predict: error:") and "\n" not in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "predict", "--model", str(tmp_path / "missing"), "--task", "caption", str(tmp_path)])


def test_predict_answers_folders_files_and_jsonl_in_order(tiny_checkpoint, images, tmp_path):
    output = tmp_path / "out.jsonl"
    code = main(["predict", "--model", str(tiny_checkpoint), "--task", "caption", "--batch-size", "2",
                 "--max-new-tokens", "4", "--output", str(output), str(images), str(images / "b.png")])
    assert code == 1  # c.png is not an image
    records = read_lines(output)
    assert [r["id"] for r in records] == [str(images / n) for n in ("a.png", "b.png", "c.png", "b.png")]
    assert "error" in records[2] and "c.png" in records[2]["error"]
    pipe = pipeline("ofa-ufo", model=str(tiny_checkpoint))
    expected = pipe(str(images / "a.png"), task="caption", max_new_tokens=4)
    assert {k: records[0][k] for k in expected} == pytest.approx(expected)
    assert records[1] == records[3]


def test_predict_takes_each_jsonl_line_text(tiny_checkpoint, images, tmp_path):
    output = tmp_path / "vqa.jsonl"
    argv = ["predict", "--model", str(tiny_checkpoint), "--task", "vqa", "--text", "what shape?",
            "--max-new-tokens", "3", "--output", str(output), str(images / "questions.jsonl")]
    assert main(argv) == 0
    records = read_lines(output)
    assert [r["id"] for r in records] == ["q1", f"{images / 'questions.jsonl'}:2"]
    pipe = pipeline("ofa-ufo", model=str(tiny_checkpoint))
    assert records[0]["text"] == pipe(str(images / "a.png"), task="vqa", text="what color?", max_new_tokens=3)["text"]
    assert records[1]["text"] == pipe(str(images / "b.png"), task="vqa", text="what shape?", max_new_tokens=3)["text"]


def test_extract_writes_the_subnet_that_extract_subnet_computes(processor, tmp_path, capsys):
    torch.manual_seed(0)
    supernet = tiny_model(0, vision_config=SUPERNET)
    with torch.no_grad():
        for block in supernet.get_encoder().supernet.blocks:
            block.ffn.router.normal_()
            block.ffn.experts.fc2_weight.normal_(std=0.05)
    supernet.save_pretrained(tmp_path / "supernet")
    processor.save_pretrained(tmp_path / "supernet")
    argv = ["extract", "--model", str(tmp_path / "supernet"), "--task", "vqa", "--arch", "smallest",
            "--output", str(tmp_path / "subnet")]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    saved = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "subnet").eval()
    direct = ofa_ufo.extract_subnet(supernet, "vqa", smallest_arch(supernet.config))
    assert saved.config.vision_config.supernet_task == "vqa"
    batch = processor(images=[np.zeros((20, 20, 3), np.uint8)], text=[" what?"], return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    decoder = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs, decoder_input_ids=decoder).logits,
                                   direct(**inputs, decoder_input_ids=decoder).logits)
    assert (tmp_path / "subnet" / "tokenizer.json").is_file() or (tmp_path / "subnet" / "vocab.json").is_file()


def test_convert_data_goes_to_the_dataset_converter(tmp_path):
    source = Path(__file__).resolve().parents[1] / "docs" / "examples" / "data" / "canonical.jsonl"
    output = tmp_path / "copy.jsonl"
    assert main(["convert", "data", "--format", "jsonl", "--input", str(source), "--output", str(output)]) == 0
    assert len(read_lines(output)) == len([line for line in source.read_text().splitlines() if line.strip()])


def test_presets_prints_the_table(capsys):
    assert main(["presets"]) == 0
    assert "| `ofa_ufo_tiny` |" in capsys.readouterr().out


def test_console_script_and_module_run_the_same_command():
    script = shutil.which("ofa-ufo", path=str(Path(sys.executable).parent))
    assert script, "the ofa-ufo console script is not installed next to this python (setup.py entry_points)"
    for command in ([sys.executable, "-m", "ofa_ufo", "--help"], [script, "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "predict" in result.stdout, result.stderr
