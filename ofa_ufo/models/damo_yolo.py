"""DAMO-YOLO's dense detector over the image encoder: Efficient RepGFPN neck + ZeroHead + GFL losses.

Inputs are two maps of the OFA-UFO image encoder: the ResNet stage-2 output (stride 8) and the stride-16
grid the encoder already computes (the UFO supernet's output, or ResNet stage 3 without a supernet).
The stride-32 level is made here by one stride-2 conv, so the detector sees the three strides DAMO-YOLO
uses (8 / 16 / 32) while reusing the encoder's features, task routing included. The neck fuses the
levels with CSP blocks of re-parameterisable convs (`fuse_reparam` folds them for inference); the head
is one conv per level and branch ("large neck, small head"). Anchors are one point per cell at
(x * stride, y * stride), as in DAMO-YOLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ufo.layers.detection_losses import distribution_focal_loss, giou_loss, quality_focal_loss
from ofa_ufo.layers.label_assignment import aligned_ota_assign
from ofa_ufo.layers.nms import batched_nms
from ofa_ufo.layers.position import image_position_ids
from ofa_ufo.layers.rep_conv import ConvBNAct, RepConv

# widths: neck channels at strides 8 / 16 / 32; depth: CSP blocks per fusion = round(3 x depth);
# hidden_ratio: width of each block's RepConv relative to the block; head_kernel: the head convs' size.
# small has DAMO-YOLO-T's neck widths, medium DAMO-YOLO-M's neck (widths, depth 1.5); tiny is a
# test-sized neck with Nano's 1x1 head convs.
DENSE_PRESETS: dict[str, dict] = {
    "tiny": {"widths": (16, 16, 24), "depth": 0.33, "hidden_ratio": 1.0, "head_kernel": 1},
    "small": {"widths": (64, 128, 256), "depth": 1.0, "hidden_ratio": 0.75, "head_kernel": 3},
    "medium": {"widths": (128, 256, 512), "depth": 1.5, "hidden_ratio": 1.0, "head_kernel": 3},
}
STRIDES = (8, 16, 32)
PRE_NMS_TOPK = 1000
LOSS_WEIGHTS = {"qfl": 1.0, "dfl": 0.25, "giou": 2.0}  # DAMO-YOLO ZeroHead


@dataclass
class DenseOutput:
    cls_logits: torch.Tensor  # (B, A, C) class-quality logits (sigmoid -> score)
    box_logits: torch.Tensor  # (B, A, 4, reg_max + 1) distribution over ltrb distances in stride units
    points: torch.Tensor  # (A, 2) anchor points (x, y) in model-input pixels
    strides: torch.Tensor  # (A,) stride of each anchor
    neck_features: tuple[torch.Tensor, ...]  # the neck's outputs, finest first


def resolve_preset(preset: str | dict) -> dict:
    """A preset name or dict -> a complete preset dict (unknown names or keys raise)."""
    if isinstance(preset, str):
        if preset not in DENSE_PRESETS:
            raise ValueError(f"unknown dense preset {preset!r}; known: {sorted(DENSE_PRESETS)}")
        return dict(DENSE_PRESETS[preset])
    missing = set(DENSE_PRESETS["tiny"]) - set(preset)
    extra = set(preset) - set(DENSE_PRESETS["tiny"])
    if missing or extra or len(preset["widths"]) != 3:
        raise ValueError(f"a dense preset dict needs exactly {sorted(DENSE_PRESETS['tiny'])} with 3 widths; "
                         f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    return dict(preset, widths=tuple(preset["widths"]))


class ReverseBlock(nn.Module):
    """DAMO-YOLO's BasicBlock_3x3_Reverse: RepConv 3x3 -> ConvBNAct 3x3, plus the identity."""

    def __init__(self, channels: int, hidden_ratio: float):
        super().__init__()
        hidden = max(1, int(channels * hidden_ratio))
        self.rep = RepConv(channels, hidden)
        self.conv = ConvBNAct(hidden, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.rep(x))


class CSPFusion(nn.Module):
    """CSPStage: a 1x1 shortcut branch and a chain of blocks whose every output is concatenated, then 1x1."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, hidden_ratio: float):
        super().__init__()
        first, mid = out_channels // 2, out_channels - out_channels // 2
        self.shortcut = ConvBNAct(in_channels, first, 1)
        self.start = ConvBNAct(in_channels, mid, 1)
        self.blocks = nn.ModuleList(ReverseBlock(mid, hidden_ratio) for _ in range(num_blocks))
        self.fuse = ConvBNAct(first + num_blocks * mid, out_channels, 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1)
        outs, y = [self.shortcut(x)], self.start(x)
        for block in self.blocks:
            y = block(y)
            outs.append(y)
        return self.fuse(torch.cat(outs, 1))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling to `like`'s grid (x2 for even sizes; exact for odd ones too)."""
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class RepGFPN(nn.Module):
    """Efficient RepGFPN (GiraffeNeckV2): queen-fusion without the extra upsampling links."""

    def __init__(self, widths: tuple[int, int, int], num_blocks: int, hidden_ratio: float):
        super().__init__()
        c3, c4, c5 = widths

        def fusion(in_channels: int, out_channels: int) -> CSPFusion:
            return CSPFusion(in_channels, out_channels, num_blocks, hidden_ratio)

        self.down_p4 = ConvBNAct(c4, c4, 3, 2)
        self.down_p3 = ConvBNAct(c3, c3, 3, 2)
        self.down_out3 = ConvBNAct(c3, c3, 3, 2)
        self.down_n4 = ConvBNAct(c4, c4, 3, 2)
        self.down_out4 = ConvBNAct(c4, c4, 3, 2)
        self.fuse_n5 = fusion(c5 + c4, c5)
        self.fuse_n4 = fusion(c4 + c3 + c5, c4)
        self.fuse_out3 = fusion(c3 + c4, c3)
        self.fuse_out4 = fusion(c4 + c3, c4)
        self.fuse_out5 = fusion(c5 + c4 + c4, c5)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n5 = self.fuse_n5([p5, self.down_p4(p4)])
        n4 = self.fuse_n4([p4, self.down_p3(p3), _up(n5, p4)])
        out3 = self.fuse_out3([p3, _up(n4, p3)])
        out4 = self.fuse_out4([n4, self.down_out3(out3)])
        out5 = self.fuse_out5([n5, self.down_n4(n4), self.down_out4(out4)])
        return out3, out4, out5


class ZeroHead(nn.Module):
    """Per level (weights not shared): one conv for class quality, one for the box-edge distributions
    (scaled by a learnable per-level scalar)."""

    def __init__(self, widths: tuple[int, ...], num_classes: int, reg_max: int, kernel: int):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls = nn.ModuleList(nn.Conv2d(w, num_classes, kernel, padding=kernel // 2) for w in widths)
        self.reg = nn.ModuleList(nn.Conv2d(w, 4 * (reg_max + 1), kernel, padding=kernel // 2) for w in widths)
        self.scales = nn.Parameter(torch.ones(len(widths)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DAMO-YOLO's init: N(0, 0.01) weights; class bias so every score starts at 0.01."""
        for conv in (*self.cls, *self.reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        for conv in self.cls:
            nn.init.constant_(conv.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.ones_(self.scales)

    def forward(self, features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> class logits (B, A, C), box logits (B, A, 4, reg_max + 1); levels concatenated finest first."""
        cls, box = [], []
        for level, x in enumerate(features):
            cls.append(self.cls[level](x).flatten(2).transpose(1, 2))  # (B, h*w, C)
            reg = self.reg[level](x) * self.scales[level]  # (B, 4 * (R + 1), h, w)
            box.append(reg.flatten(2).transpose(1, 2).unflatten(2, (4, self.reg_max + 1)))  # (B, h*w, 4, R + 1)
        return torch.cat(cls, 1), torch.cat(box, 1)


def anchor_points(features: tuple[torch.Tensor, ...], strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per cell at (x * stride, y * stride): points (A, 2) and strides (A,), finest level first."""
    points, point_strides = [], []
    for x, stride in zip(features, strides):
        height, width = x.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(height, device=x.device), torch.arange(width, device=x.device),
                                indexing="ij")
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride)  # (h*w, 2)
        point_strides.append(torch.full((height * width,), float(stride), device=x.device))
    return torch.cat(points), torch.cat(point_strides)


def decode_boxes(output: DenseOutput) -> torch.Tensor:
    """(B, A, 4) xyxy model-input px: expected ltrb distance over the bins x stride, around each point."""
    bins = torch.arange(output.box_logits.shape[-1], device=output.box_logits.device, dtype=torch.float32)
    distance = (output.box_logits.float().softmax(-1) * bins).sum(-1) * output.strides[None, :, None]  # (B, A, 4)
    points = output.points[None]  # (1, A, 2)
    return torch.cat([points - distance[..., :2], points + distance[..., 2:]], -1)


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class DenseDetector(nn.Module):
    """RepGFPN neck + ZeroHead over a stride-8 and a stride-16 map; AlignedOTA + GFL/GIoU losses."""

    def __init__(self, in_channels: tuple[int, int], num_classes: int, preset: str | dict = "tiny",
                 reg_max: int = 16):
        super().__init__()
        if len(in_channels) != 2 or num_classes < 1 or reg_max < 1:
            raise ValueError(f"need in_channels (stride-8, stride-16), num_classes >= 1, reg_max >= 1; got "
                             f"{in_channels}, {num_classes}, {reg_max}")
        self.preset = resolve_preset(preset)
        self.in_channels, self.num_classes, self.reg_max = tuple(in_channels), num_classes, reg_max
        c3, c4, c5 = self.preset["widths"]
        self.lateral8 = ConvBNAct(in_channels[0], c3, 1)
        self.lateral16 = ConvBNAct(in_channels[1], c4, 1)
        self.down16 = ConvBNAct(c4, c5, 3, 2)  # makes the stride-32 level
        self.neck = RepGFPN((c3, c4, c5), max(1, round(3 * self.preset["depth"])), self.preset["hidden_ratio"])
        self.head = ZeroHead((c3, c4, c5), num_classes, reg_max, self.preset["head_kernel"])

    def _check_inputs(self, stride8: torch.Tensor, stride16: torch.Tensor) -> None:
        expected16 = tuple(-(-s // 2) for s in stride8.shape[-2:])
        if stride8.dim() != 4 or stride16.dim() != 4 or tuple(stride16.shape[-2:]) != expected16:
            raise ValueError(f"need (B, C, h, w) maps with the stride-16 grid half the stride-8 one (rounded up); "
                             f"got {tuple(stride8.shape)} and {tuple(stride16.shape)}")
        if (stride8.shape[1], stride16.shape[1]) != self.in_channels:
            raise ValueError(f"the detector was built for {self.in_channels} input channels, got "
                             f"{(stride8.shape[1], stride16.shape[1])}")

    def forward(self, stride8: torch.Tensor, stride16: torch.Tensor) -> DenseOutput:
        self._check_inputs(stride8, stride16)
        p3, p4 = self.lateral8(stride8), self.lateral16(stride16)
        features = self.neck(p3, p4, self.down16(p4))
        cls_logits, box_logits = self.head(features)
        points, strides = anchor_points(features, STRIDES)
        return DenseOutput(cls_logits, box_logits, points, strides, features)

    def _assign(self, output: DenseOutput, boxes: torch.Tensor,
                targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image AlignedOTA -> QFL targets (B, A, C) and the positives' (batch, anchor) indices and gt boxes."""
        quality = torch.zeros_like(output.cls_logits, dtype=torch.float32)
        batch_index, anchor_index, gt_boxes = [], [], []
        for b, target in enumerate(targets):
            gt, labels = self._target(target, boxes.device)
            assignment = aligned_ota_assign(output.cls_logits[b].detach(), boxes[b].detach(), output.points,
                                            output.strides, gt, labels)
            anchors = assignment.positive.nonzero()[:, 0]
            matched = assignment.gt_index[anchors]
            quality[b, anchors, labels[matched]] = assignment.quality[anchors].float().clamp(min=1e-6)
            batch_index.append(torch.full_like(anchors, b))
            anchor_index.append(anchors)
            gt_boxes.append(gt[matched])
        return quality, torch.cat(batch_index), torch.cat(anchor_index), torch.cat(gt_boxes)

    @staticmethod
    def _target(target: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError("each target must be a dict with 'boxes' (N, 4) xyxy and 'labels' (N,)")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.long, device=device).reshape(-1)
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"target has {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        return boxes, labels

    def loss(self, output: DenseOutput, targets: list[dict]) -> dict[str, torch.Tensor]:
        """{"loss", "qfl", "dfl", "giou"}: QFL over all anchors / number of positives; GIoU and DFL on the
        positives, weighted by their detached best class score and normalised by the weights' sum (DAMO-YOLO)."""
        if len(targets) != output.cls_logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {output.cls_logits.shape[0]} images")
        boxes = decode_boxes(output)  # (B, A, 4)
        quality, batch_index, anchor_index, gt_boxes = self._assign(output, boxes, targets)
        qfl = quality_focal_loss(output.cls_logits.float(), quality).sum() / max(anchor_index.numel(), 1)
        if anchor_index.numel() == 0:
            giou = dfl = output.box_logits.sum() * 0.0  # keeps the graph connected for distributed training
        else:
            giou, dfl = self._box_losses(output, boxes, batch_index, anchor_index, gt_boxes)
        total = LOSS_WEIGHTS["qfl"] * qfl + LOSS_WEIGHTS["dfl"] * dfl + LOSS_WEIGHTS["giou"] * giou
        return {"loss": total, "qfl": qfl, "dfl": dfl, "giou": giou}

    def _box_losses(self, output: DenseOutput, boxes: torch.Tensor, batch_index: torch.Tensor,
                    anchor_index: torch.Tensor, gt_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = output.cls_logits[batch_index, anchor_index].detach().float().sigmoid().max(-1).values  # (P,)
        weight_sum = weight.sum().clamp(min=1e-12)
        giou = (giou_loss(boxes[batch_index, anchor_index], gt_boxes) * weight).sum() / weight_sum
        points, strides = output.points[anchor_index], output.strides[anchor_index, None]  # (P, 2), (P, 1)
        distances = torch.cat([points - gt_boxes[:, :2], gt_boxes[:, 2:] - points], -1) / strides  # (P, 4) ltrb
        distances = distances.clamp(min=0, max=self.reg_max - 0.1)
        logits = output.box_logits[batch_index, anchor_index].float().reshape(-1, self.reg_max + 1)  # (P*4, R+1)
        dfl = distribution_focal_loss(logits, distances.reshape(-1)) * weight.repeat_interleave(4)
        return giou, dfl.sum() / (4 * weight_sum)

    @torch.no_grad()
    def postprocess(self, output: DenseOutput, score_threshold: float = 0.05, iou_threshold: float = 0.6,
                    max_detections: int = 100, input_size: tuple[int, int] | None = None) -> list[dict]:
        """Per image {"boxes" (K, 4) xyxy model-input px, "scores" (K,), "labels" (K,)}, class-aware NMS.

        Boxes are clipped to `input_size` (H, W), by default the extent of the stride-8 grid."""
        _check_threshold("score_threshold", score_threshold)
        _check_threshold("iou_threshold", iou_threshold)
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        if input_size is None:
            input_size = tuple(int(s) * STRIDES[0] for s in output.neck_features[0].shape[-2:])
        height, width = input_size
        boxes = decode_boxes(output)
        boxes = torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                             boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], -1)
        scores = output.cls_logits.float().sigmoid()  # (B, A, C)
        return [self.select_detections(boxes[b], scores[b], score_threshold, iou_threshold, max_detections)
                for b in range(scores.shape[0])]

    @staticmethod
    def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, iou_threshold: float,
                    max_detections: int) -> dict[str, torch.Tensor]:
        """One image: every (anchor, class) above the threshold is a candidate; top PRE_NMS_TOPK go to NMS."""
        anchors, labels = (scores > score_threshold).nonzero(as_tuple=True)
        candidate_scores = scores[anchors, labels]
        if candidate_scores.numel() > PRE_NMS_TOPK:
            top = candidate_scores.topk(PRE_NMS_TOPK).indices
            anchors, labels, candidate_scores = anchors[top], labels[top], candidate_scores[top]
        keep = batched_nms(boxes[anchors], candidate_scores, labels, iou_threshold)[:max_detections]
        return {"boxes": boxes[anchors[keep]], "scores": candidate_scores[keep], "labels": labels[keep]}


def image_pyramid(stem: nn.Module, supernet: nn.Module | None, pixel_values: torch.Tensor,
                  task_ids: torch.Tensor | None, image_bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stride8, stride16) maps for the dense detector, the same computation as `OFAEncoder.embed_image`
    up to the supernet output: ResNet stage 2, and stage 3 refined by the (task-routed) supernet."""
    _, stride8, grid = stem(pixel_values, return_stages=True)
    if supernet is None:
        return stride8, grid
    batch, _, height, width = grid.shape
    if max(height, width) > image_bucket_size:
        raise ValueError(f"image of {tuple(pixel_values.shape[-2:])} px gives a {height}x{width} grid; the 2-D "
                         f"relative bias supports at most {image_bucket_size} per side")
    tokens = grid.flatten(2).transpose(1, 2)  # (B, h*w, C)
    ids = image_position_ids(height, width, image_bucket_size, pixel_values.device)
    tokens = supernet(tokens, ids, task_ids)  # (B, h*w, D)
    return stride8, tokens.transpose(1, 2).reshape(batch, -1, height, width)  # (B, D, h, w)
