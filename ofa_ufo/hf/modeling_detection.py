"""The dense detector as a standalone transformers object detector: `OFAUFODetectorConfig` and
`OFAUFOForObjectDetection`.

It holds what the dense path of `OFAUFOForConditionalGeneration.detect_dense` runs, and nothing else:
the ResNet stem, the task's dense (extracted) supernet and the DAMO-YOLO neck + head; no text encoder
or decoder. `ofa_ufo.extract_dense_detector` makes one from a trained model; it loads with
`AutoModelForObjectDetection`, and `pipeline("object-detection", model=DIR)` serves it with
`OFAUFODetectorImageProcessor` (docs/dense_detection.md, "Deploying the dense detector").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ofa_ufo.hf.configuration import OFAUFOVisionConfig, check_field_types, reject_unknown_fields
from ofa_ufo.layers.rep_conv import fuse_reparam
from ofa_ufo.models.damo_yolo import DENSE_PRESETS, DenseDetector, ZeroHead, decode_boxes, image_pyramid
from ofa_ufo.models.resnet import OUT_CHANNELS, STAGE_CHANNELS, ResNetStem
from ofa_ufo.models.ufo import UFOSupernet

__all__ = ["OFAUFODetectionOutput", "OFAUFODetectorConfig", "OFAUFOForObjectDetection"]


@strict(accept_kwargs=True)
class OFAUFODetectorConfig(PreTrainedConfig):
    """Architecture of an extracted dense detector. `vision_config` is the stem + the dense supernet of
    one task (never a routed one); `id2label` holds the head's classes in order; `fused` records that the
    RepConvs are folded into single convs (the weights are saved that way)."""

    model_type = "ofa-ufo-detector"
    sub_configs_defaults = {"vision_config": OFAUFOVisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    image_size: int = 384
    image_bucket_size: int = 42
    dense_preset: str = "tiny"
    reg_max: int = 16
    fused: bool = False
    task: str = "dense_detection"

    def __post_init__(self, **kwargs):
        check_field_types(self)
        reject_unknown_fields(self, kwargs)
        super().__post_init__(**kwargs)
        if self.dense_preset not in DENSE_PRESETS:
            raise ValueError(f"dense_preset must be one of {sorted(DENSE_PRESETS)}, got {self.dense_preset!r}")
        if self.vision_config.routes_tasks:
            raise ValueError("a detector's vision_config must be a dense subnet (supernet_routed false or no "
                             "supernet): extract it with ofa_ufo.extract_dense_detector")
        if self.reg_max < 1 or self.image_size < 32:
            raise ValueError(f"need reg_max >= 1 and image_size >= 32, got {self.reg_max} and {self.image_size}")

    @property
    def grid_channels(self) -> int:
        """Channels of the stride-16 map the head reads: the supernet's width, or ResNet stage 3's."""
        vision = self.vision_config
        return vision.supernet_dim if vision.supernet_layers else OUT_CHANNELS


@dataclass
class OFAUFODetectionOutput(ModelOutput):
    """Every field is batch-first, so transformers' pipelines can split a batch into per-image outputs.

    logits (B, A, C): class-quality logits (sigmoid -> score) of the A anchor points, finest level first;
    pred_boxes (B, A, 4): their boxes, xyxy normalised to the model input ([0, 1], clipped);
    box_logits (B, A, 4, reg_max + 1): the distributions over the box-edge distances they decode from."""

    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    box_logits: torch.Tensor | None = None


class OFAUFOForObjectDetection(PreTrainedModel):
    """Images (B, 3, H, W) -> dense detections: ResNet stem, dense supernet, RepGFPN neck and ZeroHead."""

    config_class = OFAUFODetectorConfig
    config: OFAUFODetectorConfig
    base_model_prefix = "detector"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: OFAUFODetectorConfig):
        super().__init__(config)
        vision = config.vision_config
        self.stem = ResNetStem(vision.resnet_layers, vision.resnet_drop_path_rate)
        self.supernet = UFOSupernet(vision, OUT_CHANNELS, config.image_bucket_size) if vision.supernet_layers else None
        self.dense_head = DenseDetector((STAGE_CHANNELS[1], config.grid_channels), config.num_labels,
                                        config.dense_preset, config.reg_max)
        if config.fused:
            fuse_reparam(self.dense_head)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """He init for convs, DAMO-YOLO's prior for the head, transformers' defaults elsewhere (a detector
        is normally extracted from a trained model and loads its weights)."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ZeroHead):  # after its convs (children first)
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def fuse(self) -> OFAUFOForObjectDetection:
        """Fold every RepConv of the neck into one 3x3 conv (RepVGG) for inference; recorded in the config,
        so the model saves and loads fused. Uses the BN running statistics: call it on a trained model."""
        fuse_reparam(self.dense_head)
        self.config.fused = True
        return self

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None) -> OFAUFODetectionOutput | tuple:
        """pixel_values (B, 3, H, W) as `OFAUFODetectorImageProcessor` makes them -> `OFAUFODetectionOutput`."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        stride8, stride16 = image_pyramid(self.stem, self.supernet, pixel_values, None, self.config.image_bucket_size)
        output = self.dense_head(stride8, stride16)
        height, width = pixel_values.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=pixel_values.device)
        boxes = (decode_boxes(output) / scale).clamp(0.0, 1.0)  # (B, A, 4) xyxy in [0, 1]
        result = OFAUFODetectionOutput(logits=output.cls_logits, pred_boxes=boxes, box_logits=output.box_logits)
        return result if return_dict is not False else result.to_tuple()
