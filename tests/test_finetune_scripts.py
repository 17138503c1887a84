"""Fine-tuning configs (`finetune/*`) and their wrappers in run_scripts/finetune/.

Generated from the shipped configs: every benchmark's shell script runs as a subprocess for 2 steps
of a tiny model on generated demo data (`--demo`) and the run is read back (its config is the
script's, its losses finite, its report the benchmark's task; coco_caption.sh runs both stages, SCST
from the stage-1 output); the configs read their datasets in the official layout, and a missing
dataset stops with exit code 1 and a message naming its location and format (in-process, to pay
the imports once).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.training.__main__ import main
from ofa_ufo.training.config import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "run_scripts" / "finetune"


def training_data(spec: TaskSpec) -> dict:
    """The spec's training-side data options (data.train overrides data key by key)."""
    return {**spec.data, **spec.data.get("train", {})}


def benchmark(name: str) -> tuple[TaskSpec, str]:
    """The spec config `finetune/<name>` trains on and the environment variable of its training input."""
    (spec_name,) = load_config(f"finetune/{name}").data.values()
    spec = load_spec(spec_name)
    return spec, re.search(r"\$\{(\w+)\}", training_data(spec)["input"]).group(1)


# one config (and script) per benchmark; stage-2 configs (SCST) start from a stage-1 model
BENCHMARKS = [p.stem for p in sorted((CONFIG_DIR / "finetune").glob("*.yaml"))
              if load_config(p).objective == "cross_entropy"]
DATA_VARS = sorted({var for name in BENCHMARKS
                    for var in re.findall(r"\$\{(\w+)\}", str(benchmark(name)[0].data))})
# tests/conftest.py TINY on the tiny preset (model_overrides replaces the config's whole dict)
TINY = ["model=ofa_ufo_tiny",
        "model_overrides={d_model: 32, encoder_layers: 2, decoder_layers: 2, encoder_attention_heads: 4, "
        "decoder_attention_heads: 4, encoder_ffn_dim: 64, decoder_ffn_dim: 64, image_size: 64, dropout: 0.0}"]
QUICK = ["max_steps=2", "batch_size=2", "grad_accum=1", "eval_examples=4", "num_threads=1"]
# the embedding benchmarks (ReID, face, product) train on generated identities with --demo; P x K tasks
# draw whole identity chunks of K = 4, so their smallest batch is 4
RETRIEVAL = ("market1501", "veri776", "lfw", "sop")


def quick(name: str) -> list[str]:
    return [*QUICK, "batch_size=4"] if name in RETRIEVAL else QUICK
# caption evaluation runs Java (PTB tokenizer, METEOR) for ~8 s a call: the caption runs skip it
CAPTION_QUICK = [*QUICK, "eval_examples=0"]  # a later key=value wins
OUTPUTS = ("config.json", "model.safetensors", "metrics.json", "training.png", "train_config.yaml")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the runs set num_threads=1 in this process
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_datasets(monkeypatch):
    for name in DATA_VARS:
        monkeypatch.delenv(name, raising=False)


def assert_outputs(output_dir: Path) -> None:
    missing = [name for name in OUTPUTS if not (output_dir / name).is_file()]
    assert not missing, f"{output_dir} lacks {missing}"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_config_carries_the_reference_settings(name):
    """The benchmark spec's OFA hyperparameters (tasks/*.yaml) are what the config trains with."""
    (spec, _), config = benchmark(name), load_config(f"finetune/{name}")
    hp = spec.hyperparameters
    assert config.description and config.model == "ofa_ufo_base" and config.output_dir == f"checkpoints/{name}"
    assert config.tasks == {spec.task: 1.0} and config.data == {spec.task: spec.name}
    assert (config.lr, config.label_smoothing) == (hp["lr"], hp["label_smoothing"])
    assert config.global_batch == hp["batch_size"]
    assert config.warmup_ratio == hp.get("warmup_ratio", hp.get("warmup_updates", 0) / hp.get("updates", 1))
    assert config.freeze_embeddings == hp.get("freeze_embeddings", False)
    assert config.ema_decay == hp.get("ema_decay", 0.0)
    assert config.clip_norm == hp.get("clip_norm", 1.0) and config.objective == "cross_entropy"
    assert config.weight_decay == hp.get("weight_decay", 0.01)  # the trainer's default for OFA's recipes
    assert config.end_lr == pytest.approx(hp.get("end_lr_ratio", 0.0) * config.lr)
    overrides = config.model_overrides
    assert overrides["image_size"] == hp["image_size"] and overrides["dropout"] == hp.get("dropout", 0.1)
    assert overrides["encoder_drop_path_rate"] == overrides["decoder_drop_path_rate"] == hp.get("drop_path", 0.1)
    assert "train" in spec.data  # open_examples(spec, split="train") needs it


def test_scst_config_is_stage_two():
    config = load_config("finetune/coco_caption_scst")
    assert (config.objective, config.model) == ("scst", "checkpoints/coco_caption")
    assert (config.lr, config.end_lr) == (1e-5, 2e-7)
    assert config.model_overrides == {"dropout": 0.0, "encoder_drop_path_rate": 0.0, "decoder_drop_path_rate": 0.0}
    assert config.global_batch == 64 and config.data == {"caption": "coco_caption"} and config.description


@pytest.fixture
def coco_root(tmp_path, monkeypatch) -> Path:
    """$COCO_ROOT in the official layout, holding the tiny example files of docs/examples/data."""
    examples, root = ROOT / "docs" / "examples" / "data", tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014", "train2017", "val2017"):
        shutil.copytree(examples / "images", root / split)
    for kind, source in (("captions", "captions.json"), ("instances", "instances.json")):
        for split in ("train2014", "val2014", "train2017", "val2017"):
            shutil.copy(examples / source, root / "annotations" / f"{kind}_{split}.json")
    # Karpathy's split file (coco_caption), written by hand in the published layout
    karpathy = [{"filepath": folder, "filename": "a.png", "imgid": i, "cocoid": 100 + i, "split": split,
                 "sentids": [2 * i, 2 * i + 1],
                 "sentences": [{"tokens": ["a", "red", "image"], "raw": "A red image.", "imgid": i, "sentid": 2 * i},
                               {"tokens": ["a", "square"], "raw": "a square", "imgid": i, "sentid": 2 * i + 1}]}
                for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"),
                                                     ("test", "val2014")])]
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    monkeypatch.setenv("COCO_ROOT", str(root))
    return root


@pytest.mark.parametrize("name, evaluate", [("coco_caption", 0), ("coco_detection", 2), ("coco_detection_dense", 2)])
def test_config_trains_on_the_official_layout(name, evaluate, coco_root, tmp_path):
    """The spec's data.train mapping finds the training split under $COCO_ROOT (no --demo)."""
    output = tmp_path / name
    assert main(["--config", f"finetune/{name}", *TINY, *QUICK, f"eval_examples={evaluate}",
                 f"output_dir={output}"]) == 0
    assert_outputs(output)
    assert bool(json.loads((output / "metrics.json").read_text())["metrics_trained"]) == bool(evaluate)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_dataset_names_variable_and_format(name, tmp_path, no_datasets, capsys):
    spec, variable = benchmark(name)
    assert main(["--config", f"finetune/{name}", *TINY, *quick(name), f"output_dir={tmp_path}"]) == 1
    error = capsys.readouterr().err
    assert variable in error and repr(training_data(spec)["format"]) in error, error


def test_empty_dataset_folder_names_the_expected_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COCO_ROOT", str(tmp_path))
    assert main(["--config", "finetune/coco_caption", *TINY, *QUICK, f"output_dir={tmp_path / 'out'}"]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "annotations" / "dataset_coco.json") in error and "'coco_karpathy'" in error, error


def test_every_benchmark_has_a_script():
    assert BENCHMARKS == ["coco_caption", "coco_detection", "coco_detection_dense", "imagenet", "lfw", "market1501",
                          "refcoco", "refcocog", "refcocoplus", "snli_ve", "sop", "veri776", "vqav2"]
    assert sorted(p.stem for p in SCRIPTS.glob("*.sh")) == BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_script_wraps_its_config(name):
    script = SCRIPTS / f"{name}.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    text = script.read_text()
    assert 'source "$(dirname "$0")/../_env.sh"' in text and f"--config finetune/{name} " in text


def offline_script_env(venv: Path) -> dict[str, str]:
    """Environment for the run scripts: an OFA_UFO_VENV (made at `venv`) whose python is this interpreter
    and whose install stamp is current, so _env.sh installs nothing (tests run offline); no dataset variables."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = hashlib.sha256((ROOT / "setup.py").read_bytes() + (ROOT / ".ci" / "constraints.txt").read_bytes())
    (venv / ".ofa_ufo_install_stamp").write_text(stamp.hexdigest() + "\n")
    env = {k: v for k, v in os.environ.items() if k not in DATA_VARS}
    return {**env, "OFA_UFO_VENV": str(venv), "PYTHONPATH": str(ROOT)}


@pytest.fixture
def ready_env(tmp_path) -> dict[str, str]:
    return offline_script_env(tmp_path / "venv")


def run_script(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / f"{name}.sh"), *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300, check=False)


def assert_demo_run(output: Path, config: str, overrides: list[str], stdout: str) -> dict:
    """The run in `output` trained `config` with `overrides` on demo data (`--demo`: no datasets) for 2 steps
    with finite losses, exported its model and reported its task; returns its metrics.json."""
    assert_outputs(output)
    assert f"config {config}: " in stdout, stdout[-3000:]
    expected = load_config(config, overrides)
    expected.data = {}
    assert (output / "train_config.yaml").read_text() == expected.to_yaml()
    report = json.loads((output / "metrics.json").read_text())
    assert report["steps"] == 2 and len(report["losses"]) == 2, report["losses"]
    assert all(math.isfinite(loss) for loss in report["losses"]), report["losses"]
    assert set(report["metrics_trained"]) == (set(expected.tasks) if expected.eval_examples else set())
    return report


@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n != "coco_caption"])
def test_script_trains_its_benchmark_on_demo_data(name, tmp_path, ready_env):
    output = tmp_path / name
    overrides = [*TINY, *quick(name), f"output_dir={output}"]
    result = run_script(name, ["--demo", *overrides], ready_env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = assert_demo_run(output, f"finetune/{name}", overrides, result.stdout)
    spec, hp = load_spec(name), load_spec(name).hyperparameters
    saved = load_config(output / "train_config.yaml")  # the benchmark's settings are the ones the run used
    assert saved.tasks == {spec.task: 1.0} and (saved.lr, saved.label_smoothing) == (hp["lr"], hp["label_smoothing"])
    assert (saved.ema_decay, saved.freeze_embeddings) == (hp.get("ema_decay", 0.0), hp.get("freeze_embeddings", False))
    if name in RETRIEVAL:  # trained on generated identities, scored on held-out ones before and after
        headline = {"reid": "rank1", "verification": "accuracy", "recall@k": "recall@1"}[spec.metric]
        assert 0.0 <= report["metrics_untrained"][spec.task][headline] <= 1.0
        assert 0.0 <= report["metrics_trained"][spec.task][headline] <= 1.0


def test_coco_caption_script_runs_both_stages(tmp_path, ready_env):
    output = tmp_path / "caption"
    result = run_script("coco_caption", ["--demo", *TINY, *CAPTION_QUICK, f"output_dir={output}"], ready_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_demo_run(output, "finetune/coco_caption", [*TINY, *CAPTION_QUICK, f"output_dir={output}"], result.stdout)
    # stage 2 starts from stage 1's model; the other arguments (model_overrides included) pass to both stages
    scst = tmp_path / "caption_scst"
    assert_demo_run(scst, "finetune/coco_caption_scst",
                    [f"model={output}", *TINY[1:], *CAPTION_QUICK, f"output_dir={scst}"], result.stdout)
    assert load_config(scst / "train_config.yaml").objective == "scst"


def test_coco_caption_script_checks_its_stage(tmp_path, ready_env):
    result = run_script("coco_caption", ["--stage", "3"], ready_env)
    assert result.returncode == 2 and "--stage must be 1 or 2" in result.stderr
    result = run_script("coco_caption", ["--stage", "2", f"output_dir={tmp_path / 'none'}"], ready_env)
    assert result.returncode == 2 and "run --stage 1 first" in result.stderr


def test_script_without_data_stops_with_the_location(tmp_path, ready_env):
    result = run_script("vqav2", [*TINY, *QUICK, f"output_dir={tmp_path}"], ready_env)
    assert result.returncode == 1
    assert "VQA_ROOT" in result.stderr and "'vqa_v2'" in result.stderr, result.stderr[-3000:]
