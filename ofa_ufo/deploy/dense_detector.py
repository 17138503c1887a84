"""Deploy the DAMO-YOLO dense head: extract it with its image encoder into a standalone transformers
object detector, fuse its re-parameterisable convs, export it to ONNX, and time it on the device profiles.

    detector = ofa_ufo.extract_dense_detector(model, task="dense_detection", fuse=True)
    detector.save_pretrained(d); OFAUFODetectorImageProcessor(size=detector.config.image_size).save_pretrained(d)
    pipeline("object-detection", model=d)(image)          # [{"score", "label", "box": {"xmin", ...}}, ...]
    export_detector_onnx(detector, "detector_onnx/")      # model.onnx, dynamic batch
    measure_detector_latency(detector, "onnx-cpu", batch_size=8)
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ofa_ufo.core.hardware import precision_support
from ofa_ufo.core.timing import cpu_name, run_times
from ofa_ufo.deploy.onnx_export import DEFAULT_OPSET, QUANTIZATIONS, quantize_int8
from ofa_ufo.deploy.profiles import LatencyRecord, check_target, target_device
from ofa_ufo.deploy.subnets import extract_subnet
from ofa_ufo.hf.image_processing_detection import OFAUFODetectorImageProcessor
from ofa_ufo.hf.modeling_detection import OFAUFODetectionOutput, OFAUFODetectorConfig, OFAUFOForObjectDetection

__all__ = ["DETECTOR_ONNX_FILE", "OnnxDetector", "export_detector_onnx", "extract_dense_detector",
           "measure_detector_latency"]

DETECTOR_ONNX_FILE = "model.onnx"
DETECTOR_MANIFEST_FILE = "onnx_manifest.json"
_OUTPUT_NAMES = ["logits", "pred_boxes"]


def _task_model(model, task: str, arch):
    """The model whose supernet is dense for `task`: the routed supernet's subnet, or the model itself."""
    vision = model.config.vision_config
    if vision.routes_tasks:
        return extract_subnet(model, task, arch)
    if arch is not None:
        raise ValueError("arch= picks a subnet of a routed supernet; this model has none to pick from")
    if vision.supernet_layers and vision.supernet_task != task:
        raise ValueError(f"the model is a subnet extracted for task {vision.supernet_task!r}, not {task!r}")
    return model


def _detector_config(model, task: str) -> OFAUFODetectorConfig:
    config, head = model.config, model.dense_head
    labels = config.dense_head["labels"]
    return OFAUFODetectorConfig(vision_config=config.vision_config.to_dict(), image_size=config.image_size,
                                image_bucket_size=config.image_bucket_size, dense_preset=config.dense_head["preset"],
                                reg_max=head.reg_max, task=task, id2label=dict(enumerate(labels)),
                                label2id={name: i for i, name in enumerate(labels)})


def extract_dense_detector(model, task: str = "dense_detection", arch=None,
                           fuse: bool = False) -> OFAUFOForObjectDetection:
    """A standalone `OFAUFOForObjectDetection` computing `model.detect_dense` for `task`: the ResNet stem, the
    supernet as routed for `task` (under `arch`, see `extract_subnet`) and the dense head; no text parts.
    `fuse=True` folds the RepConvs for inference (`OFAUFOForObjectDetection.fuse`). `model` is not changed."""
    if getattr(model, "dense_head", None) is None:
        raise ValueError("this model has no dense detection head (config.dense_head is None): train task "
                         "dense_detection or create it with dense_head={'preset': ..., 'labels': [...]}")
    dense = _task_model(model, task, arch)
    detector = OFAUFOForObjectDetection(_detector_config(dense, task))
    encoder = dense.get_encoder()
    parts = {"stem": encoder.embed_images, "supernet": encoder.supernet, "dense_head": dense.dense_head}
    state = {f"{name}.{key}": value for name, part in parts.items() if part is not None
             for key, value in part.state_dict().items()}
    detector.load_state_dict(state, strict=True)
    detector = detector.to(next(model.parameters()).device).eval()
    return detector.fuse() if fuse else detector


class _DetectorGraph(nn.Module):
    """pixel_values -> (logits, pred_boxes): the two outputs post-processing needs."""

    def __init__(self, detector: OFAUFOForObjectDetection) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.detector(pixel_values)
        return output.logits, output.pred_boxes


def export_detector_onnx(detector: OFAUFOForObjectDetection, output: str | Path,
                         image_processor: OFAUFODetectorImageProcessor | None = None, *, quantize: str | None = None,
                         opset: int = DEFAULT_OPSET, calibration: Sequence[Image.Image] | None = None) -> Path:
    """Write model.onnx (input `pixel_values` (batch, 3, S, S), outputs `logits` and `pred_boxes`, batch
    dynamic, S fixed at the config's image size), config.json, the image processor's file and a manifest.
    `quantize="int8"`: ONNX Runtime's dynamic quantisation (`quantize_int8`: the supernet's MatMuls; the
    convs stay fp32 unless `calibration` images are given, whose activation ranges make them int8 too).
    A copy is exported: the exporter's graph passes change weights in place."""
    if not isinstance(detector, OFAUFOForObjectDetection):
        raise TypeError(f"export_detector_onnx takes an OFAUFOForObjectDetection, got {type(detector).__name__}")
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    if calibration is not None and quantize is None:
        raise ValueError("calibration images are for quantize='int8'")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    graph = _DetectorGraph(copy.deepcopy(detector).float().cpu().eval())
    size = detector.config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2, 3, S, S)
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / DETECTOR_ONNX_FILE if quantize else output / DETECTOR_ONNX_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer warns at every shape read; only the batch is dynamic
            torch.onnx.export(graph, (pixels,), str(target), dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=_OUTPUT_NAMES,
                              dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *_OUTPUT_NAMES]})
        image_processor = image_processor or OFAUFODetectorImageProcessor(size=size)
        if quantize:
            feeds = None
            if calibration is not None:
                feeds = [{"pixel_values": image_processor(images=[image], return_tensors="np")["pixel_values"]
                          .astype(np.float32)} for image in calibration]
            quantize_int8(target, output / DETECTOR_ONNX_FILE, feeds)
    detector.config.save_pretrained(output)
    image_processor.save_pretrained(output)
    _write_manifest(output, opset, quantize or "fp32", size, len(calibration) if calibration is not None else 0)
    return output


def _write_manifest(output: Path, opset: int, precision: str, image_size: int, calibration_images: int = 0) -> None:
    # onnx and onnxruntime are optional dependencies (the `export` extra), read here for their versions
    import onnx
    import onnxruntime  # (the same optional dependency)

    manifest = {"format": "onnx", "kind": "dense_detector", "precision": precision,
                "calibration_images": calibration_images, "opset": opset,
                "image_size": image_size, "file": DETECTOR_ONNX_FILE, "inputs": ["pixel_values"],
                "outputs": _OUTPUT_NAMES,
                "exported_with": {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
                                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    (output / DETECTOR_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


class OnnxDetector:
    """An exported detector directory run by ONNX Runtime: `OnnxDetector(dir)(pixel_values)` returns the
    same `OFAUFODetectionOutput` fields as the PyTorch model (without `box_logits`)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime  # optional dependency (the `export` extra)

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        path = Path(path)
        if not (path / DETECTOR_ONNX_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {DETECTOR_ONNX_FILE}: write one with export_detector_onnx")
        self.config = OFAUFODetectorConfig.from_pretrained(path)
        self.session = onnxruntime.InferenceSession(str(path / DETECTOR_ONNX_FILE), options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values: torch.Tensor) -> OFAUFODetectionOutput:
        logits, boxes = self.session.run(_OUTPUT_NAMES, {"pixel_values": pixel_values.float().cpu().numpy()})
        return OFAUFODetectionOutput(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))


def _detector_runner(detector: OFAUFOForObjectDetection, target: str, workdir: Path) -> Callable[[torch.Tensor], Any]:
    """A function running one batch through `detector` on `target` (copied or exported as needed)."""
    if target.startswith("onnx"):
        export_detector_onnx(detector, workdir, quantize="int8" if target.endswith("int8") else None)
        return OnnxDetector(workdir, threads=torch.get_num_threads())
    if target == "cuda":
        device, dtype = torch.device("cuda"), precision_support("cuda").dtype
    else:
        device, dtype = torch.device("cpu"), torch.bfloat16 if target == "cpu-bf16" else torch.float32
    model = copy.deepcopy(detector).to(device, dtype).eval()

    def run(pixel_values: torch.Tensor) -> OFAUFODetectionOutput:
        with torch.inference_mode():
            return model(pixel_values.to(device, dtype))
    return run


def measure_detector_latency(detector: OFAUFOForObjectDetection, target: str = "cpu-fp32", batch_size: int = 1,
                             repeats: int = 10, warmup: int = 2) -> LatencyRecord:
    """Median latency (ms) of one forward of `batch_size` random images at the detector's size on `target`
    (a device profile of `ofa_ufo.deploy.profiles`; post-processing not included). `new_tokens` is 0."""
    check_target(target)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = detector.config.image_size
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch_size, 3, size, size)).astype(np.float32))
    with tempfile.TemporaryDirectory(prefix="ofa_ufo_detector_profile_") as workdir:
        run = _detector_runner(detector.eval(), target, Path(workdir))
        times = run_times(lambda: run(pixels), repeats, warmup)
    return LatencyRecord(target, 1e3 * float(np.median(times)), repeats, 0, target_device(target))
