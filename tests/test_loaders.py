"""Every loader on a tiny file in its real format; errors name file, row and field."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from PIL import Image

from ofa_ufo.data import DataError, LoadReport, new_example, validate_example
from ofa_ufo.data import convert
from ofa_ufo.data.loaders import (
    load_coco_captions, load_coco_instances, load_hf_dataset, load_image_folder, load_jsonl, load_ofa_tsv,
    load_refcoco, load_snli_ve, load_vqa_v2,
)


def png_b64(size=(8, 6), color=(200, 10, 10), urlsafe=False) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(buffer.getvalue()).decode()


def write_lines(path, rows):
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path, document):
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def raises_named(loader_call, *parts):
    """The DataError message names every part (file, row, field)."""
    with pytest.raises(DataError) as info:
        list(loader_call())
    for part in parts:
        assert part in str(info.value), str(info.value)
    return info.value


# --- canonical ---------------------------------------------------------------------------------

def test_validate_example_checks_types_boxes_and_required_fields():
    ok = new_example(id="1", task="grounding", image="a.png", text="the cat", box=[0, 0, 4, 4])
    assert validate_example(ok, "f.jsonl", 3, image_size=(8, 8)) == ok
    with pytest.raises(DataError, match=r"f.jsonl, row 3, field 'box'.*outside the image"):
        validate_example({**ok, "box": [0, 0, 9, 4]}, "f.jsonl", 3, image_size=(8, 8))
    with pytest.raises(DataError, match=r"field 'box'.*x1 < x0"):
        validate_example({**ok, "box": [5, 0, 4, 4]}, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"field 'text': expected a string"):
        validate_example({**ok, "text": 7}, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"field 'box': is required"):
        validate_example({**ok, "box": None}, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"field 'target': is empty"):
        validate_example(new_example(id="1", task="caption", target="  "), "f.jsonl", 3)
    with pytest.raises(DataError, match=r"field 'labels': 1 labels for 2 boxes"):
        validate_example(new_example(id="1", task="detection", boxes=[[0, 0, 1, 1]] * 2, labels=["a"]), "f", 1)


# --- OFA TSV -----------------------------------------------------------------------------------

def test_tsv_caption_vqa_refcoco_snli_imagenet(tmp_path):
    img, safe = png_b64(), png_b64(urlsafe=True)
    cap = write_lines(tmp_path / "cap.tsv", [[1, 11, "a red box&&a box", "box", img]])
    [ex] = load_ofa_tsv(cap, "caption")
    assert (ex["id"], ex["target"], ex["references"], ex["image"].size) == ("1", "a red box", ["a red box", "a box"], (8, 6))
    vqa = write_lines(tmp_path / "vqa.tsv", [[5, 11, "what color?", "0.3|!+pink&&1.0|!+red", "box&&cat", img]])
    [ex] = load_ofa_tsv(vqa, "vqa")
    assert (ex["text"], ex["target"], ex["references"], ex["meta"]) == ("what color?", "red", ["red", "pink"], {"objects": ["box", "cat"]})
    ref = write_lines(tmp_path / "ref.tsv", [[2, 11, "the box", "1,1,7.5,5", img]])
    assert next(load_ofa_tsv(ref, "refcoco"))["box"] == [1.0, 1.0, 7.5, 5.0]
    snli = write_lines(tmp_path / "ve.tsv", [[3, 11, safe, "a box", "a red box on white", "entailment"]])
    ex = next(load_ofa_tsv(snli, "snli_ve"))
    assert (ex["task"], ex["text"], ex["premise"], ex["target"]) == ("entailment", "a box", "a red box on white", "entailment")
    net = write_lines(tmp_path / "in.tsv", [[safe, 7, "rugby ball"]])
    assert next(load_ofa_tsv(net, "imagenet"))["target"] == "rugby ball"
    stage2 = next(load_ofa_tsv(cap, "caption", selected_cols="1,4,2"))
    assert stage2["id"] == "11"


def test_tsv_errors_name_file_row_and_field(tmp_path):
    img = png_b64()
    good = [2, 11, "the box", "1,1,7,5", img]
    path = write_lines(tmp_path / "ref.tsv", [good, [2, 11, "the box", "1,1,9,5", img]])
    raises_named(lambda: load_ofa_tsv(path, "refcoco"), "ref.tsv", "row 2", "'box'", "outside the image")
    path = write_lines(tmp_path / "x1.tsv", [[2, 11, "the box", "6,1,2,5", img]])
    raises_named(lambda: load_ofa_tsv(path, "refcoco"), "x1.tsv", "row 1", "'box'", "x1 < x0")
    path = write_lines(tmp_path / "short.tsv", [good[:3]])
    raises_named(lambda: load_ofa_tsv(path, "refcoco"), "short.tsv", "row 1", "column 4", "missing")
    path = write_lines(tmp_path / "b64.tsv", [good[:4] + ["!!not base64!!"], good[:4] + [base64.b64encode(b"junk").decode()]])
    raises_named(lambda: load_ofa_tsv(path, "refcoco"), "b64.tsv", "row 1", "'image'", "base64")
    report = LoadReport()
    assert list(load_ofa_tsv(path, "refcoco", on_error="skip", report=report)) == []
    assert report.skipped == 2 and "row 2" in report.errors[1] and "not a readable image" in report.errors[1]
    path = write_lines(tmp_path / "cap.tsv", [[1, 11, "", "box", img]])
    raises_named(lambda: load_ofa_tsv(path, "caption"), "cap.tsv", "row 1", "'target'", "empty")
    path = write_lines(tmp_path / "vqa.tsv", [[5, 11, "q?", "red", "", img]])
    raises_named(lambda: load_ofa_tsv(path, "vqa"), "vqa.tsv", "row 1", "'answers'", "confidence")


def test_skip_counts_and_logs_one_warning(tmp_path, caplog):
    img = png_b64()
    rows = [[1, 11, "ok", "b", img], [2, 11, "", "b", img], [3, 11, "fine", "b", img], [4, 11, "x"]]
    path = write_lines(tmp_path / "cap.tsv", rows)
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="ofa_ufo.data.loaders"):
        examples = list(load_ofa_tsv(path, "caption", on_error="skip", report=report))
    assert [e["id"] for e in examples] == ["1", "3"]
    assert (report.loaded, report.skipped) == (2, 2)
    assert len(caplog.records) == 1 and "skipped 2 bad rows" in caplog.text and "row 4" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        load_ofa_tsv(path, "caption", on_error="ignore")


# --- COCO / VQA / RefCOCO --------------------------------------------------------------------

COCO_IMAGES = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6}, {"id": 2, "file_name": "b.jpg", "width": 4, "height": 4}]


def test_coco_captions(tmp_path):
    anns = [{"id": 10, "image_id": 1, "caption": " A cat. "}, {"id": 11, "image_id": 2, "caption": "A dog"}]
    path = write_json(tmp_path / "captions_val.json", {"images": COCO_IMAGES, "annotations": anns})
    examples = list(load_coco_captions(path, tmp_path / "img"))
    assert [(e["id"], e["target"], e["image"]) for e in examples] == [
        ("10", "A cat.", str(tmp_path / "img" / "a.jpg")), ("11", "A dog", str(tmp_path / "img" / "b.jpg"))]
    bad = anns + [{"id": 12, "image_id": 2, "caption": ""}, {"id": 13, "image_id": 3, "caption": "x"}, {"id": 14, "image_id": 1}]
    path = write_json(tmp_path / "captions_bad.json", {"images": COCO_IMAGES, "annotations": bad})
    raises_named(lambda: load_coco_captions(path, tmp_path), "captions_bad.json", "row 3", "'target'", "empty")
    report = LoadReport()
    assert len(list(load_coco_captions(path, tmp_path, on_error="skip", report=report))) == 2
    assert report.skipped == 3 and "'image_id'" in report.errors[1] and "'caption': missing" in report.errors[2]


def test_coco_instances(tmp_path):
    cats = [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}]
    anns = [{"id": 1, "image_id": 1, "bbox": [1, 1, 2.5, 3], "category_id": 3},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 8, 6], "category_id": 4},
            {"id": 3, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 4, "iscrowd": 1}]
    path = write_json(tmp_path / "instances.json", {"images": COCO_IMAGES, "annotations": anns, "categories": cats})
    first, second = load_coco_instances(path, tmp_path)
    assert first["boxes"] == [[1.0, 1.0, 3.5, 4.0], [0.0, 0.0, 8.0, 6.0]] and first["labels"] == ["cat", "dog"]
    assert second["boxes"] == [] and second["task"] == "detection"
    anns.append({"id": 4, "image_id": 2, "bbox": [2, 2, 3, 1], "category_id": 3})
    path = write_json(tmp_path / "instances_bad.json", {"images": COCO_IMAGES, "annotations": anns, "categories": cats})
    raises_named(lambda: load_coco_instances(path, tmp_path), "instances_bad.json", "row 2", "'boxes[0]'", "outside")
    anns[-1] = {"id": 4, "image_id": 2, "bbox": "2,2,1,1", "category_id": 9}
    path = write_json(tmp_path / "instances_bad.json", {"images": COCO_IMAGES, "annotations": anns, "categories": cats})
    raises_named(lambda: load_coco_instances(path, tmp_path), "row 2", "'annotations[4].bbox'")


def test_vqa_v2(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 7, "image_id": 1, "question": "What color?"},
        {"question_id": 8, "image_id": 2, "question": "How many?"}, {"question_id": 9, "image_id": 2}]}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(["red"] * 7 + ["pink"] * 3)]
    annotations = {"annotations": [{"question_id": 7, "image_id": 1, "answers": answers, "multiple_choice_answer": "red"},
                                   {"question_id": 8, "image_id": 2, "answers": []}]}
    qpath, apath = write_json(tmp_path / "q.json", questions), write_json(tmp_path / "a.json", annotations)
    report = LoadReport()
    [ex] = load_vqa_v2(qpath, apath, tmp_path, on_error="skip", report=report)
    assert (ex["id"], ex["text"], ex["target"], len(ex["references"])) == ("7", "What color?", "red", 10)
    assert ex["image"].endswith("COCO_val2014_000000000001.jpg")
    assert report.skipped == 2 and "row 2, field 'answers (annotations file)'" in report.errors[0]
    raises_named(lambda: load_vqa_v2(qpath, apath, tmp_path), "q.json", "row 2", "answers")


def test_refcoco_json_export(tmp_path):
    instances = {"images": COCO_IMAGES, "annotations": [{"id": 50, "image_id": 1, "bbox": [1, 1, 3, 3], "category_id": 1}]}
    refs = [{"ref_id": 0, "image_id": 1, "ann_id": 50, "split": "val",
             "sentences": [{"sent": "left cat", "sent_id": 100}, {"sent": "the cat", "sent_id": 101}]},
            {"ref_id": 1, "image_id": 1, "ann_id": 51, "split": "testA", "sentences": [{"sent": "dog"}]}]
    rpath, ipath = write_json(tmp_path / "refs.json", refs), write_json(tmp_path / "instances.json", instances)
    examples = list(load_refcoco(rpath, ipath, tmp_path, split="val"))
    assert [(e["id"], e["text"], e["box"]) for e in examples] == [("100", "left cat", [1.0, 1.0, 4.0, 4.0]),
                                                                  ("101", "the cat", [1.0, 1.0, 4.0, 4.0])]
    raises_named(lambda: load_refcoco(rpath, ipath, tmp_path), "refs.json", "row 2", "'ann_id'")
    refs[0]["sentences"][1] = {"raw": "no sent key"}
    rpath = write_json(tmp_path / "refs.json", {"refs": refs})
    raises_named(lambda: load_refcoco(rpath, ipath, tmp_path), "row 1", "'sentences[1].sent'", "missing")


# --- folders, SNLI-VE, datasets ----------------------------------------------------------------

def test_image_folder(tmp_path):
    for cls, name in [("golden_retriever", "b.png"), ("golden_retriever", "a.jpg"), ("tabby", "c.png")]:
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("RGB", (2, 2)).save(tmp_path / cls / name)
    (tmp_path / "tabby" / "notes.txt").write_text("not an image")
    examples = list(load_image_folder(tmp_path))
    assert [(e["id"], e["target"]) for e in examples] == [
        ("golden_retriever/a.jpg", "golden retriever"), ("golden_retriever/b.png", "golden retriever"), ("tabby/c.png", "tabby")]
    report = LoadReport()
    named = list(load_image_folder(tmp_path, {"tabby": "tabby cat"}, on_error="skip", report=report))
    assert [e["target"] for e in named] == ["tabby cat"] and report.skipped == 2
    raises_named(lambda: load_image_folder(tmp_path, {"tabby": "cat"}), "a.jpg", "row 1", "'class'")


def test_snli_ve(tmp_path):
    rows = [{"Flickr30K_ID": "123", "sentence1": "A man sleeps.", "sentence2": "A person rests.", "gold_label": "entailment", "pairID": "p1"},
            {"Flickr30K_ID": "124", "sentence1": "A dog.", "sentence2": "A cat.", "gold_label": "-"},
            {"Flickr30K_ID": "125", "sentence1": "A dog."}]
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    report = LoadReport()
    [ex] = load_snli_ve(path, tmp_path / "flickr", on_error="skip", report=report)
    assert (ex["id"], ex["text"], ex["premise"], ex["target"]) == ("p1", "A person rests.", "A man sleeps.", "entailment")
    assert ex["image"] == str(tmp_path / "flickr" / "123.jpg") and report.skipped == 3
    raises_named(lambda: load_snli_ve(path, tmp_path), "snli_ve_dev.jsonl", "row 2", "'target'", "entailment label")
    assert "row 3, field 'sentence2': missing" in report.errors[1] and "row 4, field '<line>'" in report.errors[2]


def test_hf_dataset_column_mapping():
    import datasets

    image = Image.new("RGB", (5, 5), "blue")
    ds = datasets.Dataset.from_dict({"img": [image, image], "q": ["what color?", "why?"], "a": ["blue", ""],
                                     "qid": [1, 2]}, features=datasets.Features({
        "img": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string"), "qid": datasets.Value("int64")}))
    report = LoadReport()
    [ex] = load_hf_dataset(ds, "vqa", {"image": "img", "text": "q", "target": "a"}, id_column="qid",
                           on_error="skip", report=report)
    assert (ex["id"], ex["text"], ex["target"], ex["image"].size) == ("1", "what color?", "blue", (5, 5))
    assert report.skipped == 1 and "row 2, field 'target': is empty" in report.errors[0]
    with pytest.raises(DataError, match="field 'text': column 'question' not in"):
        load_hf_dataset(ds, "vqa", {"image": "img", "text": "question"})


# --- canonical JSONL and the convert command --------------------------------------------------

def test_jsonl_rejects_unknown_fields_and_resolves_images(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "1", "task": "caption", "image": "img/a.png", "target": "x"}) + "\n"
                    + json.dumps({"id": "2", "task": "caption", "caption": "typo"}) + "\n")
    report = LoadReport()
    [ex] = load_jsonl(path, on_error="skip", report=report)
    assert ex["image"] == str(tmp_path / "img" / "a.png") and ex["box"] is None
    assert "row 2, field 'caption': unknown field" in report.errors[0]


def test_convert_coco_round_trips_through_jsonl(tmp_path):
    anns = [{"id": 10, "image_id": 1, "caption": "A cat."}, {"id": 11, "image_id": 2, "caption": ""}]
    source = write_json(tmp_path / "captions.json", {"images": COCO_IMAGES, "annotations": anns})
    out = tmp_path / "out" / "coco.jsonl"
    argv = ["--format", "coco_captions", "--input", str(source), "--images", str(tmp_path / "out" / "img"),
            "--output", str(out), "--quiet"]
    assert convert.main(argv) == 1 and not out.exists()
    assert convert.main(argv + ["--on-error", "skip"]) == 0
    assert json.loads(out.read_text())["image"] == "img/a.jpg"
    expected = list(load_coco_captions(source, tmp_path / "out" / "img", on_error="skip"))
    assert list(load_jsonl(out)) == expected


def test_convert_tsv_writes_images_next_to_jsonl(tmp_path):
    source = write_lines(tmp_path / "ref.tsv", [[2, 11, "the box", "1,1,7,5", png_b64()]])
    out = tmp_path / "ref.jsonl"
    assert convert.main(["--format", "ofa_tsv", "--layout", "refcoco", "--input", str(source),
                         "--output", str(out), "--quiet"]) == 0
    [back], [original] = load_jsonl(out), load_ofa_tsv(source, "refcoco")
    assert back["image"] == str(tmp_path / "ref_images" / "00000000.png")
    assert {**back, "image": None} == {**original, "image": None}
    assert Image.open(back["image"]).tobytes() == original["image"].tobytes()
