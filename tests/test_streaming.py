"""Streaming real data (`ofa_ufo.data.streaming`, `StreamSource`): lazy readers of OFA TSV, JSON Lines,
WebDataset tar shards and `datasets` (streaming too); each consumer's share exactly once; epochs
reshuffled; the mixture's quotas; exact resume through a checkpoint; bad input named or skipped.

Expected ids are written down from how the files are made (record i holds id "r<i>"), never read back
from the code under test."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from ofa_ufo.data.canonical import DataError
from ofa_ufo.data.loaders import LoadReport, load_ofa_tsv
from ofa_ufo.data.sources import DataSourceError
from ofa_ufo.data.streaming import RecordStream, StreamDataset, hf_shard, open_shards, stream_examples
from ofa_ufo.training import Trainer
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.mixture import Mixture, StreamSource, build_sources


def png_bytes(shade: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def tsv_line(i: int, image: str | None = None) -> str:
    """OFA caption TSV: uniq-id, image-id, caption, predicted objects, image (base64)."""
    image = image if image is not None else base64.b64encode(png_bytes(i % 256)).decode()
    return f"r{i}\timg{i}\ta shape number {i}\tobj\t{image}"


def write_tsv(path: Path, ids: range, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    path.write_text("".join(tsv_line(i, bad.get(i)) + "\n" for i in ids))
    return path


def write_jsonl(path: Path, ids: range, task: str = "vqa") -> Path:
    (path.parent / "img.png").write_bytes(png_bytes(10, 16))
    rows = [{"id": f"r{i}", "task": task, "image": "img.png", "text": f"what is {i}?", "target": f"a{i}"}
            for i in ids]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_tar(path: Path, ids: range) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in ids:
            for name, data in ((f"r{i}.json", json.dumps({"task": "caption", "target": f"cap {i}"}).encode()),
                               (f"r{i}.png", png_bytes(i, 12))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def ids_of(examples) -> list[str]:
    return [example["id"] for example in examples]


# ---- readers ---------------------------------------------------------------------------------------

def test_tsv_stream_matches_the_eager_loader_and_decodes_lazily(tmp_path):
    path = write_tsv(tmp_path / "cap.tsv", range(6), bad={4: "!!notbase64!!"})
    shard = open_shards(path, "caption")[0]
    raw = list(RecordStream([shard]).records(epochs=1))  # reading alone decodes no image: the bad row passes
    assert [row for _, _, row, _ in raw] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataError, match=r"cap\.tsv, row 5, field 'image'.*base64"):
        shard.example(raw[4][3], raw[4][2])
    streamed = list(stream_examples(path, "caption", on_error="skip"))
    eager = list(load_ofa_tsv(path, "caption", on_error="skip"))
    assert ids_of(streamed) == ids_of(eager) == ["r0", "r1", "r2", "r3", "r5"]
    assert streamed[2]["target"] == "a shape number 2" and streamed[2]["image"].size == (8, 8)


def test_tsv_bad_base64_names_file_and_row_or_is_skipped_and_counted(tmp_path, caplog):
    path = write_tsv(tmp_path / "cap.tsv", range(5), bad={2: "@@@"})
    with pytest.raises(DataError, match=r"cap\.tsv, row 3, field 'image'"):
        list(stream_examples(path, "caption"))
    report = LoadReport()
    kept = list(stream_examples(path, "caption", on_error="skip", report=report))
    assert ids_of(kept) == ["r0", "r1", "r3", "r4"]
    assert (report.loaded, report.skipped) == (4, 1) and "row 3" in report.errors[0]
    assert "skipped" in caplog.text and "row 3" in caplog.text


def test_webdataset_tar_samples(tmp_path):
    path = write_tar(tmp_path / "shard-000.tar", range(3))
    examples = list(stream_examples(path))
    assert ids_of(examples) == ["r0", "r1", "r2"]
    assert [e["target"] for e in examples] == ["cap 0", "cap 1", "cap 2"]
    assert examples[1]["image"].size == (12, 12) and examples[1]["image"].getpixel((0, 0)) == (1, 254, 0)


def test_truncated_tar_shard_names_file_and_record(tmp_path):
    path = write_tar(tmp_path / "shard-000.tar", range(4))
    data = path.read_bytes()
    path.write_bytes(data[: 512 * 9 + 100])  # 2 whole samples (2 x 2 files x 2 blocks), then into the 3rd
    with pytest.raises(DataError, match=r"shard-000\.tar, row 3") as error:
        list(stream_examples(path))
    assert "truncated" in str(error.value)
    report = LoadReport()
    assert ids_of(stream_examples(path, on_error="skip", report=report)) == ["r0", "r1"]
    assert report.skipped == 1


def test_folder_with_no_usable_file(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing to train on")
    with pytest.raises(DataError, match=rf"{tmp_path}.*no usable data file.*\.jsonl"):
        open_shards(tmp_path, "caption")
    config = config_from_dict(dict(model_overrides=dict(TINY), tasks={"caption": 1}, data={"caption": str(tmp_path)},
                                   batch_size=2, eval_examples=0, output_dir=str(tmp_path / "out")), "test")
    with pytest.raises(DataSourceError, match=rf"task 'caption'.*{tmp_path}.*no usable data file"):
        build_sources(config)


def test_hf_datasets_streaming(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": f"what {i}?", "a": f"ans{i}", "key": f"r{i}"}) + "\n" for i in range(10)))
    dataset = datasets.load_dataset("json", data_files=str(rows), split="train", streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    shard = hf_shard(dataset, "vqa", {"text": "q", "target": "a"}, id_column="key")
    halves = [ids_of(stream_examples([shard], rank=r, world=2, worker=0, workers=1)) for r in range(2)]
    assert halves == [[f"r{i}" for i in range(0, 10, 2)], [f"r{i}" for i in range(1, 10, 2)]]


# ---- sharding and epochs ---------------------------------------------------------------------------

def test_two_ranks_two_workers_read_each_record_once(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", range(100))
    shares = [ids_of(stream_examples(path, rank=r, world=2, worker=w, workers=2)) for r in range(2) for w in range(2)]
    seen = [i for share in shares for i in share]
    assert sorted(seen) == sorted(f"r{i}" for i in range(100)) and len(seen) == 100
    assert all(len(share) == 25 for share in shares)


def test_whole_shards_per_consumer_when_there_are_enough(tmp_path):
    for s in range(8):
        write_tsv(tmp_path / f"part-{s}.tsv", range(s * 10, s * 10 + 10))
    shares = [ids_of(stream_examples(tmp_path, "caption", rank=r, world=2, worker=w, workers=2))
              for r in range(2) for w in range(2)]
    assert sorted(i for share in shares for i in share) == sorted(f"r{i}" for i in range(80))
    for share in shares:  # two whole files each
        assert len(share) == 20 and len({int(i[1:]) // 10 for i in share}) == 2


def test_dataloader_workers_split_the_stream(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", range(40))
    shares = [sorted(torch.utils.data.DataLoader(StreamDataset(path, rank=rank, world=2), batch_size=None,
                                                 num_workers=2, collate_fn=lambda e: e["id"])) for rank in range(2)]
    # rank r's workers are consumers 2r and 2r + 1 of 4: records i with i % 4 in (2r, 2r + 1)
    assert shares[1] == sorted(f"r{i}" for i in range(40) if i % 4 in (2, 3))
    assert sorted(shares[0] + shares[1]) == sorted(f"r{i}" for i in range(40))


def test_epochs_reshuffle_the_shard_order_and_cover_every_record(tmp_path):
    for s in range(6):
        write_jsonl(tmp_path / f"p{s}.jsonl", range(s * 3, s * 3 + 3))
    stream = RecordStream(open_shards(tmp_path), seed=3)
    assert sorted(stream.shards_of(0)) == sorted(stream.shards_of(1)) == list(range(6))
    assert any(stream.shards_of(0) != stream.shards_of(e) for e in range(1, 4))
    ids = ids_of(stream_examples(tmp_path, seed=3, epochs=2))
    assert sorted(ids[:18]) == sorted(ids[18:]) == sorted(f"r{i}" for i in range(18))


# ---- the mixture -----------------------------------------------------------------------------------

def test_mixture_quotas_and_ranks_over_streams(tmp_path):
    caption = open_shards(write_tsv(tmp_path / "cap.tsv", range(100)), "caption")
    vqa = open_shards(write_jsonl(tmp_path / "vqa.jsonl", range(100)))
    seen = []
    for rank in range(2):
        sources = {"caption": StreamSource("caption", caption, 0, rank, 2), "vqa": StreamSource("vqa", vqa, 0, rank, 2)}
        mixture = Mixture(sources, {"caption": 3, "vqa": 1}, rank, 2)
        for step in range(2):
            batch = mixture.micro_batch(step, 0, 1)
            assert [e is not None for e in batch] == [i % 2 == rank for i in range(4)]
            seen += [(e["task"], e["id"]) for e in batch[rank::2]]
    captions = sorted(i for t, i in seen if t == "caption")
    # 3 caption slots a step: rank 0 holds 2 (its records 0, 2, 4, 6...), rank 1 holds 1 (records 1, 3...)
    assert captions == sorted(["r0", "r2", "r4", "r6", "r1", "r3"])
    assert sorted(i for t, i in seen if t == "vqa") == ["r1", "r3"]  # the 4th slot is rank 1's


def test_skipped_record_is_stood_in_for_by_the_next(tmp_path):
    shards = open_shards(write_tsv(tmp_path / "cap.tsv", range(6), bad={1: "%%"}), "caption")
    source = StreamSource("caption", shards, 0, on_error="skip")
    assert [source.draw(k)["id"] for k in range(4)] == ["r0", "r2", "r2", "r3"]
    assert source.report.skipped == 1
    with pytest.raises(DataError, match="row 2"):
        StreamSource("caption", shards, 0).draw(1)


def test_restored_position_continues_with_the_next_record(tmp_path):
    for s in range(3):
        write_jsonl(tmp_path / f"p{s}.jsonl", range(s * 5, s * 5 + 5))
    shards = open_shards(tmp_path)
    whole = StreamSource("vqa", shards, seed=1)
    expected = [whole.draw(k)["id"] for k in range(23)]  # into the second epoch
    first = StreamSource("vqa", shards, seed=1)
    state = first.position(17)
    assert state["epoch"] == 1 and state["draws"] == 17
    reads = []
    for shard in shards:  # count the raw records read from here on
        shard.records = (lambda inner: lambda: (reads.append(1) or item for item in inner()))(shard.records)
    resumed = StreamSource("vqa", shards, seed=1)
    resumed.restore(state)
    assert [resumed.draw(k)["id"] for k in range(17, 23)] == expected[17:]
    assert len(reads) <= 8  # sought to the position: 6 draws (and a look ahead), not 23 records re-read


# ---- the trainer: exact resume ---------------------------------------------------------------------

def stream_config(tmp_path: Path, output: str, **fields):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        for s in range(2):
            write_tsv(data / f"cap-{s}.tsv", range(s * 7, s * 7 + 7))
        write_jsonl(data / "vqa.jsonl", range(100, 109))  # ids apart from the captions' r0-r13
    base = dict(model_overrides=dict(TINY), tasks={"caption": 2, "vqa": 1}, batch_size=3, max_steps=4, save_every=2,
                eval_examples=0, log_every=1, num_threads=1, output_dir=str(tmp_path / output), streaming=True,
                data={"caption": str(data) + "/cap-*.tsv", "vqa": str(data / "vqa.jsonl")})
    return config_from_dict({**base, **fields}, "test")


def run_recording(config) -> list[list[str]]:
    """Train `config` (resuming if it can) and return the example ids of each step it trained."""
    trainer, steps = Trainer(config), []
    inner = trainer._micro_batches

    def recorded():
        batches = inner()
        steps.append([e["id"] for _, examples in batches for e in examples])
        return batches

    trainer._micro_batches = recorded
    trainer.fit()
    return steps


def test_resume_sees_the_examples_of_an_uninterrupted_run(tmp_path):
    straight = run_recording(stream_config(tmp_path, "straight"))
    assert len(straight) == 4 and all(len(ids) == 3 for ids in straight)
    cut = stream_config(tmp_path, "cut")
    first = run_recording(cut)
    last = ckpt.list_checkpoints(cut.output_dir)[-1]
    assert last.name.endswith("4")
    shutil.rmtree(last)  # as if killed after step 2's checkpoint
    resumed = run_recording(cut)
    assert first[:2] + resumed == straight
    assert len(resumed) == 2
    state = torch.load(ckpt.list_checkpoints(cut.output_dir)[0] / ckpt.STATE_FILE, weights_only=True)
    # after 2 steps of quotas caption 2, vqa 1: draws 4 and 2, in the first file of each, epoch 0
    assert state["streams"] == [{"caption": {"draws": 4, "epoch": 0, "shard": 0, "record": 4},
                                 "vqa": {"draws": 2, "epoch": 0, "shard": 0, "record": 2}}]


def test_data_workers_draw_the_same_stream(tmp_path):
    inline = run_recording(stream_config(tmp_path, "inline", max_steps=3, save_every=0))
    workers = run_recording(stream_config(tmp_path, "workers", max_steps=3, save_every=0, data_workers=2))
    assert workers == inline and len({i for ids in inline for i in ids}) == 9  # 3 steps x 3 distinct examples


# ---- OFA's whole pretraining mixture on the shipped samples ------------------------------------------

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "pretrain"
ALL_KINDS = {"caption", "vqa", "itm", "grounding", "grounded_caption", "detection", "image_infill", "text_infill",
             "classification"}


def test_ten_steps_on_every_kind_of_the_pretraining_mixture(tmp_path, monkeypatch):
    import ofa_ufo
    from ofa_ufo.training import load_config

    monkeypatch.setenv("OFA_PRETRAIN_DATA", str(SAMPLES))
    vqgan = tmp_path / "vqgan"
    torch.manual_seed(0)
    ofa_ufo.create_vqgan("vqgan_tiny").save_pretrained(vqgan)
    config = load_config(SAMPLES / "mixture.yaml", [f"output_dir={tmp_path / 'out'}", f"vqgan={vqgan}",
                                                    f"model_overrides={json.dumps(dict(TINY))}", "num_threads=1"])
    assert set(config.tasks) == ALL_KINDS
    steps = run_recording(config)
    assert len(steps) == 10
    for ids in steps:  # every step holds every kind: caption and vqa twice (weight 2), the others once
        kinds = sorted(i.split("-")[0].split(".")[0] for i in ids)
        assert kinds == sorted(["cap", "cap", "vqa", "vqa", "itm", "ref", "grounded_caption", "detection",
                                "image_infill", "text_infill", "classification"])
    losses = json.loads((tmp_path / "out" / "metrics.json").read_text())["losses"]
    assert len(losses) == 10 and all(np.isfinite(losses))


@pytest.mark.xdist_group("processes")  # two processes of their own: one such test at a time
def test_two_processes_each_read_their_share(tmp_path):
    """torchrun, 2 CPU processes (gloo): each saves its own stream positions, written down from the rules."""
    config = stream_config(tmp_path, "ddp", tasks={"caption": 3, "vqa": 1}, batch_size=4, max_steps=2, save_every=0)
    path = tmp_path / "ddp.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(SAMPLES.parents[2]), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ofa_ufo.training", "--config", str(path), "--resume", "never"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = torch.load(ckpt.list_checkpoints(config.output_dir)[-1] / ckpt.STATE_FILE, weights_only=True)
    # slots 0-2 caption, 3 vqa: rank 0 holds slots 0 and 2, rank 1 slots 1 and 3. Two caption files for two
    # ranks: each owns one file; one vqa file: rank 0 reads its records 0, 2, 4..., rank 1 records 1, 3, 5...
    assert state["streams"] == [
        {"caption": {"draws": 4, "epoch": 0, "shard": 0, "record": 4}, "vqa": {"draws": 0, "epoch": 0, "shard": 0,
                                                                               "record": 0}},
        {"caption": {"draws": 2, "epoch": 0, "shard": 0, "record": 2}, "vqa": {"draws": 2, "epoch": 0, "shard": 0,
                                                                               "record": 5}}]


@pytest.mark.parametrize("kind", ["ofa_tsv", "hf"])
def test_a_spec_with_streaming_true_is_streamed(tmp_path, kind):
    if kind == "ofa_tsv":  # OFA's VQA TSV: question-id, image-id, question, conf|!+answer, objects, image
        (tmp_path / "vqa.tsv").write_text("".join(f"r{i}\timg\twhat is {i}?\t1.0|!+a{i}\tobj\t"
                                                  f"{base64.b64encode(png_bytes(i)).decode()}\n" for i in range(6)))
        data = {"format": "ofa_tsv", "input": str(tmp_path / "vqa.tsv"), "layout": "vqa"}
    else:
        pytest.importorskip("datasets")
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"q": f"what is {i}?", "a": f"a{i}", "key": f"r{i}"}) + "\n"
                                for i in range(6)))
        data = {"format": "hf", "input": str(rows), "task": "vqa", "columns": "text=q,target=a", "id_column": "key"}
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "streamed_vqa", "task": "vqa", "metric": "vqa_accuracy",
                                "data": {**data, "train": {"streaming": True}}}))
    config = config_from_dict(dict(model_overrides=dict(TINY), tasks={"vqa": 1}, data={"vqa": str(spec)}, batch_size=2,
                                   eval_examples=0, output_dir=str(tmp_path / "out")), "test")
    source = build_sources(config)["vqa"]
    assert isinstance(source, StreamSource)
    # one shard, so every epoch the same order
    assert [source.draw(k)["id"] for k in range(8)] == [f"r{i}" for i in range(6)] + ["r0", "r1"]
    assert source.draw(3)["target"] == "a3"
