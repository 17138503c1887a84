"""The data-source registry (ofa_ufo.data.sources): every format and generated source opens by name, with
typed options whose errors name the format and the option, through the same path as a spec file's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ofa_ufo.data.canonical import CANONICAL_TASKS, DataError, new_example, validate_example
from ofa_ufo.data.demo_identities import HELD_OUT_OFFSET
from ofa_ufo.data.sources import (
    SOURCES, DataSourceError, DemoIdentitiesOptions, DemoScenesOptions, Format, FormatOptions, Generated,
    MissingOptionError, list_sources, open_examples, source_of,
)
from ofa_ufo.data.specs import load_spec
from ofa_ufo.tasks import get_task, list_tasks

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "data"
IMAGES = str(EXAMPLES / "images")

# one small dataset of every format (docs/examples/data), with the task its examples have
DATASETS = {
    "jsonl": ({"input": "canonical.jsonl"}, "caption"),
    "ofa_tsv": ({"input": "caption.tsv", "layout": "caption"}, "caption"),
    "webdataset": ({"input": "webdataset-{000..000}.tar"}, "caption"),
    "coco_captions": ({"input": "captions.json", "images": IMAGES}, "caption"),
    "coco_instances": ({"input": "instances.json", "images": IMAGES}, "detection"),
    "coco_karpathy": ({"input": "dataset_coco.json", "images": str(EXAMPLES)}, "caption"),
    "vqa_v2": ({"input": "vqa_questions.json", "annotations": "vqa_annotations.json", "images": IMAGES}, "vqa"),
    "refcoco": ({"input": "refs.json", "annotations": "instances.json", "images": IMAGES}, "grounding"),
    "image_folder": ({"input": "image_folder"}, "classification"),
    "snli_ve": ({"input": "snli_ve.jsonl", "images": "flickr30k"}, "entailment"),
    "market1501": ({"input": "market1501", "split": "query,gallery"}, "reid_person"),
    "msmt17": ({"input": "msmt17"}, "reid_person"),
    "veri776": ({"input": "veri776"}, "reid_vehicle"),
    "lfw_pairs": ({"input": "lfw/pairs.txt", "images": "lfw"}, "face"),
    "sop": ({"input": "sop/Ebay_test.txt"}, "product"),
    "identity_folder": ({"input": "lfw", "task": "face"}, "face"),
}
PATHS = ("input", "images", "annotations")


def located(options: dict) -> dict:
    """Relative paths under docs/examples/data."""
    return {k: str(EXAMPLES / v) if k in PATHS and not Path(v).is_absolute() else v for k, v in options.items()}


def hf_data(tmp_path: Path) -> dict:
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"img": str(EXAMPLES / "images" / "a.jpg"), "q": "what color?", "a": "red"}) + "\n")
    return {"format": "hf", "input": str(path), "task": "vqa", "columns": "image=img,text=q,target=a"}


def test_the_registry_holds_every_format_and_generated_source():
    assert list_sources("format") == sorted([*DATASETS, "hf"])
    assert list_sources("source") == ["demo_identities", "demo_scenes"]
    assert all(isinstance(SOURCES[name], Format) for name in list_sources("format"))
    assert all(isinstance(SOURCES[name], Generated) for name in list_sources("source"))
    assert sorted(SOURCES) == list_sources()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_format_opens_by_name(name):
    options, task = DATASETS[name]
    examples = list(open_examples({"format": name, **located(options)}, task))
    assert examples and examples[0]["task"] == task  # canonical.jsonl mixes tasks; the other formats have one
    assert all(validate_example(e, name, None) for e in examples)
    assert list(SOURCES[name].read(FormatOptions(**located(options)))) == examples  # typed options, same examples


def test_hf_format_opens_a_local_file(tmp_path):
    pytest.importorskip("datasets")
    [example] = open_examples(hf_data(tmp_path), "vqa")
    assert (example["task"], example["text"], example["target"]) == ("vqa", "what color?", "red")
    with pytest.raises(DataSourceError, match=r"format 'hf' option 'columns' must be field=column pairs"):
        open_examples({**hf_data(tmp_path), "columns": "image"}, "vqa")


@pytest.mark.parametrize("name", list_sources("format"))
def test_a_missing_option_names_the_format_option_and_form(name, tmp_path):
    with pytest.raises(MissingOptionError, match=rf"format '{name}' needs input \(") as info:
        open_examples({"format": name}, "caption")
    assert info.value.format == name and "input" in info.value.needs
    needs = [option for option in SOURCES[name].needs if option != "input"]
    if needs:
        with pytest.raises(MissingOptionError, match=rf"format '{name}' needs {needs[0]} \(") as info:
            SOURCES[name].read(FormatOptions(input=str(tmp_path)))
        assert list(info.value.needs) == needs


def test_typed_option_errors_name_the_option_and_format():
    with pytest.raises(DataSourceError, match=r"format 'refcoco' option 'split' must be a string, got 1"):
        open_examples({"format": "refcoco", "input": "r.json", "split": 1}, "grounding")
    with pytest.raises(DataSourceError, match=r"format 'jsonl' option 'on_error' must be 'raise' or 'skip', got 'x'"):
        open_examples({"format": "jsonl", "input": str(EXAMPLES / "canonical.jsonl"), "on_error": "x"}, "caption")
    with pytest.raises(DataSourceError, match=r"source 'demo_scenes' option 'val_scenes' must be an integer, got '3'"):
        open_examples({"source": "demo_scenes", "val_scenes": "3"}, "caption")
    with pytest.raises(DataSourceError, match=r"source 'demo_scenes' option 'object_size' must be a list of 2 numbers"):
        open_examples({"source": "demo_scenes", "object_size": [0.2]}, "caption")
    with pytest.raises(DataSourceError, match=r"'data' needs source: one of \['demo_identities', 'demo_scenes'\] or "
                                              r"format: one of \['coco_captions'"):
        open_examples({"format": "parquet"}, "caption")
    with pytest.raises(DataSourceError, match="split must be one of"):
        open_examples({"source": "demo_scenes"}, "caption", split="test")


def test_a_missing_file_names_the_format_option_and_path(tmp_path):
    missing = tmp_path / "nowhere" / "captions.json"
    with pytest.raises(DataSourceError) as info:
        open_examples({"format": "coco_captions", "input": str(missing), "images": "x"}, "caption")
    assert str(info.value) == (f"format 'coco_captions': input {missing} does not exist; "
                               "expected a COCO captions_*.json file")


def test_an_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    data = {"format": "coco_captions", "input": "${NO_SUCH_ROOT}/c.json", "images": "x"}
    with pytest.raises(DataSourceError, match=r"set the environment variable\(s\) \['NO_SUCH_ROOT'\] used by the "
                                              r"data path '\$\{NO_SUCH_ROOT\}/c.json'"):
        open_examples(data, "caption")
    monkeypatch.setenv("NO_SUCH_ROOT", str(EXAMPLES))
    assert len(list(open_examples({**data, "input": "${NO_SUCH_ROOT}/captions.json"}, "caption"))) == 2


def test_the_train_split_reads_data_train_over_data():
    data = {"format": "coco_captions", "input": str(EXAMPLES / "nowhere.json"), "images": IMAGES,
            "train": {"input": str(EXAMPLES / "captions.json")}}
    assert len(list(open_examples(data, "caption", split="train"))) == 2
    switched = {"format": "lfw_pairs", "input": "x", "images": "y",
                "train": {"format": "identity_folder", "input": str(EXAMPLES / "lfw"), "task": "face"}}
    assert {e["meta"]["split"] for e in open_examples(switched, "face", split="train")} == {"train"}
    with pytest.raises(DataSourceError, match=r"'data' names no training data: add data.train"):
        open_examples({"format": "jsonl", "input": "x.jsonl"}, "caption", split="train")


def test_a_spec_skips_bad_rows_unless_it_says_raise(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1", "task": "caption", "target": "ok"}\n{"id": "2", "task": "caption", "target": ""}\n')
    assert [e["id"] for e in open_examples({"format": "jsonl", "input": str(path)}, "caption")] == ["1"]
    with pytest.raises(DataError, match="row 2, field 'target': is empty"):
        list(open_examples({"format": "jsonl", "input": str(path), "on_error": "raise"}, "caption"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_scenes_open_for_both_splits(split):
    examples = list(open_examples({"source": "demo_scenes", "val_scenes": 3, "size": 64, "train_scenes": 9},
                                  "grounding", split))
    assert [e["id"] for e in examples] == [f"{split}-{i}" for i in range(3)]
    assert {e["task"] for e in examples} == {"grounding"} and examples[0]["image"].size == (64, 64)
    with pytest.raises(DataSourceError, match="source 'demo_scenes': .*unknown demo tasks \\['face'\\]"):
        next(open_examples({"source": "demo_scenes"}, "face", split))


def test_demo_identities_open_for_both_splits():
    data = {"source": "demo_identities", "train_identities": 2, "views": 2, "val_examples": 4, "size": 32}
    train = list(open_examples(data, "face", "train"))
    assert [e["meta"]["identity"] for e in train] == [1, 1, 2, 2] and train[0]["image"].size == (32, 32)
    val = list(open_examples(data, "face"))
    assert len(val) == 4 and all(e["meta"]["identity"] > HELD_OUT_OFFSET for e in val)
    with pytest.raises(ValueError, match="no demo identities for task 'caption'"):
        open_examples(data, "caption", "train")


def test_settings_types_default_like_the_shipped_specs():
    assert DemoScenesOptions().val_scenes == load_spec("demo_caption").data["val_scenes"]
    assert DemoIdentitiesOptions() == DemoIdentitiesOptions(**{
        k: v for k, v in load_spec("demo_face").data.items() if k != "source"})


def test_a_spec_files_data_opens_through_the_same_path(tmp_path, monkeypatch):
    monkeypatch.setenv("EXAMPLES", str(EXAMPLES))
    spec = tmp_path / "toy.yaml"
    spec.write_text("name: toy\ntask: detection\nmetric: coco_map\ndata: {format: coco_instances, "
                    "input: '${EXAMPLES}/instances.json', images: '${EXAMPLES}/images'}\n")
    loaded = load_spec(spec)
    assert source_of(loaded.data) is SOURCES["coco_instances"]
    assert list(open_examples(loaded.data, loaded.task)) == list(
        SOURCES["coco_instances"].read(FormatOptions(input=str(EXAMPLES / "instances.json"), images=IMAGES,
                                                     on_error="skip")))
    demo = load_spec("demo_vqa")
    assert source_of(demo.data) is SOURCES["demo_scenes"]
    assert next(open_examples(demo.data, demo.task))["task"] == "vqa"
    spec.write_text("name: toy\ntask: caption\nmetric: cider\ndata: {format: parquet}\n")
    with pytest.raises(ValueError, match=r"toy.yaml: field 'data' needs source: .* or format: one of "):
        load_spec(spec)


def test_canonical_tasks_and_their_fields_come_from_the_registry():
    assert list(CANONICAL_TASKS) == list_tasks()
    for task in CANONICAL_TASKS:
        needs = get_task(task).example_fields
        assert needs, f"task {task!r} names no example_fields"
        first = needs[0] if isinstance(needs[0], str) else needs[0][0]
        with pytest.raises(DataError, match=rf"field '{first}': is required for task '{task}'"):
            validate_example(new_example(id="1", task=task), "src", 1)
