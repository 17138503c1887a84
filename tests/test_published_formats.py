"""The data sets as distributed: RefCOCO/+/g refs pickles beside instances.json, Karpathy's
dataset_coco.json, VQA v2's training answers as the 3,129-answer vocabulary of the decoding trie.

Every fixture is written by hand in the published layout (the refs pickle is `pickle.dumps` of
hand-written dicts, or Python-2 protocol-2 bytes assembled opcode by opcode); expected values
(counts per split, converted boxes, vocabulary order) are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
from PIL import Image

from conftest import RunsCode
from ofa_ufo.data import DataError
from ofa_ufo.data import convert
from ofa_ufo.data.loaders import (
    VQA_ANSWER_VOCABULARY_SIZE, build_answer_vocabulary, load_coco_karpathy, load_refcoco, read_answer_vocabulary,
    read_pickle, write_answer_vocabulary,
)
from ofa_ufo.data.sources import DataSourceError, answer_vocabulary, decoding_options, open_examples
from ofa_ufo.data.specs import load_spec
from ofa_ufo.evaluate import evaluate

# ---- RefCOCO / RefCOCO+ / RefCOCOg ---------------------------------------------------------------

INSTANCES = {
    "images": [
        {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "width": 640, "height": 480},
        {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "width": 500, "height": 375},
    ],
    "annotations": [  # COCO bbox [x, y, w, h]
        {"id": 100, "image_id": 11, "bbox": [10, 20, 30, 40], "category_id": 1, "area": 1200, "iscrowd": 0},
        {"id": 101, "image_id": 11, "bbox": [0.5, 1.25, 100, 50.5], "category_id": 2, "area": 5050, "iscrowd": 0},
        {"id": 102, "image_id": 12, "bbox": [200, 100, 50, 25], "category_id": 1, "area": 1250, "iscrowd": 0},
        {"id": 103, "image_id": 12, "bbox": [0, 0, 500, 375], "category_id": 2, "area": 187500, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 2, "name": "dog", "supercategory": "animal"}],
}
# the same boxes as [x0, y0, x1, y1] = [x, y, x + w, y + h]
BOXES = {100: [10.0, 20.0, 40.0, 60.0], 101: [0.5, 1.25, 100.5, 51.75], 102: [200.0, 100.0, 250.0, 125.0],
         103: [0.0, 0.0, 500.0, 375.0]}


def sentence(sent_id: int, text: str) -> dict:
    return {"tokens": text.split(), "raw": text.capitalize(), "sent": text, "sent_id": sent_id}


def ref(ref_id: int, ann_id: int, image_id: int, split: str, *sentences: dict) -> dict:
    """One ref with the published fields of refs(unc).p."""
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sentences": list(sentences),
            "sent_ids": [s["sent_id"] for s in sentences]}


REFS = [
    ref(0, 100, 11, "train", sentence(1000, "man on the left"), sentence(1001, "left guy")),
    ref(1, 101, 11, "val", sentence(1002, "brown dog")),
    ref(2, 102, 12, "testA", sentence(1003, "woman in red")),
    ref(3, 103, 12, "testB", sentence(1004, "the big dog"), sentence(1005, "dog")),
]
UMD_REFS = [
    ref(0, 100, 11, "train", sentence(2000, "a man standing on the left")),
    ref(1, 101, 11, "val", sentence(2001, "a brown dog lying down")),
    ref(2, 103, 12, "test", sentence(2002, "a large dog filling the picture"), sentence(2003, "the dog")),
]


@pytest.fixture
def refcoco_root(tmp_path, monkeypatch) -> Path:
    """$REFCOCO_ROOT as distributed: refcoco/, refcoco+/ (refs(unc).p) and refcocog/ (refs(umd).p),
    each beside its instances.json; $COCO_ROOT/train2014 holds the images."""
    root = tmp_path / "refer"
    for folder, name, refs in (("refcoco", "refs(unc).p", REFS), ("refcoco+", "refs(unc).p", REFS),
                               ("refcocog", "refs(umd).p", UMD_REFS)):
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_bytes(pickle.dumps(refs))
        (root / folder / "instances.json").write_text(json.dumps(INSTANCES))
    monkeypatch.setenv("REFCOCO_ROOT", str(root))
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    return root


def test_refcoco_pickle_loads_each_split_with_boxes_from_instances(refcoco_root, tmp_path):
    refs = refcoco_root / "refcoco" / "refs(unc).p"
    instances, images = refcoco_root / "refcoco" / "instances.json", tmp_path / "coco" / "train2014"
    counts = {split: len(list(load_refcoco(refs, instances, images, split=split)))
              for split in ("train", "val", "testA", "testB")}
    assert counts == {"train": 2, "val": 1, "testA": 1, "testB": 2}  # one example per sentence
    examples = list(load_refcoco(refs, instances, images))
    assert [(e["id"], e["text"], e["box"]) for e in examples] == [
        ("1000", "man on the left", BOXES[100]), ("1001", "left guy", BOXES[100]),
        ("1002", "brown dog", BOXES[101]), ("1003", "woman in red", BOXES[102]),
        ("1004", "the big dog", BOXES[103]), ("1005", "dog", BOXES[103])]
    assert examples[0]["image"] == str(images / "COCO_train2014_000000000011.jpg")
    assert examples[0]["meta"] == {"ref_id": 0, "ann_id": 100, "image_id": 11, "split": "train"}
    assert {e["task"] for e in examples} == {"grounding"}


@pytest.mark.parametrize("name, splits", [("refcoco", {"val": 1, "train": 2}), ("refcocoplus", {"val": 1, "train": 2}),
                                          ("refcocog", {"val": 1, "train": 1})])
def test_shipped_refcoco_specs_read_the_distributed_pickles(name, splits, refcoco_root):
    spec = load_spec(name)
    assert spec.data["input"].endswith("refs(umd).p" if name == "refcocog" else "refs(unc).p")
    val, train = list(open_examples(spec.data, "grounding")), list(open_examples(spec.data, "grounding", "train"))
    assert {"val": len(val), "train": len(train)} == splits
    assert val[0]["box"] == BOXES[101] and train[0]["box"] == BOXES[100]


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{**REFS[0], "sentences": RunsCode(str(marker))}]))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(INSTANCES))
    with pytest.raises(DataError) as info:
        list(load_refcoco(refs, instances, tmp_path))
    message = str(info.value)
    assert str(refs) in message and "refused to unpickle" in message and "system" in message, message
    assert not marker.exists()
    data = {"format": "refcoco", "input": str(refs), "annotations": str(instances), "images": str(tmp_path)}
    with pytest.raises(DataError, match="refused to unpickle"):
        list(open_examples(data, "grounding"))
    assert not marker.exists()
    refs.write_bytes(pickle.dumps(REFS)[:-20])  # truncated: not readable, and said so
    with pytest.raises(DataError, match=r"refs\(unc\).p, field '<file>': not a readable pickle"):
        read_pickle(refs)


def py2_pickle(value) -> bytes:
    """What Python 2's cPickle.dumps(value, 2) writes for str/unicode/int/float/list/dict: str as
    SHORT_BINSTRING bytes (U), unicode as BINUNICODE (X), containers memoised with BINPUT (q)."""
    memo = iter(range(256))

    def body(v) -> bytes:
        if isinstance(v, bytes):  # a Python 2 str
            return b"U" + bytes([len(v)]) + v
        if isinstance(v, str):  # a Python 2 unicode
            data = v.encode("utf-8")
            return b"X" + struct.pack("<I", len(data)) + data
        if isinstance(v, int):
            return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)
        if isinstance(v, float):
            return b"G" + struct.pack(">d", v)
        if isinstance(v, list):
            head = b"]q" + bytes([next(memo)])
            return head + (b"(" + b"".join(body(item) for item in v) + b"e" if v else b"")
        head = b"}q" + bytes([next(memo)])
        return head + (b"(" + b"".join(body(k) + body(x) for k, x in v.items()) + b"u" if v else b"")

    return b"\x80\x02" + body(value) + b"."


def test_a_python2_protocol2_pickle_decodes(tmp_path):
    py2_ref = {b"ref_id": 7, b"ann_id": 102, b"image_id": 12, b"split": b"val", b"category_id": 1,
               b"file_name": b"COCO_train2014_000000000012_102.jpg", b"sent_ids": [70, 71],
               b"sentences": [{b"tokens": [b"caf\xc3\xa9", b"sign"], b"raw": b"Caf\xc3\xa9 sign",
                               b"sent": b"caf\xc3\xa9 sign", b"sent_id": 70},
                              {b"tokens": [b"woman"], b"raw": "Woman \u00e0 droite", b"sent": b"woman",
                               b"sent_id": 71}]}
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(py2_pickle([py2_ref]))
    assert pickle.loads(refs.read_bytes(), encoding="bytes")[0][b"sentences"][1][b"raw"] == "Woman \u00e0 droite"
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(INSTANCES))
    examples = list(load_refcoco(refs, instances, tmp_path, split="val"))
    assert [(e["id"], e["text"], e["box"]) for e in examples] == [("70", "café sign", BOXES[102]),
                                                                  ("71", "woman", BOXES[102])]
    assert read_pickle(refs)[0]["sentences"][1]["raw"] == "Woman \u00e0 droite"


def test_the_json_export_still_loads(tmp_path):
    refs, instances = tmp_path / "refs.json", tmp_path / "instances.json"
    refs.write_text(json.dumps(REFS))
    instances.write_text(json.dumps(INSTANCES))
    assert [e["id"] for e in load_refcoco(refs, instances, tmp_path, split="testB")] == ["1004", "1005"]


# ---- COCO captions, Karpathy split -----------------------------------------------------------

def karpathy_image(imgid: int, cocoid: int, split: str, folder: str, *raws: str) -> dict:
    sentids = [10 * imgid + k for k in range(len(raws))]
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": imgid, "split": split,
            "sentids": sentids, "cocoid": cocoid,
            "sentences": [{"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": sid}
                          for raw, sid in zip(raws, sentids)]}


FIVE = ("A man riding a horse.", "a person on a horse ", "Horse and rider in a field.", "A rider.", "a brown horse")
KARPATHY = {"images": [
    karpathy_image(0, 391895, "test", "val2014", *FIVE),
    karpathy_image(1, 522418, "test", "val2014", "A woman cutting a cake.", "cake", "a knife", "a kitchen", "food"),
    karpathy_image(2, 184613, "val", "val2014", "a boy", "a child", "a kid", "a cow", "cows"),
    karpathy_image(3, 318219, "train", "train2014", "one", "two", "three", "four", "five"),
    karpathy_image(4, 554625, "train", "train2014", "a", "b", "c", "d", "e", "f"),  # six captions
    karpathy_image(5, 397133, "restval", "val2014", "v", "w", "x", "y", "z"),
], "dataset": "coco"}


@pytest.fixture
def karpathy_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "coco" / "annotations" / "dataset_coco.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(KARPATHY))
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    return path


def test_karpathy_splits_units_and_references(karpathy_file, tmp_path):
    root = tmp_path / "coco"
    test = list(load_coco_karpathy(karpathy_file, root))  # default: the test split, one example per image
    assert [(e["id"], e["target"]) for e in test] == [("391895", "A man riding a horse."),
                                                      ("522418", "A woman cutting a cake.")]
    assert test[0]["references"] == ["A man riding a horse.", "a person on a horse", "Horse and rider in a field.",
                                     "A rider.", "a brown horse"]
    assert test[0]["image"] == str(root / "val2014" / "COCO_val2014_000000391895.jpg")
    assert test[0]["meta"] == {"image_id": 391895, "split": "test"}
    assert len(list(load_coco_karpathy(karpathy_file, root, split="val"))) == 1
    train = list(load_coco_karpathy(karpathy_file, root, split="train", per="caption"))
    assert len(train) == 5 + 6 and train[0]["image"] == str(root / "train2014" / "COCO_train2014_000000318219.jpg")
    assert [(e["id"], e["target"]) for e in train[:2]] == [("30", "one"), ("31", "two")]
    assert train[0]["references"] == ["one", "two", "three", "four", "five"]
    ofa_train = list(load_coco_karpathy(karpathy_file, root, split="train,restval", per="caption"))
    assert len(ofa_train) == 5 + 6 + 5 and {e["meta"]["split"] for e in ofa_train} == {"train", "restval"}
    assert len(list(load_coco_karpathy(karpathy_file, root, split=["train", "restval"]))) == 3  # images
    with pytest.raises(ValueError, match=r"Karpathy split must be one or more of \['train', 'restval', 'val', "):
        load_coco_karpathy(karpathy_file, root, split="testA")


def test_the_coco_caption_spec_evaluates_on_test_and_trains_on_train_restval(karpathy_file):
    spec = load_spec("coco_caption")
    assert spec.data["format"] == "coco_karpathy"
    evaluated = list(open_examples(spec.data, "caption"))
    assert [e["id"] for e in evaluated] == ["391895", "522418"] and all(len(e["references"]) == 5 for e in evaluated)
    trained = list(open_examples(spec.data, "caption", "train"))
    assert len(trained) == 16 and len({e["id"] for e in trained}) == 16  # every caption of train + restval
    with pytest.raises(DataSourceError, match=r"format 'coco_karpathy' option 'per' must be one of \['image', "):
        open_examples({**spec.data, "per": "sentence"}, "caption")
    with pytest.raises(DataSourceError, match=r"format 'coco_karpathy' option 'split': Karpathy split must be"):
        open_examples({**spec.data, "split": "test,dev"}, "caption")


# ---- VQA v2: the answer vocabulary and the trie over it --------------------------------------------

# multiple_choice_answer of each training question; after the VQA normalisation
# "Yes" -> "yes", "two" -> "2", "the dog" -> "dog", "Red." -> "red", so the counts are
# yes 5, 2 3, no 3, dog 2, red 2, blue 1 and the ranking (ties alphabetical) is:
TRAIN_ANSWERS = ["yes"] * 4 + ["Yes"] + ["no"] * 3 + ["2", "2", "two"] + ["red", "Red."] + ["the dog", "dog", "blue"]
RANKED = ["yes", "2", "no", "dog", "red", "blue"]


def vqa_files(folder: Path, subtype: str, answers: list[str]) -> tuple[Path, Path]:
    """A VQA v2 questions file and annotations file (10 human answers per question)."""
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                 "license": {}, "questions": [{"image_id": 1 + i % 2, "question": f"what is it {i}?",
                                               "question_id": 100 + i} for i in range(len(answers))]}
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {}, "annotations": [
        {"question_id": 100 + i, "image_id": 1 + i % 2, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": a,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
        for i, a in enumerate(answers)]}
    qpath = folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    apath = folder / f"v2_mscoco_{subtype}_annotations.json"
    qpath.write_text(json.dumps(questions))
    apath.write_text(json.dumps(annotations))
    return qpath, apath


@pytest.fixture
def vqa_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "vqa"
    root.mkdir()
    vqa_files(root, "train2014", TRAIN_ANSWERS)
    vqa_files(root, "val2014", ["blue", "yes", "cat"])
    for split in ("train2014", "val2014"):
        (tmp_path / "coco" / split).mkdir(parents=True)
        for image_id, color in ((1, "red"), (2, "blue")):
            Image.new("RGB", (32, 24), color).save(tmp_path / "coco" / split / f"COCO_{split}_{image_id:012d}.jpg")
    monkeypatch.setenv("VQA_ROOT", str(root))
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    return root


def test_answer_vocabulary_ranks_normalised_training_answers(vqa_root, tmp_path):
    annotations = vqa_root / "v2_mscoco_train2014_annotations.json"
    assert VQA_ANSWER_VOCABULARY_SIZE == 3129
    assert build_answer_vocabulary(annotations) == RANKED  # fewer answers than 3,129: all of them
    assert build_answer_vocabulary(annotations, 3) == ["yes", "2", "no"]
    with pytest.raises(ValueError, match="positive integer"):
        build_answer_vocabulary(annotations, 0)
    written = tmp_path / "answers.json"
    write_answer_vocabulary(RANKED[:4], written)
    assert json.loads(written.read_text()) == ["yes", "2", "no", "dog"]
    assert read_answer_vocabulary(written) == RANKED[:4]
    ans2label = tmp_path / "trainval_ans2label.pkl"  # OFA's artefact: {answer: label}
    ans2label.write_bytes(pickle.dumps({"no": 1, "yes": 0, "red": 2}))
    assert read_answer_vocabulary(ans2label) == ["yes", "no", "red"]
    (tmp_path / "bad.json").write_text('{"answers": "yes"}')
    with pytest.raises(DataError, match=r"bad.json, field '<file>': expected a non-empty list of answers"):
        read_answer_vocabulary(tmp_path / "bad.json")


def test_the_vqav2_spec_names_the_top_3129_answers(vqa_root, tmp_path):
    spec = load_spec("vqav2")
    assert spec.data["answers"] == "top3129"
    assert answer_vocabulary(spec.data) == RANKED  # counted from data.train.annotations, not the val answers
    assert decoding_options({**spec.data, "answers": "top2"}) == {"candidates": ["yes", "2"]}
    write_answer_vocabulary(["no", "yes"], tmp_path / "answers.json")
    assert decoding_options({**spec.data, "answers": str(tmp_path / "answers.json")}) == {"candidates": ["no", "yes"]}
    assert decoding_options({k: v for k, v in spec.data.items() if k != "answers"}) == {}
    with pytest.raises(DataSourceError, match=r"format 'vqa_v2' option 'answers': .*nowhere.json does not exist"):
        answer_vocabulary({**spec.data, "answers": str(tmp_path / "nowhere.json")})
    with pytest.raises(DataSourceError, match=r"format 'coco_karpathy' option 'answers': top5 counts the answers"):
        answer_vocabulary({"format": "coco_karpathy", "answers": "top5"})
    with pytest.raises(DataSourceError, match=r"option 'answers': top5 needs the training annotations"):
        answer_vocabulary({"format": "vqa_v2", "answers": "top5"})


def test_convert_writes_the_answer_vocabulary(vqa_root, tmp_path):
    questions, annotations = vqa_root / "v2_OpenEnded_mscoco_train2014_questions.json", \
        vqa_root / "v2_mscoco_train2014_annotations.json"
    answers = tmp_path / "answers_top4.json"
    assert convert.main(["--format", "vqa_v2", "--input", str(questions), "--annotations", str(annotations),
                         "--images", str(tmp_path / "coco" / "train2014"), "--output", str(tmp_path / "train.jsonl"),
                         "--answers", "top4", "--answers-output", str(answers), "--quiet"]) == 0
    assert json.loads(answers.read_text()) == ["yes", "2", "no", "dog"]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == len(TRAIN_ANSWERS)


def test_evaluation_decodes_only_vocabulary_answers(vqa_root, tmp_path, tiny_checkpoint):
    """A tiny random model, asked through the spec's trie, answers only from the vocabulary."""
    spec_path = tmp_path / "vqa_top4.yaml"
    spec = load_spec("vqav2")
    data = {**spec.data, "answers": "top4"}
    spec_path.write_text(json.dumps({"name": "vqa_top4", "task": "vqa", "data": data, "metric": "vqa_accuracy",
                                     "generation": {"num_beams": 4, "top_k": 3}}))
    output = tmp_path / "predictions.json"
    evaluate(load_spec(spec_path), str(tiny_checkpoint), output=str(output))
    written = json.loads(output.read_text())
    predictions, vocabulary = written["predictions"], ["yes", "2", "no", "dog"]
    assert len(predictions) == 3 and 0.0 <= written["scores"]["vqa_accuracy"] <= 1.0
    for prediction in predictions:
        assert "error" not in prediction, prediction
        assert prediction["text"] in vocabulary and prediction["top_k"], prediction
        assert {answer["text"] for answer in prediction["top_k"]} <= set(vocabulary), prediction
