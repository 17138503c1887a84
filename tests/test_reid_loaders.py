"""ReID / face / product loaders on tiny generated trees (8x8 JPEGs), their bad inputs, the
convert command for each format, and the P x K identity sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ofa_ufo.data import DataError, LoadReport, convert
from ofa_ufo.data.loaders import (
    load_identity_folder, load_lfw_pairs, load_market1501, load_msmt17, load_sop, load_veri776,
)
from ofa_ufo.tasks.pk_sampler import pk_batches


def jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path, format="JPEG")
    return path


def tree(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        for name in names:
            jpeg(root / folder / name)
    return root


def raises_named(call, *parts) -> DataError:
    with pytest.raises(DataError) as info:
        list(call())
    for part in parts:
        assert part in str(info.value), str(info.value)
    return info.value


def summary(examples) -> list[tuple]:
    return [(e["id"], e["meta"]["identity"], e["meta"].get("camera"), e["meta"].get("split")) for e in examples]


# --- Market-1501 -----------------------------------------------------------------------------------

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_077419_06.jpg"],
    "query": ["0007_c1s1_001051_00.jpg"],
    "bounding_box_test": ["0007_c2s1_000976_01.jpg", "0000_c1s1_000016_03.jpg", "-1_c1s1_000401_03.jpg", "Thumbs.db"],
}


def test_market1501_identities_cameras_splits(tmp_path):
    root = tree(tmp_path / "Market-1501", MARKET)
    examples = list(load_market1501(root))
    assert summary(examples) == [
        ("train/0002_c1s1_000451_03.jpg", 2, 1, "train"), ("train/0002_c2s1_000301_01.jpg", 2, 2, "train"),
        ("train/0007_c3s3_077419_06.jpg", 7, 3, "train"), ("query/0007_c1s1_001051_00.jpg", 7, 1, "query"),
        ("gallery/0000_c1s1_000016_03.jpg", 0, 1, "gallery"),  # distractor kept, junk (-1) left out
        ("gallery/0007_c2s1_000976_01.jpg", 7, 2, "gallery"),
    ]
    assert {e["task"] for e in examples} == {"reid_person"} and examples[0]["meta"]["dataset"] == "market1501"
    assert Path(examples[0]["image"]).is_file() and Path(examples[0]["image"]).is_absolute()
    assert json.loads(json.dumps(examples[0]["meta"])) == examples[0]["meta"]
    gallery = list(load_market1501(root, splits=["gallery"], keep_junk=True))
    assert [e["meta"]["identity"] for e in gallery] == [-1, 0, 7]


def test_market1501_bad_name_missing_folder_and_skip(tmp_path):
    root = tree(tmp_path / "m", MARKET)
    jpeg(root / "query" / "frame_0001.jpg")
    error = raises_named(lambda: load_market1501(root, splits="query"), "frame_0001.jpg", "field 'file name'",
                         "<identity>_c<camera>", "0002_c1s1_000451_03.jpg")
    assert error.source.endswith("query/frame_0001.jpg")
    report = LoadReport()
    assert len(list(load_market1501(root, splits="query", on_error="skip", report=report))) == 1
    assert (report.loaded, report.skipped) == (1, 1)
    with pytest.raises(DataError, match=r"bounding_box_train, field 'folder': missing; a market1501 root holds "
                                        r"bounding_box_train/, query/, bounding_box_test/"):
        load_market1501(tmp_path / "empty")  # checked when called, before iterating
    with pytest.raises(ValueError, match="splits must be drawn from"):
        load_market1501(root, splits=["test"])


# --- VeRi-776 --------------------------------------------------------------------------------------

def test_veri776(tmp_path):
    root = tree(tmp_path / "VeRi", {
        "image_train": ["0001_c001_00016450_0.jpg"], "image_query": ["0002_c002_00030600_0.jpg"],
        "image_test": ["0002_c003_00084120_1.jpg", "0005_c011_00003035_0.jpg"],
    })
    examples = list(load_veri776(root))
    assert summary(examples) == [
        ("train/0001_c001_00016450_0.jpg", 1, 1, "train"), ("query/0002_c002_00030600_0.jpg", 2, 2, "query"),
        ("gallery/0002_c003_00084120_1.jpg", 2, 3, "gallery"), ("gallery/0005_c011_00003035_0.jpg", 5, 11, "gallery"),
    ]
    assert {e["task"] for e in examples} == {"reid_vehicle"}
    jpeg(root / "image_test" / "car.jpg")
    raises_named(lambda: load_veri776(root), "car.jpg", "0001_c001_00016450_0.jpg")
    raises_named(lambda: load_veri776(tmp_path / "nowhere"), "image_train", "missing")


# --- MSMT17 ----------------------------------------------------------------------------------------

def msmt_tree(root: Path) -> Path:
    tree(root, {"train/0000": ["0000_000_01_0303morning_0015_0.jpg"], "train/0001": ["0001_003_07_0303noon_0102_1.jpg"],
                "test/0000": ["0000_000_05_0303morning_0008_0.jpg", "0000_002_02_0303afternoon_0104_0.jpg"]})
    (root / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
    (root / "list_val.txt").write_text("0001/0001_003_07_0303noon_0102_1.jpg 1\n")
    (root / "list_query.txt").write_text("0000/0000_000_05_0303morning_0008_0.jpg 0\n")
    (root / "list_gallery.txt").write_text("0000/0000_002_02_0303afternoon_0104_0.jpg\n")  # identity from the folder
    return root


def test_msmt17_lists(tmp_path):
    root = msmt_tree(tmp_path / "MSMT17_V1")
    examples = list(load_msmt17(root))
    assert summary(examples) == [
        ("train/0000/0000_000_01_0303morning_0015_0.jpg", 0, 1, "train"),
        ("train/0001/0001_003_07_0303noon_0102_1.jpg", 1, 7, "train"),  # list_val.txt joins training
        ("query/0000/0000_000_05_0303morning_0008_0.jpg", 0, 5, "query"),
        ("gallery/0000/0000_002_02_0303afternoon_0104_0.jpg", 0, 2, "gallery"),
    ]
    assert all(Path(e["image"]).is_file() for e in examples)
    assert examples[2]["image"].endswith("test/0000/0000_000_05_0303morning_0008_0.jpg")
    (root / "test").rename(root / "mask_test_v2")  # MSMT17_V2 folder names
    assert Path(next(load_msmt17(root, splits=["query"]))["image"]).is_file()


def test_msmt17_errors(tmp_path):
    root = msmt_tree(tmp_path / "msmt")
    (root / "list_query.txt").write_text("0000/0000_000_05_0303morning_0008_0.jpg 0\n0000/bad.jpg 0\na b c\n")
    raises_named(lambda: load_msmt17(root, ["query"]), "list_query.txt, row 2, field 'file name'", "'bad.jpg'",
                 "<identity>_<index>_<camera>_", "0000_000_01_0303morning_0015_0.jpg")
    report = LoadReport()
    assert len(list(load_msmt17(root, ["query"], on_error="skip", report=report))) == 1
    assert report.skipped == 2 and "row 3, field '<line>'" in report.errors[1]
    (root / "list_gallery.txt").unlink()
    raises_named(lambda: load_msmt17(root, ["gallery"]), "list_gallery.txt", "missing")
    raises_named(lambda: load_msmt17(tmp_path / "none", ["train"]), "train, field 'folder'", "mask_train_v2")


# --- LFW pairs.txt ---------------------------------------------------------------------------------

def lfw_tree(root: Path) -> Path:
    for name, count in {"Abel_Pacheco": 2, "Akhmed_Zakayev": 1, "Alan_Ball": 1}.items():
        for number in range(1, count + 1):
            jpeg(root / "lfw" / name / f"{name}_{number:04d}.jpg")
    return root


def test_lfw_pairs_two_folds(tmp_path):
    root = lfw_tree(tmp_path)
    pairs = root / "pairs.txt"
    pairs.write_text("2\t1\nAbel_Pacheco\t1\t2\nAkhmed_Zakayev\t1\tAlan_Ball\t1\n"
                     "Abel_Pacheco\t2\t1\nAlan_Ball\t1\tAbel_Pacheco\t2\n")
    examples = list(load_lfw_pairs(pairs, root / "lfw"))
    assert len(examples) == 8 and {e["task"] for e in examples} == {"face"}
    assert [(e["id"], e["meta"]["same"], e["meta"]["fold"]) for e in examples[::2]] == [
        ("pair0/0", True, 0), ("pair1/0", False, 0), ("pair2/0", True, 1), ("pair3/0", False, 1)]
    assert examples[3]["meta"] == {"dataset": "lfw", "identity": "Alan_Ball", "pair": 1, "side": 1, "same": False,
                                   "fold": 0}
    assert examples[3]["image"].endswith("lfw/Alan_Ball/Alan_Ball_0001.jpg")
    assert all(Path(e["image"]).is_file() for e in examples)


def test_lfw_pairs_bad_lines_header_and_count(tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 2\nA 1 2\nA 1 B 2\nC 1 D 2\nE 1 F 2\n")  # line 3: a different-person line among same ones
    raises_named(lambda: load_lfw_pairs(pairs, tmp_path), "pairs.txt, row 3, field '<line>'",
                 "same-person line 'name n1 n2'", "first 2 lines of each fold")
    report = LoadReport()
    kept = list(load_lfw_pairs(pairs, tmp_path, on_error="skip", report=report))
    assert len(kept) == 6 and report.skipped == 1  # one bad line = one skip; its pair index stays unused
    assert [e["meta"]["pair"] for e in kept[::2]] == [0, 2, 3]
    pairs.write_text("ten 300\nA 1 2\n")
    raises_named(lambda: load_lfw_pairs(pairs, tmp_path), "row 1, field '<header>'", "'10 300'")
    pairs.write_text("1 1\nA 1 2\n")
    raises_named(lambda: load_lfw_pairs(pairs, tmp_path, on_error="skip"), "field '<file>'",
                 "announces 1 x 2 pair lines, found 1")
    pairs.write_text("1 1\nA 1 x\nA 1 B 2\n")
    raises_named(lambda: load_lfw_pairs(pairs, tmp_path), "row 2", "got 'A 1 x'")


# --- Stanford Online Products ----------------------------------------------------------------------

def test_sop(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    for name in ("bicycle_final/111085122871_0.JPG", "bicycle_final/111085122871_1.JPG", "chair_final/1_0.JPG"):
        jpeg(root / name)
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                        "1 1 1 bicycle_final/111085122871_0.JPG\n"
                                        "2 1 1 bicycle_final/111085122871_1.JPG\n3 2 2 chair_final/1_0.JPG\n")
    examples = list(load_sop(root / "Ebay_test.txt"))
    assert [(e["id"], e["meta"]["identity"], e["meta"]["super_class"], e["meta"]["split"]) for e in examples] == [
        ("1", 1, 1, "test"), ("2", 1, 1, "test"), ("3", 2, 2, "test")]
    assert {e["task"] for e in examples} == {"product"} and all(Path(e["image"]).is_file() for e in examples)
    assert next(load_sop(root / "Ebay_test.txt", tmp_path, split="val"))["meta"]["split"] == "val"
    bad = tmp_path / "Ebay_train.txt"
    bad.write_text("image_id class_id super_class_id path\n1 1 x a.JPG\n2 1 1 b.JPG\n")
    raises_named(lambda: load_sop(bad), "Ebay_train.txt, row 2, field '<line>'", "three integers and a path")
    report = LoadReport()
    [kept] = load_sop(bad, on_error="skip", report=report)
    assert kept["meta"]["split"] == "train" and report.skipped == 1
    bad.write_text("1 1 1 a.JPG\n")
    raises_named(lambda: load_sop(bad), "row 1, field '<header>'", "image_id class_id super_class_id path")


# --- one folder per identity -----------------------------------------------------------------------

IDENTITIES = {"m.0002": ["b.jpg", "a.PNG", "notes.txt"], "m.0001": ["x.jpeg"], "empty": []}


def identity_tree(root: Path) -> Path:
    tree(root, {name: [f for f in files if not f.endswith(".txt")] for name, files in IDENTITIES.items()})
    (root / "empty").mkdir(exist_ok=True)
    (root / "m.0002" / "notes.txt").write_text("not an image")
    jpeg(root / "loose.jpg")  # a file directly in root belongs to no identity
    return root


def test_identity_folder_ids_meta_and_order(tmp_path):
    root = identity_tree(tmp_path / "faces_train")
    examples = list(load_identity_folder(root, "face"))
    assert summary(examples) == [("m.0001/x.jpeg", "m.0001", None, "train"),  # folders, then files, sorted
                                 ("m.0002/a.PNG", "m.0002", None, "train"), ("m.0002/b.jpg", "m.0002", None, "train")]
    assert examples[0]["meta"] == {"dataset": "faces_train", "identity": "m.0001", "split": "train"}
    assert {e["task"] for e in examples} == {"face"}
    assert all(Path(e["image"]).is_file() and Path(e["image"]).is_absolute() for e in examples)
    assert examples[2]["image"] == str((root / "m.0002" / "b.jpg").absolute())
    vehicles = list(load_identity_folder(root, "reid_vehicle", dataset="veri_wild"))
    assert {(e["task"], e["meta"]["dataset"]) for e in vehicles} == {("reid_vehicle", "veri_wild")}


def test_identity_folder_errors_and_on_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_identity_folder(missing, "face")  # checked when called, before iterating
    assert str(missing) in str(info.value) and "<root>/<identity>/<image>" in str(info.value)
    root = identity_tree(tmp_path / "ids")
    with pytest.raises(ValueError, match=r"task must be one of \['reid_person', 'reid_vehicle', 'face', 'product'\], "
                                         r"got 'caption'"):
        load_identity_folder(root, "caption")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_identity_folder(root, "face", on_error="ignore")
    report = LoadReport()
    assert len(list(load_identity_folder(root, "product", on_error="skip", report=report))) == 3
    assert (report.loaded, report.skipped) == (3, 0) and report.source == str(root)


# --- convert: every format from the command line ---------------------------------------------------

def test_convert_every_reid_format(tmp_path, capsys):
    market = tree(tmp_path / "market", MARKET)
    veri = tree(tmp_path / "veri", {"image_train": ["0001_c001_00016450_0.jpg"], "image_query": ["0002_c1_1.jpg"],
                                     "image_test": ["0002_c002_00016450_0.jpg"]})
    msmt = msmt_tree(tmp_path / "msmt")
    lfw = lfw_tree(tmp_path / "faces")
    (lfw / "pairs.txt").write_text("1\nAbel_Pacheco 1 2\nAkhmed_Zakayev 1 Alan_Ball 1\n")
    sop = tmp_path / "sop"
    jpeg(sop / "a" / "1.JPG")
    (sop / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 4 2 a/1.JPG\n")
    runs = {
        "market1501": (["--input", str(market), "--split", "query,gallery"], 3),
        "veri776": (["--input", str(veri)], 3),
        "msmt17": (["--input", str(msmt)], 4),
        "lfw_pairs": (["--input", str(lfw / "pairs.txt"), "--images", str(lfw / "lfw")], 4),
        "sop": (["--input", str(sop / "Ebay_test.txt")], 1),
        "identity_folder": (["--input", str(identity_tree(tmp_path / "ms1m")), "--task", "face"], 3),
    }
    for name, (args, count) in runs.items():
        output = tmp_path / "out" / f"{name}.jsonl"
        assert convert.main(["--format", name, *args, "--output", str(output), "--quiet"]) == 0, name
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(lines) == count and all(Path(line["image"]).is_file() for line in lines), name
    from ofa_ufo.data import load_jsonl
    back = list(load_jsonl(tmp_path / "out" / "lfw_pairs.jsonl"))
    assert back[0]["meta"] == {"dataset": "lfw", "identity": "Abel_Pacheco", "pair": 0, "side": 0, "same": True,
                               "fold": 0}
    faces = [json.loads(line) for line in (tmp_path / "out" / "identity_folder.jsonl").read_text().splitlines()]
    assert [(f["id"], f["task"], f["meta"]) for f in faces[:1]] == [
        ("m.0001/x.jpeg", "face", {"dataset": "ms1m", "identity": "m.0001", "split": "train"})]
    assert convert.main(["--format", "identity_folder", "--input", str(tmp_path / "ms1m"),
                         "--output", str(tmp_path / "x.jsonl"), "--quiet"]) == 1
    assert "convert: --format identity_folder needs --task (the embedding task" in capsys.readouterr().err
    assert convert.main(["--format", "identity_folder", "--input", str(tmp_path / "nope"), "--task", "face",
                         "--output", str(tmp_path / "x.jsonl"), "--quiet"]) == 1
    assert convert.main(["--format", "identity_folder", "--input", str(tmp_path / "ms1m"), "--task", "caption",
                         "--output", str(tmp_path / "x.jsonl"), "--quiet"]) == 1  # not an embedding task
    assert "task must be one of" in capsys.readouterr().err
    jpeg(market / "query" / "oops.jpg")
    assert convert.main(["--format", "market1501", "--input", str(market), "--output", str(tmp_path / "x.jsonl"),
                         "--quiet"]) == 1
    assert convert.main(["--format", "market1501", "--input", str(tmp_path / "nope"),
                         "--output", str(tmp_path / "x.jsonl"), "--quiet"]) == 1


# --- P x K sampler ---------------------------------------------------------------------------------

def test_pk_batches_shape_identities_and_determinism():
    identities = [i // 6 for i in range(6 * 10)] + [10] * 2 + [11]  # ten with 6 images, one with 2, one with 1
    batches = pk_batches(identities, p=4, k=3, seed=0, epoch=0)
    assert batches == pk_batches(identities, p=4, k=3, seed=0, epoch=0)
    assert batches != pk_batches(identities, p=4, k=3, seed=0, epoch=1)
    assert batches != pk_batches(identities, p=4, k=3, seed=1, epoch=0)
    for batch in batches:
        assert len(batch) == 12
        groups = [batch[i:i + 3] for i in range(0, 12, 3)]
        assert all(len({identities[j] for j in group}) == 1 for group in groups)  # K images of one identity
        assert len({identities[group[0]] for group in groups}) == 4  # P distinct identities
    # 10 x 2 chunks of the 6-image identities + 1 topped-up chunk each for ids 10 and 11 = 22 chunks:
    # 5 batches of 4 use 20 of them; fewer than P identities are left for a sixth.
    assert len(batches) == 5
    seen = Counter(i for batch in batches for i in batch)
    assert all(count == 1 for index, count in seen.items() if identities[index] < 10)  # no repeats when n >= k


def test_pk_batches_small_identities_are_sampled_with_replacement():
    identities = ["a", "b", "b", "c", "c", "c"]
    for epoch in range(5):
        batches = pk_batches(identities, p=3, k=3, seed=2, epoch=epoch)
        assert len(batches) == 1
        by_identity = {identities[batch[0]]: batch for batch in (batches[0][i:i + 3] for i in range(0, 9, 3))}
        assert by_identity["a"] == [0, 0, 0]  # a single image fills all K slots
        assert set(by_identity["b"]) <= {1, 2} and sorted(by_identity["c"]) == [3, 4, 5]
    with pytest.raises(ValueError, match="needs at least p=4 identities, found 3"):
        pk_batches(identities, p=4, k=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="p and k must be >= 1"):
        pk_batches(identities, p=2, k=0, seed=0, epoch=0)
