"""The dense detector deployed (issue 32, items 3-4): extracted into a standalone transformers object detector,
fused, saved, served by `pipeline("object-detection")`, exported to ONNX.

A tiny routed supernet model (d_model 32, 64 px, tiny dense preset) whose supernet, routers and BatchNorm
statistics are randomised, so that the task's route, the experts and the fusion all change the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_model
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

import ofa_ufo
from ofa_ufo.deploy.dense_detector import export_detector_onnx, measure_detector_latency
from ofa_ufo.layers.rep_conv import RepConv
from ofa_ufo.models.damo_yolo import decode_boxes

LABELS = ["red circle", "blue square", "green star"]
SUPERNET = dict(supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0)
SIZE = TINY["image_size"]


@torch.no_grad()
def _randomise(model) -> None:
    """Routers (the dense task takes its own expert in block 0 and the shared one in block 1), expert
    weights, and every BatchNorm's statistics and affine parameters of the dense head."""
    generator = torch.Generator().manual_seed(3)
    route = model.config.vision_config.route_id("dense_detection")
    for i, block in enumerate(model.get_encoder().supernet.blocks):
        block.ffn.router.copy_(torch.randn(block.ffn.router.shape, generator=generator))
        block.ffn.router[route] = torch.tensor([0.0, 1.0] if i == 0 else [1.0, 0.0])
        for weight in block.ffn.experts.parameters():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    for module in model.dense_head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.running_mean, module.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            for tensor in (module.running_var, module.weight):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def model():
    model = tiny_model(vision_config=SUPERNET, dense_head={"preset": "tiny", "labels": LABELS})
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, S, S)


def _extract(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routers set by hand count as "never trained" for extract_subnet's check
        return ofa_ufo.extract_dense_detector(model, **kwargs)


@pytest.fixture(scope="module")
def detector(model):
    return _extract(model)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, detector):
    path = tmp_path_factory.mktemp("detector")
    detector.save_pretrained(path)
    ofa_ufo.OFAUFODetectorImageProcessor(size=SIZE).save_pretrained(path)
    return path


# ---- extraction ----------------------------------------------------------------------------


def test_extracted_detector_equals_the_full_models_dense_path(model, detector, pixels):
    with torch.no_grad():
        full, ours = model.detect_dense(pixels), detector(pixels)
    torch.testing.assert_close(ours.logits, full.cls_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.box_logits, full.box_logits, atol=1e-5, rtol=0)
    expected = (decode_boxes(full) / SIZE).clamp(0, 1)  # xyxy of the 64 px input, normalised
    torch.testing.assert_close(ours.pred_boxes, expected, atol=1e-6, rtol=0)
    assert ours.logits.shape == (3, 8 * 8 + 4 * 4 + 2 * 2, len(LABELS))  # anchors of strides 8, 16, 32


def test_extraction_follows_the_task_route(model, pixels):
    """Another task's route through the supernet gives another detector: the route is really taken."""
    other = _extract(model, task="caption")
    with torch.no_grad():
        routed_as_caption = model.detect_dense(pixels, torch.full((3,), model.config.vision_config.route_id("caption")))
        ours = other(pixels)
    torch.testing.assert_close(ours.logits, routed_as_caption.cls_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.logits, model.detect_dense(pixels).cls_logits, atol=1e-3)


def test_detector_holds_no_text_parts_and_names_its_classes(model, detector):
    names = [name for name, _ in detector.named_parameters()]
    assert {name.split(".")[0] for name in names} == {"stem", "supernet", "dense_head"}
    assert not any(p.shape[0] == model.config.vocab_size for p in detector.parameters())  # no token table
    config = detector.config
    assert config.model_type == "ofa-ufo-detector" and config.id2label == dict(enumerate(LABELS))
    assert config.label2id == {"red circle": 0, "blue square": 1, "green star": 2}
    assert not config.vision_config.supernet_routed and config.vision_config.supernet_task == "dense_detection"


def test_a_model_without_dense_head_or_with_another_task_is_refused():
    with pytest.raises(ValueError, match="no dense detection head"):
        ofa_ufo.extract_dense_detector(tiny_model())
    subnet = tiny_model(vision_config={**SUPERNET, "supernet_routed": False, "supernet_task": "caption",
                                       "task_names": ["caption"]}, dense_head={"preset": "tiny", "labels": LABELS})
    with pytest.raises(ValueError, match="extracted for task 'caption', not 'dense_detection'"):
        ofa_ufo.extract_dense_detector(subnet)


def test_detector_config_rejects_a_routed_supernet():
    with pytest.raises(ValueError, match="must be a dense subnet"):
        ofa_ufo.OFAUFODetectorConfig(vision_config={**SUPERNET, "task_names": ["caption", "dense_detection"]},
                                     id2label={0: "a"})


# ---- save / load / fuse ----------------------------------------------------------------------


def test_save_and_load_with_auto_model_for_object_detection(detector, detector_dir, pixels):
    assert (detector_dir / "model.safetensors").is_file()
    loaded = AutoModelForObjectDetection.from_pretrained(detector_dir).eval()
    assert type(loaded) is ofa_ufo.OFAUFOForObjectDetection
    assert type(AutoImageProcessor.from_pretrained(detector_dir)) is ofa_ufo.OFAUFODetectorImageProcessor
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, detector(pixels).logits)


def test_fused_detector_equals_the_unfused_one_and_saves_fused(model, detector, pixels, tmp_path):
    fused = _extract(model, fuse=True)
    repconvs = [m for m in fused.modules() if isinstance(m, RepConv)]
    assert repconvs and all(m.fused is not None and m.dense is None for m in repconvs)
    with torch.no_grad():
        unfused_out, fused_out = detector(pixels), fused(pixels)
    torch.testing.assert_close(fused_out.logits, unfused_out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused_out.pred_boxes, unfused_out.pred_boxes, atol=1e-4, rtol=0)
    fused.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["fused"] is True
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert not any(".pointwise." in name for name in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, fused_out.logits)


# ---- post-processing and the object-detection pipeline --------------------------------------


def _outputs(logits, boxes):
    return {"logits": torch.tensor([logits]), "pred_boxes": torch.tensor([boxes])}


def test_post_process_thresholds_suppresses_per_class_and_scales_to_target_size():
    processor = ofa_ufo.OFAUFODetectorImageProcessor(size=SIZE)
    # four anchors, two classes; sigmoid(2) = 0.881, sigmoid(1) = 0.731, sigmoid(0) = 0.5, sigmoid(-3) = 0.047
    logits = [[2.0, -9.0], [1.0, -9.0], [-9.0, 0.0], [-3.0, -9.0]]
    boxes = [[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]
    (result,) = processor.post_process_object_detection(_outputs(logits, boxes), threshold=0.3,
                                                          target_sizes=[(100, 200)])
    # anchor 1 overlaps anchor 0 (same class, IoU 0.95) and goes; anchor 2 is class 1 and stays; anchor 3 is too weak
    assert result["labels"].tolist() == [0, 1]
    torch.testing.assert_close(result["scores"], torch.tensor([0.8808, 0.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(result["boxes"], torch.tensor([[20.0, 10.0, 100.0, 50.0]] * 2))
    (relative,) = processor.post_process_object_detection(_outputs(logits, boxes), threshold=0.6)
    torch.testing.assert_close(relative["boxes"], torch.tensor([[0.1, 0.1, 0.5, 0.5]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=1.5), r"threshold must be a number in the range \[0, 1\], got 1.5"),
    (dict(nms_iou=-0.1), r"nms_iou must be a number in the range \[0, 1\]"),
    (dict(target_sizes=[(10, 10), (20, 20)]), r"expected \(1, 2\), got \(2, 2\)"),
    (dict(max_detections=0), "max_detections must be a positive integer"),
])
def test_post_process_bad_arguments_name_the_problem(kwargs, message):
    processor = ofa_ufo.OFAUFODetectorImageProcessor(size=SIZE)
    with pytest.raises(ValueError, match=message):
        processor.post_process_object_detection(_outputs([[0.0]], [[0, 0, 1, 1]]), **kwargs)


def _image(height: int = 48, width: int = 80) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_object_detection_pipeline_agrees_with_the_dense_detection_task(model, detector_dir, tmp_path, processor):
    """The same detections as pipeline("ofa-ufo", task="dense_detection") of the full model (boxes in the
    original image's pixels, which transformers truncates to ints), labels from id2label."""
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pipeline("ofa-ufo", model=str(tmp_path))(_image(), task="dense_detection", score_threshold=0.2)
    detect = pipeline("object-detection", model=str(detector_dir))
    found = detect(_image(), threshold=0.2)
    batched = detect([_image(32, 32), _image()], threshold=0.2, batch_size=2)[1]  # batched: the same answer
    assert [(r["label"], r["box"]) for r in batched] == [(r["label"], r["box"]) for r in found]
    assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in found], abs=1e-5)
    assert found, "the randomised model should find something above 0.2"
    assert [r["label"] for r in found] == full["labels"]
    assert [r["score"] for r in found] == pytest.approx(full["scores"], abs=1e-5)
    boxes = [[r["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for r in found]
    assert np.abs(np.array(boxes) - np.array(full["boxes"])).max() <= 1  # ints vs 0.01 px
    assert all(0 <= b[0] <= b[2] <= 80 and 0 <= b[1] <= b[3] <= 48 for b in boxes)


def test_object_detection_pipeline_batches_and_returns_nothing_for_an_empty_scene(detector, tmp_path):
    blind = ofa_ufo.OFAUFOForObjectDetection(detector.config)
    blind.load_state_dict(detector.state_dict())
    with torch.no_grad():
        for conv in blind.dense_head.head.cls:
            conv.weight.zero_()
            conv.bias.fill_(-30.0)  # every class score 1e-13: a detector that sees no object in any scene
    blind.save_pretrained(tmp_path)
    ofa_ufo.OFAUFODetectorImageProcessor(size=SIZE).save_pretrained(tmp_path)
    pipe = pipeline("object-detection", model=str(tmp_path))
    assert pipe(_image(), threshold=1e-6) == []
    assert pipe([_image(), _image(32, 32)], batch_size=2) == [[], []]


# ---- ONNX and latency --------------------------------------------------------------------------


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(model, pixels, tmp_path):
    pytest.importorskip("onnxruntime")
    from ofa_ufo.deploy.dense_detector import OnnxDetector

    fused = _extract(model, fuse=True)
    export_detector_onnx(fused, tmp_path)
    manifest = json.loads((tmp_path / "onnx_manifest.json").read_text())
    assert manifest["outputs"] == ["logits", "pred_boxes"] and manifest["image_size"] == SIZE
    runner = OnnxDetector(tmp_path, threads=1)
    for batch in (pixels[:1], pixels):
        with torch.no_grad():
            expected = fused(batch)
        got = runner(batch)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, atol=1e-4, rtol=0)


def test_export_cli_writes_the_detector_graph(model, processor, detector_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from ofa_ufo.export import main

    model.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["--model", str(tmp_path / "full"), "--task", "dense_detection", "--output", str(tmp_path / "out")])
    assert code == 0 and "dense detector graph" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fused"] is True
    assert main(["--model", str(detector_dir), "--output", str(tmp_path / "again")]) == 0  # a detector directory
    assert json.loads((tmp_path / "again" / "onnx_manifest.json").read_text())["kind"] == "dense_detector"


def test_int8_export_with_calibration_images_quantises_the_convolutions(detector_dir, pixels, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    from ofa_ufo.deploy.dense_detector import OnnxDetector
    from ofa_ufo.export import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _image().save(photos / f"{i}.png")
    (photos / "notes.txt").write_text("not an image")
    assert main(["--model", str(detector_dir), "--output", str(tmp_path / "int8"), "--quantize", "int8",
                 "--calibration", str(photos)]) == 0
    assert json.loads((tmp_path / "int8" / "onnx_manifest.json").read_text())["calibration_images"] == 3
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(produced_by.get(n.input[0]) == produced_by.get(n.input[1]) == "DequantizeLinear"
                         for n in convs)  # int8 activations and weights (QDQ)
    assert main(["--model", str(detector_dir), "--output", str(tmp_path / "fp32")]) == 0
    int8, fp32 = OnnxDetector(tmp_path / "int8", threads=1)(pixels), OnnxDetector(tmp_path / "fp32", threads=1)(pixels)
    assert not torch.equal(int8.logits, fp32.logits)
    assert torch.corrcoef(torch.stack([int8.logits.flatten(), fp32.logits.flatten()]))[0, 1] > 0.9
    capsys.readouterr()
    assert main(["--model", str(detector_dir), "--output", str(tmp_path / "x"), "--calibration", str(photos)]) == 1
    assert "--calibration calibrates int8 convolutions" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--model", str(detector_dir), "--output", str(tmp_path / "x"), "--quantize", "int8",
                 "--calibration", str(empty)]) == 1
    assert "no images there" in capsys.readouterr().err


def test_latency_record_on_a_device_profile(detector):
    record = measure_detector_latency(detector, "cpu-fp32", batch_size=2, repeats=1, warmup=0)
    assert record.target == "cpu-fp32" and record.ms > 0 and record.device.startswith("CPU")
    with pytest.raises(ValueError, match="unknown target"):
        measure_detector_latency(detector, "tpu")


@pytest.mark.benchmark
def test_quick_benchmark_prints_every_table():
    """benchmarks/dense_detection.py --quick (under 2 minutes): the CPU line first, then every table's rows."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/dense_detection.py", "--quick"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("CPU: ")
    for row in ("| detection |", "| dense_detection |", "| dense_detection, extracted + fused",
                "| D-FINE (transformers) |",
                "| unfused | cpu-fp32 |", "| fused | cpu-fp32 |", "| tiny |"):
        assert row in result.stdout, row
    probe = subprocess.run([sys.executable, "benchmarks/dense_detection.py", "--quick", "--dfine-only", "--dfine-lr",
                            "1e-3"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "D-FINE (transformers), LR 0.001: 10.28 M parameters" in probe.stdout and "| detection |" not in probe.stdout
    dense = subprocess.run([sys.executable, "benchmarks/dense_detection.py", "--quick", "--dense-only", "2",
                            "--dense-preset", "tiny"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert dense.returncode == 0, dense.stderr[-3000:]
    lines = [line for line in dense.stdout.splitlines() if line.startswith("dense tiny over resnet26, LR 0.001: ")]
    assert len(lines) == 2 and "| D-FINE" not in dense.stdout
