"""The pretraining recipes (`pretrain_ofa_<size>`) and their scripts (run_scripts/pretrain_ofa_<size>.sh).

Every size's recipe trains 2 steps of a d_model-32 model (its own preset's ResNet stem, dropout and
drop path kept) on canonical JSON Lines written here in the layout $OFA_PRETRAIN_DATA holds
(docs/training.md), and the test reads back from the run what it did: the tasks drawn in every
micro-batch, the tasks evaluated, the optimiser settings of the saved config, no stem warm-up or
frozen stem, the regularisation of the exported model. Each script runs as a subprocess for 2 steps:
without $OFA_PRETRAIN_DATA the embedded demo default, with it the recipe (slow).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY
from PIL import Image, ImageDraw
from test_finetune_scripts import assert_outputs, offline_script_env

from ofa_ufo import metrics
from ofa_ufo.hf.presets import create_config
from ofa_ufo.models.growth import GrowthError
from ofa_ufo.models.growth import _width_factor as width_factor
from ofa_ufo.training.__main__ import main
from ofa_ufo.training.config import load_config
from ofa_ufo.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "medium", "base", "large", "huge")
# OFA's pretraining mixture (reference/ofa.md §7): the image-text tasks every step, the auxiliary ITM and
# grounded captioning and the detection / classification batches at half their rate
RECIPE_TASKS = {"caption": 1.0, "vqa": 1.0, "grounding": 1.0, "grounded_caption": 0.5, "itm": 0.5,
                "detection": 0.5, "classification": 0.5}
EVAL_TASKS = {"caption", "vqa", "grounding", "detection", "classification"}  # eval_data: held-out demo scenes
# size -> (batch_size, grad_accum: 256 samples per update, ResNet of OFA's size)
RECIPE_SIZES = {"tiny": (64, 4, "resnet50"), "medium": (64, 4, "resnet101"), "base": (32, 8, "resnet101"),
                "large": (16, 16, "resnet152"), "huge": (8, 32, "resnet152")}
# samples per task in a micro-batch, by hand: one each, the rest (batch - 7) split 2:2:2:1:1:1:1 by largest
# remainder, ties to the first task name (mixture.task_quotas)
QUOTAS = {
    64: {"caption": 12, "vqa": 12, "grounding": 12, "grounded_caption": 7, "itm": 7, "detection": 7,
         "classification": 7},  # 57: 11.4 x 3 + 5.7 x 4
    32: {"caption": 6, "vqa": 6, "grounding": 6, "grounded_caption": 3, "itm": 3, "detection": 4,
         "classification": 4},  # 25: 5 x 3 + 2.5 x 4, two .5 remainders round up
    16: {"caption": 3, "vqa": 2, "grounding": 3, "grounded_caption": 2, "itm": 2, "detection": 2,
         "classification": 2},  # 9: 1.8 x 3 + 0.9 x 4, six of the seven remainders round up
    8: {"caption": 2, "vqa": 1, "grounding": 1, "grounded_caption": 1, "itm": 1, "detection": 1,
        "classification": 1},  # 1: 0.2 x 3 + 0.1 x 4, one remainder rounds up
}
# a tiny transformer at 32 px (the stem's cost grows with the pixels, and tiny and medium draw 64 images a
# step); the recipe's dropout and drop path stay
WIDTH = {**{k: v for k, v in TINY.items() if k != "dropout"}, "image_size": 32}
QUICK = ["max_steps=2", "grad_accum=1", "eval_examples=1", "num_threads=1", "data_workers=0"]
# the scripts' runs: no model= (the script picks the preset); model_overrides replace the config's whole dict
SCRIPT_TINY = "model_overrides={" + ", ".join(f"{k}: {v}" for k, v in {**TINY, "image_size": 32}.items()) + "}"
SCRIPT_QUICK = ["max_steps=2", "grad_accum=1", "eval_examples=0", "num_threads=1", "data_workers=0",
                "show_photos=false"]


def write_image(path: Path, color: str, box: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (48, 48), "gray")
    ImageDraw.Draw(image).rectangle(box, fill=color)
    image.save(path)


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    """$OFA_PRETRAIN_DATA: one canonical JSON Lines file per recipe task (docs/data.md), images beside them."""
    root = tmp_path_factory.mktemp("ofa_pretrain")
    red, blue = [8.0, 8.0, 28.0, 28.0], [18.0, 14.0, 40.0, 38.0]
    write_image(root / "images" / "red.png", "red", red)
    write_image(root / "images" / "blue.png", "blue", blue)
    rows = {
        "caption": [{"image": "images/red.png", "target": "a red square on a gray background"},
                    {"image": "images/blue.png", "target": "a blue square on a gray background"}],
        "vqa": [{"image": "images/red.png", "text": "what color is the square?", "target": "red",
                 "references": ["red", "red", "pink"]},
                {"image": "images/blue.png", "text": "what color is the square?", "target": "blue"}],
        "grounding": [{"image": "images/red.png", "text": "the red square", "box": red},
                      {"image": "images/blue.png", "text": "the blue square", "box": blue}],
        "grounded_caption": [{"image": "images/red.png", "box": red, "target": "a red square"},
                             {"image": "images/blue.png", "box": blue, "target": "a blue square"}],
        "itm": [{"image": "images/red.png", "text": "a red square", "target": "yes"},
                {"image": "images/red.png", "text": "a blue square", "target": "no"}],
        "detection": [{"image": "images/red.png", "boxes": [red], "labels": ["red square"]},
                      {"image": "images/blue.png", "boxes": [blue], "labels": ["blue square"]}],
        "classification": [{"image": "images/red.png", "target": "red square"},
                           {"image": "images/blue.png", "target": "blue square"}],
    }
    for task, examples in rows.items():
        lines = [json.dumps({"id": f"{task}-{i}", "task": task, **e}) for i, e in enumerate(examples)]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def drawn_tasks(monkeypatch) -> list[Counter]:
    """Filled with the tasks of every micro-batch the trainer computes a loss on, in order."""
    drawn: list[Counter] = []
    loss = Trainer._loss

    def spy(self, batch, examples, *rest, **options):
        drawn.append(Counter(example["task"] for example in examples))
        return loss(self, batch, examples, *rest, **options)

    monkeypatch.setattr(Trainer, "_loss", spy)
    return drawn


@pytest.fixture
def caption_metric_stand_in(monkeypatch) -> None:
    """The caption metric runs Java (PTB tokenizer, METEOR) for ~8 s a call; these runs check which tasks
    are evaluated, not the scores (tests/test_metrics.py does), so captions get a constant score."""
    monkeypatch.setitem(metrics._METRICS, "caption", lambda predictions, references: {"cider": 0.0})


def finite_losses(output: Path, steps: int) -> list[float]:
    losses = json.loads((output / "metrics.json").read_text())["losses"]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses
    return losses


@pytest.mark.parametrize("size", SIZES)
def test_recipe_trains_what_it_promises(size, pretrain_data, tmp_path, monkeypatch, drawn_tasks,
                                        caption_metric_stand_in):
    monkeypatch.setenv("OFA_PRETRAIN_DATA", str(pretrain_data))
    output = tmp_path / size
    config = load_config(f"pretrain_ofa_{size}", [*QUICK, f"output_dir={output}"])
    batch, grad_accum, resnet = RECIPE_SIZES[size]
    assert (config.batch_size, load_config(f"pretrain_ofa_{size}").grad_accum) == (batch, grad_accum)
    config.model_overrides = {**config.model_overrides, **WIDTH}  # the recipe's model, d_model 32 at 32 px
    result = Trainer(config, resume="never").fit()

    assert_outputs(output)
    assert drawn_tasks == [Counter(QUOTAS[batch])] * 2  # every micro-batch mixes all seven in the recipe's quotas
    saved = load_config(output / "train_config.yaml")
    assert saved.tasks == RECIPE_TASKS and saved.model == f"ofa_ufo_{size}"
    assert saved.data == {task: f"${{OFA_PRETRAIN_DATA}}/{task}.jsonl" for task in RECIPE_TASKS}
    # OFA's pretraining optimisation (reference/ofa.md §7)
    assert (saved.lr, saved.warmup_ratio, saved.end_lr, saved.label_smoothing) == (1e-4, 0.01, 0.0, 0.0)
    assert (saved.weight_decay, saved.clip_norm, saved.betas, saved.eps) == (0.01, 5.0, (0.9, 0.999), 1e-8)
    assert (saved.ema_decay, saved.freeze_embeddings, saved.objective) == (0.0, False, "cross_entropy")
    # OFA pretrains its ResNet with the rest: no warm-up of the stem alone, nothing frozen
    assert (saved.stem_warmup_images, saved.freeze, saved.freeze_batchnorm) == (0, [], False)
    report = json.loads((output / "metrics.json").read_text())
    assert report["stem_warmup"] is None and report["steps"] == 2
    assert set(report["metrics_untrained"]) == set(report["metrics_trained"]) == EVAL_TASKS
    assert finite_losses(output, 2) == result.losses
    model = json.loads((output / "config.json").read_text())
    assert (model["dropout"], model["encoder_drop_path_rate"], model["decoder_drop_path_rate"]) == (0.1, 0.1, 0.1)
    assert model["vision_config"]["resnet_type"] == resnet and model["image_size"] == 32


@pytest.fixture
def script_root(tmp_path) -> Path:
    """A repository root holding the pretraining scripts, so a run's default output_dir (relative to the
    root) lands in tmp_path; the package itself is found on PYTHONPATH (offline_script_env)."""
    root = tmp_path / "repo"
    (root / "run_scripts").mkdir(parents=True)
    (root / ".ci").mkdir()
    for name in ("_env.sh", *(f"pretrain_ofa_{size}.sh" for size in SIZES)):
        shutil.copy(ROOT / "run_scripts" / name, root / "run_scripts" / name)
    shutil.copy(ROOT / "setup.py", root / "setup.py")  # _env.sh's install stamp hashes these two
    shutil.copy(ROOT / ".ci" / "constraints.txt", root / ".ci" / "constraints.txt")
    return root


def run_pretrain_script(root: Path, size: str, args: list[str], data: Path | None = None) -> subprocess.CompletedProcess:
    """`bash pretrain_ofa_<size>.sh ARGS` from `root`, with $OFA_PRETRAIN_DATA set to `data` or unset."""
    env = {k: v for k, v in offline_script_env(root / "venv").items() if k != "OFA_PRETRAIN_DATA"}
    if data is not None:
        env["OFA_PRETRAIN_DATA"] = str(data)
    script = root / "run_scripts" / f"pretrain_ofa_{size}.sh"
    return subprocess.run(["bash", str(script), *args], env=env, cwd="/", capture_output=True, text=True, timeout=300,
                          check=False)


# without data: the size's embedded demo default (tiny: its own config; the others OFA-Base's on their preset,
# grown from the tiny default: medium and large with fewer steps, huge from the tiny default with heads of 80)
HUGE_SMALL_MODEL = ("model_overrides={image_size: 64, dropout: 0.0, d_model: 320, encoder_attention_heads: 4, "
                    "decoder_attention_heads: 4, encoder_ffn_dim: 1280, decoder_ffn_dim: 1280}")
HUGE_SMALL = f"grow_overrides=[eval_every=0, '{HUGE_SMALL_MODEL}', output_dir=checkpoints/ofa_ufo_tiny_h80.pretrain_demo]"
DEMO_PATHS = {"tiny": ("pretrain_demo_tiny", []), "base": ("pretrain_demo_base", []),
              "medium": ("pretrain_demo_base", ["model=ofa_ufo_medium"]),
              "large": ("pretrain_demo_base", ["model=ofa_ufo_large", "max_steps=200"]),
              "huge": ("pretrain_demo_base", ["model=ofa_ufo_huge", HUGE_SMALL, "max_steps=50"])}
GROWN = ("medium", "base", "large", "huge")
# the grown sizes' tiny run, as quick as theirs (its default output_dir, under the script root)
SMALL_QUICK = "grow_overrides=[" + ", ".join(f"'{arg}'" for arg in [SCRIPT_TINY, *SCRIPT_QUICK,
                                                                     "stem_warmup_images=20"]) + "]"


def test_huge_grows_from_a_tiny_default_with_heads_of_80():
    """The huge script's small run is the tiny default at a quarter of Huge's widths (heads of 80, which the
    64-wide tiny heads cannot tile into), so growth into Huge is a whole 4x."""
    script = (ROOT / "run_scripts" / "pretrain_ofa_huge.sh").read_text()
    assert f"'{HUGE_SMALL_MODEL}'" in script and "output_dir=checkpoints/ofa_ufo_tiny_h80.pretrain_demo" in script
    config = load_config("pretrain_demo_base", DEMO_PATHS["huge"][1])
    small = load_config(config.grow_from, config.grow_overrides)
    assert small.model_overrides["d_model"] == 320 and small.output_dir == "checkpoints/ofa_ufo_tiny_h80.pretrain_demo"
    as_model = [SimpleNamespace(config=create_config(c.model, **c.model_overrides)) for c in (small, config)]
    assert width_factor(*as_model) == 4
    tiny = SimpleNamespace(config=create_config("ofa_ufo_tiny", image_size=64, dropout=0.0))  # heads of 64
    with pytest.raises(GrowthError, match="encoder_attention_heads 16 is not 5 x the small model's 4"):
        width_factor(tiny, as_model[1])


@pytest.mark.parametrize("size", SIZES)
def test_script_without_data_runs_the_demo_default(size, script_root):
    # the tiny default warms the stem up on 19,200 scenes first; 20 keep the warm-up in the 2-step run
    warmup = ["stem_warmup_images=20"] if size == "tiny" else []
    args = [SCRIPT_TINY, *SCRIPT_QUICK, *warmup, *([SMALL_QUICK] if size in GROWN else [])]
    result = run_pretrain_script(script_root, size, args)
    assert result.returncode == 0, result.stderr[-3000:]
    output = script_root / "checkpoints" / f"ofa_ufo_{size}.pretrain_demo"  # its own tag: sizes never share one
    assert_outputs(output)
    config, script_args = DEMO_PATHS[size]
    assert f"config {config}: model ofa_ufo_{size}," in result.stdout
    expected = load_config(config, [*script_args, f"output_dir={output.relative_to(script_root)}", *args])
    assert (output / "train_config.yaml").read_text() == expected.to_yaml()
    finite_losses(output, 2)
    assert json.loads((output / "config.json").read_text())["vision_config"]["resnet_type"] == RECIPE_SIZES[size][2]
    report = json.loads((output / "metrics.json").read_text())
    assert (report["stem_warmup"] is not None) == (size == "tiny")
    if size in GROWN:  # trained the tiny default first (2 steps here) and started from it
        small = script_root / "checkpoints" / "ofa_ufo_tiny.pretrain_demo"
        assert report["grown_from"]["model"] == "checkpoints/ofa_ufo_tiny.pretrain_demo"
        assert json.loads((small / "metrics.json").read_text())["steps"] == 2
        assert report["grown_from"]["heads"] == ["grounding"]  # the tiny default's box-mask head, grown too
    else:
        assert report["grown_from"] is None


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_script_with_data_runs_the_recipe(size, pretrain_data, script_root):
    output = script_root / "checkpoints" / f"ofa_ufo_{size}.pretrain"
    args = [SCRIPT_TINY, *SCRIPT_QUICK]
    result = run_pretrain_script(script_root, size, args, pretrain_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_outputs(output)
    assert f"config pretrain_ofa_{size}: model ofa_ufo_{size}," in result.stdout
    expected = load_config(f"pretrain_ofa_{size}", [f"output_dir={output.relative_to(script_root)}", *args])
    assert (output / "train_config.yaml").read_text() == expected.to_yaml()
    finite_losses(output, 2)


@pytest.mark.parametrize("size", SIZES)
def test_script_picks_the_recipe_when_data_is_set(size):
    text = (ROOT / "run_scripts" / f"pretrain_ofa_{size}.sh").read_text()
    assert 'source "$(dirname "$0")/_env.sh"' in text
    assert ('if [ -n "${OFA_PRETRAIN_DATA:-}" ]; then\n'
            f'  exec python -m ofa_ufo.training --config pretrain_ofa_{size} "$@"\nfi\n') in text


def test_missing_recipe_file_names_the_file_and_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFA_PRETRAIN_DATA", str(tmp_path))
    assert main(["--config", "pretrain_ofa_tiny", "model=ofa_ufo_tiny", SCRIPT_TINY, *QUICK,
                 f"output_dir={tmp_path / 'out'}"]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "caption.jsonl") in error and "canonical" in error, error
