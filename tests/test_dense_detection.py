"""The dense detector inside OFA-UFO (issue 32): the `dense_head` config entry, the model's dense path
(`detect_dense`, the `dense_targets` forward), the `dense_detection` task through the pipeline, and the
trainer mixing it with generative detection (3 steps, resume, EMA, grad_accum, eval, loss weight).

Tiny models (d_model 32, 64 px images, the tiny dense preset) on generated demo scenes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, tiny_model
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, pipeline

import ofa_ufo
from ofa_ufo.tasks import get_task
from ofa_ufo.training import ConfigError, Trainer
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.task_heads import source_class_names

LABELS = ["red circle", "blue square", "green star"]
HEAD = {"preset": "tiny", "labels": LABELS}
# a step whose update is sensitive to the loss's scale (AdamW eps 1, no clipping, no decay), one thread
EXACT = dict(lr=0.05, eps=1.0, clip_norm=0.0, weight_decay=0.0, warmup_ratio=0.0, num_threads=1,
             freeze_batchnorm=True)


@pytest.fixture(scope="module")
def dense_model():
    return tiny_model(dense_head=HEAD)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, dense_model, processor):
    path = tmp_path_factory.mktemp("dense_ckpt")
    dense_model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(dense_dir):
    return pipeline("ofa-ufo", model=str(dense_dir))


def _threads():
    """Runs set num_threads=1; tests give the process its count back."""
    return torch.get_num_threads()


# ---- config and model --------------------------------------------------------------------


def test_dense_head_is_saved_in_config_json_and_round_trips(dense_model, dense_dir):
    saved = json.loads((dense_dir / "config.json").read_text())
    assert saved["dense_head"] == HEAD
    assert "| dense detection head | DAMO-YOLO tiny, 3 classes |" in (dense_dir / "README.md").read_text()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(dense_dir).eval()
    assert loaded.config.dense_head == HEAD and loaded.dense_head is not None
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = dense_model.detect_dense(pixels), loaded.detect_dense(pixels)
    assert torch.equal(ours.cls_logits, theirs.cls_logits) and torch.equal(ours.box_logits, theirs.box_logits)


@pytest.mark.parametrize("entry, message", [
    ({"preset": "huge", "labels": LABELS}, r"preset must be one of \['medium', 'small', 'tiny'\], got 'huge'"),
    ({"preset": "tiny", "labels": []}, "dense_head labels must be a non-empty list of class names"),
    ({"preset": "tiny"}, "dense_head labels must be a non-empty list"),
    ({"preset": "tiny", "labels": ["a", "a"]}, "dense_head labels must be distinct"),
    ({"preset": "tiny", "labels": LABELS, "classes": 3}, r"unknown key\(s\) \['classes'\]"),
])
def test_bad_dense_head_entries_name_the_problem(entry, message):
    with pytest.raises(ValueError, match=message):
        ofa_ufo.create_model("ofa_ufo_tiny", **TINY, dense_head=entry)


def test_the_head_leaves_the_generative_path_and_old_checkpoints_alone(model, dense_model, tiny_checkpoint):
    """Same seed with and without a head: identical weights outside it and identical logits (the head is
    built and initialised after the rest); a checkpoint saved without one loads without one."""
    plain = AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint).eval()
    assert plain.config.dense_head is None and plain.dense_head is None
    assert not any(k.startswith("dense_head.") for k in plain.state_dict())
    heads = {k for k in dense_model.state_dict() if k.startswith("dense_head.")}
    assert heads and set(dense_model.state_dict()) - heads == set(model.state_dict())
    ids = torch.tensor([[0, 100, 200, 2]])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels, decoder_input_ids=ids).logits
        b = dense_model(input_ids=ids, pixel_values=pixels, decoder_input_ids=ids).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"has no dense detection head .* dense_head=\{'preset': 'tiny'"):
        model.detect_dense(pixels)


def test_anchors_cover_strides_8_16_32(dense_model):
    """A 64 px image: 8 x 8 + 4 x 4 + 2 x 2 = 84 anchor points, one distribution of 17 bins per box edge."""
    with torch.no_grad():
        output = dense_model.detect_dense(torch.zeros(2, 3, 64, 64))
    assert output.cls_logits.shape == (2, 84, 3) and output.box_logits.shape == (2, 84, 4, 17)
    assert output.strides.tolist() == [8.0] * 64 + [16.0] * 16 + [32.0] * 4


def test_a_routed_supernet_routes_the_dense_rows_as_dense_detection():
    model = ofa_ufo.create_model("ofa_ufo_tiny_ufo", **TINY, dense_head=HEAD,
                                 vision_config={"supernet_dim": 32, "supernet_heads": 2, "supernet_layers": 1,
                                                "supernet_elastic_heads": None, "supernet_elastic_depths": None,
                                                "supernet_elastic_mlp_ratios": None}).eval()
    route = model.config.vision_config.route_id("dense_detection")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        default = model.detect_dense(pixels).cls_logits
        same = model.detect_dense(pixels, torch.tensor([route])).cls_logits
        other = model.detect_dense(pixels, torch.tensor([model.config.vision_config.route_id("caption")])).cls_logits
    assert torch.equal(default, same) and not torch.equal(default, other)
    assert model.dense_head.in_channels == (512, 32)  # ResNet stage 2, the supernet's width


def test_dense_targets_forward_returns_the_head_losses(dense_model):
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = dense_model(pixel_values=torch.randn(2, 3, 64, 64), dense_targets=targets)
    assert set(losses) == {"loss", "qfl", "dfl", "giou", "neck_features"} and torch.isfinite(losses["loss"])
    assert losses["loss"].requires_grad
    # the neck's three levels (strides 8, 16, 32 of 64 px), for distillation
    assert [tuple(f.shape) for f in losses["neck_features"]] == [(2, 16, 8, 8), (2, 16, 4, 4), (2, 24, 2, 2)]


# ---- the task through the pipeline -------------------------------------------------------


def test_boxes_come_back_in_original_pixels():
    """Model-input (64 x 64) boxes on a 128 x 32 original: x doubles, y halves; clipped to the image;
    a box that rounds to no area is dropped; best score first."""
    task = get_task("dense_detection")
    raw = {"boxes": torch.tensor([[8.0, 16.0, 32.0, 64.0], [40.0, 0.0, 80.0, 70.0], [10.0, 10.0, 10.001, 20.0]]),
           "scores": torch.tensor([0.5, 0.9, 0.7]), "labels": ["red circle", "blue square", "green star"]}
    result = task.postprocess(raw, None, {"original_size": (128, 32), "input_size": (64, 64)})
    assert result == {"boxes": [[80.0, 0.0, 128.0, 32.0], [16.0, 8.0, 64.0, 32.0]],
                      "labels": ["blue square", "red circle"], "scores": pytest.approx([0.9, 0.5])}


def test_pipeline_detects_with_the_detection_schema(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    result = pipe(image, task="dense_detection", score_threshold=0.0, nms_iou=1.0, max_detections=7)
    assert set(result) == {"boxes", "labels", "scores"} and len(result["boxes"]) == 7  # NMS at 1.0 keeps all
    assert len(pipe(image, task="dense_detection", score_threshold=0.0)["boxes"]) <= 100
    assert set(result["labels"]) <= set(LABELS) and result["scores"] == sorted(result["scores"], reverse=True)
    assert all(0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48 for x0, y0, x1, y1 in result["boxes"])
    only = pipe(image, task="dense_detection", score_threshold=0.0, labels=["green star"])
    assert only["labels"] and set(only["labels"]) == {"green star"}


def test_batched_calls_give_the_single_results(pipe):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]
    single = [pipe(image, task="dense_detection", score_threshold=0.0, nms_iou=1.0, max_detections=4)
              for image in images]
    batched = pipe(images, task="dense_detection", score_threshold=0.0, nms_iou=1.0, max_detections=4, batch_size=2)
    assert [r["labels"] for r in batched] == [r["labels"] for r in single]
    for a, b in zip(batched, single):
        assert np.allclose(a["boxes"], b["boxes"], atol=0.02) and np.allclose(a["scores"], b["scores"], atol=1e-5)


def test_an_image_without_objects_gives_empty_lists(pipe):
    """An untrained head scores every class at its 0.01 prior, under the default threshold 0.05."""
    result = pipe(Image.new("RGB", (64, 64), (128, 128, 128)), task="dense_detection")
    assert result == {"boxes": [], "labels": [], "scores": []}


@pytest.mark.parametrize("options, error, message", [
    (dict(score_threshold=1.5), ValueError, r"score_threshold must be in the range \[0, 1\], got 1.5"),
    (dict(score_threshold=-0.1), ValueError, r"score_threshold must be in the range \[0, 1\]"),
    (dict(nms_iou="high"), TypeError, r"nms_iou must be a number in the range \[0, 1\]"),
    (dict(max_detections=0), ValueError, "max_detections must be a positive integer"),
    (dict(labels=["a", "b", "c", "d"]), ValueError, "labels lists 4 classes but the dense head was trained for 3"),
    (dict(labels=["dog"]), ValueError, r"labels \['dog'\] are not classes of the dense head"),
    (dict(num_beams=3), ValueError, r"generation option\(s\) \['num_beams'\] do not apply"),
])
def test_bad_calls_name_the_problem(pipe, options, error, message):
    with pytest.raises(error, match=message):
        pipe(Image.new("RGB", (32, 32)), task="dense_detection", **options)


def test_a_model_without_a_dense_head_says_how_to_get_one(tiny_checkpoint):
    plain = pipeline("ofa-ufo", model=str(tiny_checkpoint))
    with pytest.raises(ValueError, match=r"needs a model with a dense head.*dense_head=.*train task dense_detection"):
        plain(Image.new("RGB", (32, 32)), task="dense_detection")


# ---- training ------------------------------------------------------------------------------


def make_config(output_dir: Path, **fields):
    base = dict(model_overrides=dict(TINY), tasks={"detection": 1, "dense_detection": 1}, batch_size=4,
                max_steps=3, eval_examples=0, demo_train_scenes=64, log_every=1, num_threads=1,
                output_dir=str(output_dir))
    return config_from_dict({**base, **fields}, "test")


def fit(config, resume="never", hook=None):
    threads = _threads()
    try:
        trainer = Trainer(config, resume=resume)
        if hook is not None:
            hook(trainer)
        return trainer, trainer.fit()
    finally:
        torch.set_num_threads(threads)


def test_mixed_run_trains_the_head_through_the_wrapped_forward_and_resumes(tmp_path):
    """detection + dense_detection in one batch: the head's class list is the demo vocabulary, its loss goes
    through the (accelerate-prepared) model's forward, it moves, and a resumed run repeats the losses."""
    fields = dict(save_every=1, keep_last=3, **EXACT)
    calls, before = [], {}

    def hook(trainer):
        before.update({k: v.clone() for k, v in trainer.unwrapped.dense_head.state_dict().items()})
        trainer.model.register_forward_pre_hook(lambda m, a, kw: calls.append("dense_targets" in kw), with_kwargs=True)

    trainer, reference = fit(make_config(tmp_path / "reference", **fields), hook=hook)
    head = trainer.unwrapped.config.dense_head
    assert head["preset"] == "small" and len(head["labels"]) == 48 and "red circle" in head["labels"]
    assert calls.count(True) == 3 and calls.count(False) == 3  # per step: one token pass, one dense pass
    after = trainer.unwrapped.dense_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(reference.losses)) and len(reference.losses) == 3
    exported = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert exported["dense_head"] == head
    first = ckpt.checkpoint_dir(tmp_path / "reference") / "step-0000001"
    _, resumed = fit(make_config(tmp_path / "resumed", **fields), resume=str(first))
    assert resumed.losses == reference.losses


@pytest.mark.xdist_group("processes")  # two processes of their own: one such test at a time
def test_two_processes_train_the_mixed_batch(tmp_path):
    """Data parallel: each process holds a detection row and a dense row, whose two forward/backward pairs
    (the first under no_sync) give one synchronised update; the dense loss's normaliser is per process
    (QFL over the process's positives), so the losses are those of a run of its own, not of one process."""
    config = make_config(tmp_path / "ddp", **EXACT)
    overrides = [f"{key}={json.dumps(value)}" for key, value in yaml.safe_load(config.to_yaml()).items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ofa_ufo.training", "--resume", "never", *overrides]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["losses"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] != losses[-1]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["dense_head"]["preset"] == "small"


def test_dense_loss_weight_scales_the_dense_loss(tmp_path):
    """A dense-only step: the reported loss is weight x the head's mean loss (linear in the weight), and
    at weight 0 the head gets no update."""
    first, moved = {}, {}
    for weight in (0.0, 1.0, 2.0):
        config = make_config(tmp_path / str(weight), tasks={"dense_detection": 1}, max_steps=1,
                             dense_loss_weight=weight, **EXACT)
        threads = _threads()
        try:
            trainer = Trainer(config, resume="never")
            head = trainer.unwrapped.dense_head.head.cls[0].weight.detach().clone()
            first[weight] = trainer.train_step()
        finally:
            torch.set_num_threads(threads)
        moved[weight] = not torch.equal(head, trainer.unwrapped.dense_head.head.cls[0].weight)
    assert first[0.0] == 0.0 and first[2.0] == pytest.approx(2 * first[1.0], rel=1e-5) and first[1.0] > 0
    assert moved == {0.0: False, 1.0: True, 2.0: True}


def test_ema_grad_accum_and_eval_with_the_dense_task(tmp_path):
    config = make_config(tmp_path / "run", max_steps=2, grad_accum=2, ema_decay=0.5, eval_examples=3)
    trainer, result = fit(config)
    assert set(result.metrics_after["dense_detection"]) >= {"map", "map50"}
    assert set(result.metrics_after["detection"]) >= {"map", "map50"}
    exported = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    ema = trainer.ema.module.dense_head.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in exported.dense_head.state_dict().items())  # the EMA's head


def test_dense_head_config_field_needs_the_dense_task_and_a_preset(tmp_path):
    with pytest.raises(ConfigError, match="field 'dense_head' applies to dense_detection examples"):
        make_config(tmp_path, tasks={"detection": 1}, dense_head="tiny")
    with pytest.raises(ConfigError, match=r"field 'dense_head' must be one of the dense presets \['medium', 'small'"):
        make_config(tmp_path, dense_head="large")


def test_class_names_come_from_the_data():
    class Listed:
        examples = [{"labels": ["zebra", "cat"]}, {"labels": []}, {"labels": ["cat", "ant"]}]

    assert source_class_names(Listed()) == ["ant", "cat", "zebra"]
