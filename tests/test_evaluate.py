"""The evaluation command: a spec + a model directory -> metric table and predictions JSON."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image

import ofa_ufo.evaluate as evaluate_module
from ofa_ufo.cli.main import main as cli_main
from ofa_ufo.data.sources import DataSourceError, open_examples
from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.evaluate import main
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.scored_results import SHOWN_ERRORS, score_results
from ofa_ufo.training import Trainer, TrainingError
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.report import evaluate_model, format_metric_table

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "data"


def _iou(a: list[float], b: list[float]) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _hand_score(task: str, predictions: list[dict], examples: list[dict]) -> float:
    """The share of right answers: VQA, the answer equal to the only reference (with fewer than
    four human answers VQA accuracy is exact match); grounding, the one box at IoU >= 0.5."""
    if task == "vqa":
        hits = [p["text"].strip().lower() == e["target"].strip().lower() for p, e in zip(predictions, examples)]
    else:
        hits = [bool(p["boxes"]) and _iou(p["boxes"][0], e["box"]) >= 0.5 for p, e in zip(predictions, examples)]
    return sum(hits) / len(hits)


def _with_references(examples: list[dict], predictions: list[dict], folder: Path) -> Path:
    """A canonical .jsonl of the examples (images saved as PNG) whose references are the first two
    predictions, and for the third an answer that is not the prediction."""
    rows = []
    for i, (example, prediction) in enumerate(zip(examples, predictions)):
        example["image"].save(folder / f"{example['id']}.png")
        row = {"id": example["id"], "task": example["task"], "image": f"{example['id']}.png", "text": example["text"]}
        if example["task"] == "vqa":
            row["target"] = prediction["text"] if i < 2 else "not " + prediction["text"]
        else:
            assert prediction["boxes"], prediction  # a box to copy
            x0, y0, x1, y1 = prediction["boxes"][0]
            far = [0.0, 0.0, 40.0, 40.0] if x0 > 60 and y0 > 60 else [200.0, 200.0, 250.0, 250.0]
            row["box"] = [x0, y0, x1, y1] if i < 2 else far
        rows.append(json.dumps(row))
    (folder / "copied.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "copied.jsonl"


@pytest.mark.parametrize("spec", ["demo_vqa", "demo_grounding"])
def test_evaluate_demo_spec(tiny_checkpoint, tmp_path, capsys, spec):
    output = tmp_path / "preds.json"
    assert main(["--spec", spec, "--model", str(tiny_checkpoint), "--limit", "3", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    metric = load_spec(spec).metric
    assert f"| {spec} (3 examples) |" in table and metric in table
    saved, task = json.loads(output.read_text()), load_spec(spec).task
    examples = list(islice(open_examples(load_spec(spec).data, task), 3))
    assert [p["id"] for p in saved["predictions"]] == [e["id"] for e in examples]
    assert saved["scores"][metric] == pytest.approx(_hand_score(task, saved["predictions"], examples))
    # the same images, with the first two predictions written as their references: 2 of 3 right
    copied = _with_references(examples, saved["predictions"], tmp_path)
    spec_file = tmp_path / "copied.yaml"
    spec_file.write_text(json.dumps({"name": "copied", "task": task, "metric": metric, "prompt_style": "ofa",
                                     "generation": load_spec(spec).generation,
                                     "data": {"format": "jsonl", "input": str(copied)}}))
    assert main(["--spec", str(spec_file), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert again["predictions"] == saved["predictions"]  # same images and prompts, same answers
    assert again["scores"][metric] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in copied.read_text().splitlines()]
    assert _hand_score(task, again["predictions"], rows) == pytest.approx(2 / 3)


def test_evaluate_dataset_format_spec(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXAMPLES", str(EXAMPLES))
    spec = tmp_path / "toy_detection.yaml"
    spec.write_text(
        "name: toy_detection\ntask: detection\nmetric: coco_map\n"
        "data: {format: coco_instances, input: '${EXAMPLES}/instances.json', images: '${EXAMPLES}/images'}\n"
        "generation: {max_new_tokens: 12}\n"
    )
    output = tmp_path / "preds.json"
    assert main(["--spec", str(spec), "--model", str(tiny_checkpoint), "--output", str(output)]) == 0
    assert "| map |" in capsys.readouterr().out
    assert {p["id"] for p in json.loads(output.read_text())["predictions"]}


def test_unset_data_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntask: caption\nmetric: cider\ndata: {format: coco_captions, input: '${NO_SUCH_ROOT}/c.json', images: x}\n")
    with pytest.raises(DataSourceError, match="NO_SUCH_ROOT"):
        next(open_examples(load_spec(spec).data, "caption"))


# ---- examples that fail (issue 31, item 6): counted, listed, never a silent metric -------------------------

def _vqa_rows(folder: Path, present: int, total: int, targets: dict[str, str] | None = None) -> Path:
    """A canonical VQA .jsonl of `total` questions q0, q1, ... whose first `present` images exist (PNG);
    the others name files that are not there."""
    rows = []
    for i in range(total):
        if i < present:
            Image.new("RGB", (16, 16), (60 * i, 120, 30)).save(folder / f"img{i}.png")
        target = (targets or {}).get(f"q{i}", "red")
        rows.append(json.dumps({"id": f"q{i}", "task": "vqa", "image": f"img{i}.png", "text": "what color is it?",
                                "target": target}))
    (folder / "vqa.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "vqa.jsonl"


def _vqa_spec(folder: Path, data: Path) -> Path:
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"name": "toy_vqa", "task": "vqa", "metric": "vqa_accuracy", "prompt_style": "ofa",
                                "generation": {"num_beams": 1, "max_new_tokens": 3},
                                "data": {"format": "jsonl", "input": str(data)}}))
    return spec


def test_every_image_missing_exits_1_with_the_errors(tiny_checkpoint, tmp_path, capsys):
    spec = _vqa_spec(tmp_path, _vqa_rows(tmp_path, present=0, total=3))
    output = tmp_path / "preds.json"
    assert main(["--spec", str(spec), "--model", str(tiny_checkpoint), "--output", str(output)]) == 1
    captured = capsys.readouterr()
    for row in ("| toy_vqa (3 examples) | value |", "| vqa_accuracy | - |", "| scored | 0 |", "| failed | 3 |"):
        assert row in captured.out.splitlines(), captured.out
    assert f"example q0: image file not found: {tmp_path / 'img0.png'}" in captured.out
    assert "every example failed (3 of 3): there is no metric" in captured.err and str(output) in captured.err
    saved = json.loads(output.read_text())  # written all the same, with every error record
    assert (saved["scored"], saved["failed"], saved["scores"]) == (0, 3, {})
    assert [p["id"] for p in saved["predictions"]] == ["q0", "q1", "q2"]
    assert all("image file not found" in p["error"] for p in saved["predictions"])
    # the ofa-ufo command runs the same code, with the same exit code
    assert cli_main(["evaluate", "--spec", str(spec), "--model", str(tiny_checkpoint), "--output", str(output)]) == 1


def test_some_images_missing_are_counted_not_scored(tiny_checkpoint, tmp_path, capsys):
    spec = _vqa_spec(tmp_path, _vqa_rows(tmp_path, present=3, total=4))
    output, model = tmp_path / "preds.json", str(tiny_checkpoint)
    assert main(["--spec", str(spec), "--model", model, "--output", str(output)]) == 1  # 25% > the default 5%
    captured = capsys.readouterr()
    assert "| scored | 3 |" in captured.out and "| failed | 1 |" in captured.out
    assert "1 of 4 examples failed and are not in the metric:\n  example q3: image file not found" in captured.out
    assert "1 of 4 examples failed (25.0%), more than the 5.0% allowed (--max-failures 0.05)" in captured.err
    saved = json.loads(output.read_text())  # written before the refusal
    answers = {p["id"]: p["text"] for p in saved["predictions"] if "text" in p}
    assert sorted(answers) == ["q0", "q1", "q2"] and all(answers.values()) and (saved["scored"], saved["failed"]) == (3, 1)
    # the model's own answers as the references: 3 of 3 scored are right, where scoring the failed example
    # as a wrong answer would give 0.75; a 25% share of failures is allowed with --max-failures 0.25
    _vqa_rows(tmp_path, present=3, total=4, targets=answers)
    assert main(["--spec", str(spec), "--model", model, "--output", str(output), "--max-failures", "0.25"]) == 0
    assert "| vqa_accuracy | 1.0000 |" in capsys.readouterr().out
    assert json.loads(output.read_text())["scores"]["vqa_accuracy"] == 1.0


def test_max_failures_is_a_share(tiny_checkpoint, tmp_path, capsys):
    spec = _vqa_spec(tmp_path, _vqa_rows(tmp_path, present=1, total=1))
    with pytest.raises(SystemExit) as stop:
        main(["--spec", str(spec), "--model", str(tiny_checkpoint), "--max-failures", "5"])
    assert stop.value.code == 2 and "--max-failures is a share of the examples" in capsys.readouterr().err


def test_a_spoilt_model_file_is_named_before_any_example_runs(tiny_checkpoint, tmp_path, capsys):
    spec = _vqa_spec(tmp_path, _vqa_rows(tmp_path, present=1, total=1))
    model = tmp_path / "model"
    model.mkdir()
    for path in tiny_checkpoint.iterdir():
        (model / path.name).symlink_to(path)
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "OFAUFOTokenizer", ')
    assert main(["--spec", str(spec), "--model", str(model), "--output", str(tmp_path / "p.json")]) == 1
    assert f"evaluate: {model / 'tokenizer_config.json'} is not valid JSON" in capsys.readouterr().err


def test_score_results_by_hand():
    """VQA accuracy of "red" against ten "red" answers is 1; the failed example is counted and kept, not
    scored as a wrong answer (which would make the accuracy 0.5)."""
    task = get_task("vqa")
    examples = [{"id": "a", "target": "red", "references": ["red"] * 10}, {"id": "b", "target": "blue"}]
    scored = score_results(task, "vqa_accuracy", examples, [{"text": "red"}, {"error": "image file not found: b.png"}])
    assert (scored.values, scored.scored, scored.failed) == ({"vqa_accuracy": 1.0}, 1, 1)
    assert scored.error_lines() == ["example b: image file not found: b.png"] and scored.counts() == "1 scored, 1 failed"
    assert scored.problem(0.5) is None and "1 of 2 examples failed (50.0%)" in scored.problem(0.4)
    nothing = score_results(task, "vqa_accuracy", examples[:1], [{"error": "x"}])
    assert nothing.values == {} and "every example failed (1 of 1)" in nothing.problem(1.0)
    many = score_results(task, "vqa_accuracy", examples * 4, [{"error": "x"}] * 8)
    assert many.failed == 8 and len(many.errors) == SHOWN_ERRORS


# ---- the trainer's held-out evaluation ------------------------------------------------------------------

def _held_out(folder: Path, present: int, total: int) -> list[dict]:
    return [{**json.loads(line), "image": str(folder / json.loads(line)["image"])}
            for line in _vqa_rows(folder, present, total).read_text().splitlines()]


def test_held_out_evaluation_counts_failures(model, processor, tmp_path):
    spec = TaskSpec(name="held", task="vqa", data={}, metric="vqa_accuracy", generation={"max_new_tokens": 3})
    scored = evaluate_model(model, processor, spec, _held_out(tmp_path, present=2, total=3), batch_size=2)
    assert (scored.scored, scored.failed) == (2, 1) and set(scored.values) == {"vqa_accuracy"}
    assert scored.errors == [{"id": "q2", "error": f"image file not found: {tmp_path / 'img2.png'}"}]
    with pytest.raises(TrainingError, match=r"task 'vqa' \(held\): 1 of 3 examples failed .* more than the 20.0%"):
        evaluate_model(model, processor, spec, _held_out(tmp_path, present=2, total=3), max_failures=0.2)
    none = tmp_path / "none"
    none.mkdir()
    with pytest.raises(TrainingError, match=r"every example failed \(2 of 2\).*example q0: image file not found"):
        evaluate_model(model, processor, spec, _held_out(none, present=0, total=2))


def test_the_trainer_records_and_refuses_failed_held_out_examples(tmp_path, capsys):
    data = tmp_path / "some"
    data.mkdir()
    config = config_from_dict(dict(model_overrides=dict(TINY), tasks={"vqa": 1}, batch_size=2, max_steps=1,
                                   eval_examples=3, eval_batch_size=3, eval_data={"vqa": str(_vqa_rows(data, 2, 3))},
                                   demo_train_scenes=8, num_threads=1, output_dir=str(tmp_path / "run")), "test")
    trainer = Trainer(config)
    with pytest.warns(UserWarning, match="skipping sample 'q2'"):  # the encoder image signal skips it too
        trainer._record_eval(None)
    entry = trainer.history["eval"][-1]
    assert entry["examples"]["vqa"] == {"scored": 2, "failed": 1, "errors": [
        {"id": "q2", "error": f"image file not found: {data / 'img2.png'}"}]}
    assert "held-out vqa at step 0: 2 scored, 1 failed" in capsys.readouterr().out
    table = format_metric_table(entry["metrics"], entry["metrics"], examples=entry["examples"])
    assert table.splitlines()[0] == "| task | metric | untrained | trained | held-out examples |"
    assert table.splitlines()[-1].endswith("| 2 scored, 1 failed |")
    none = tmp_path / "none"
    none.mkdir()
    trainer.config = replace(config, eval_data={"vqa": str(_vqa_rows(none, 0, 3))})
    with pytest.raises(TrainingError, match=r"held-out evaluation of task 'vqa'.*every example failed \(3 of 3\)"):
        trainer._record_eval(None)


def test_blind_evaluation_shows_the_model_only_grey_images(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    seen = []  # every image that reaches the pipeline
    pipeline = evaluate_module.pipeline

    def recording_pipeline(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)

        def call(image, **options):
            seen.append(image)
            return pipe(image, **options)
        return call

    monkeypatch.setattr(evaluate_module, "pipeline", recording_pipeline)
    assert main(["--spec", "demo_vqa", "--model", str(tiny_checkpoint), "--limit", "3", "--blind"]) == 0
    assert (tiny_checkpoint / "eval_demo_vqa_blind.json").is_file()  # beside, not over, the real evaluation's
    assert len(seen) == 3 and all(set(image.getdata()) == {(128, 128, 128)} for image in seen)
    assert "| vqa_accuracy |" in capsys.readouterr().out
