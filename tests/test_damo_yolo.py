"""DAMO-YOLO building blocks: RepConv fusion, GFL/GIoU losses, AlignedOTA, NMS, the dense detector."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from ofa_ufo.layers.detection_losses import (
    box_iou,
    distribution_focal_loss,
    generalized_box_iou,
    giou_loss,
    quality_focal_loss,
)
from ofa_ufo.layers.label_assignment import aligned_ota_assign
from ofa_ufo.layers.nms import batched_nms
from ofa_ufo.layers.rep_conv import RepConv, fuse_reparam
from ofa_ufo.models.damo_yolo import DENSE_PRESETS, DenseDetector, DenseOutput, decode_boxes, image_pyramid
from ofa_ufo.models.resnet import STAGE_CHANNELS, ResNetStem


def _randomise_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so fusion has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                shape = bn.running_mean.shape
                bn.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                bn.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(shape, generator=generator) * 0.2)


# ---- RepConv -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels, out_channels, stride", [(8, 8, 1), (8, 12, 1), (8, 8, 2)])
def test_repconv_fused_equals_branches(in_channels, out_channels, stride):
    torch.manual_seed(0)
    conv = RepConv(in_channels, out_channels, stride)
    assert (conv.identity is not None) == (in_channels == out_channels and stride == 1)
    _randomise_batch_norms(conv)
    conv.eval()
    x = torch.randn(2, in_channels, 9, 9)
    expected = conv(x)
    conv.fuse()
    assert conv.dense is None and isinstance(conv.fused, nn.Conv2d) and conv.fused.kernel_size == (3, 3)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_whole_detector_fused_equals_unfused():
    torch.manual_seed(0)
    detector = DenseDetector((16, 24), 3, "small")
    _randomise_batch_norms(detector)
    detector.eval()
    x8, x16 = torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4)
    with torch.no_grad():
        before = detector(x8, x16)
        assert fuse_reparam(detector) is detector
        after = detector(x8, x16)
    assert all(m.fused is not None for m in detector.modules() if isinstance(m, RepConv))
    for a, b in zip(before.neck_features, after.neck_features):
        assert (a - b).abs().max() < 1e-4
    assert (before.cls_logits - after.cls_logits).abs().max() < 1e-4
    assert (before.box_logits - after.box_logits).abs().max() < 1e-4


# ---- overlaps and losses (expected values by hand) ------------------------------------------------------


def test_box_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1], [0, 0, 2, 2]])
    pairwise = box_iou(a[:, None], b[None])
    assert pairwise.shape == (2, 3)
    # a0 & b0: overlap 1, union 4 + 4 - 1 = 7; a0 & b2 identical; a1 & b2: 1 / 4; a1 & b1 disjoint
    assert torch.allclose(pairwise, torch.tensor([[1 / 7, 0, 1], [0, 0, 0.25]]), atol=1e-6)
    # elementwise pairs (a0, b0) and (a1, b1): enclosing boxes 3x3 and 3x1
    giou = generalized_box_iou(a, b[:2])
    assert torch.allclose(giou, torch.tensor([1 / 7 - 2 / 9, 0 - 1 / 3]), atol=1e-6)
    assert torch.allclose(giou_loss(a, b[:2]), torch.tensor([1 - (1 / 7 - 2 / 9), 4 / 3]), atol=1e-6)
    assert giou_loss(b[2:], a[:1]).item() == pytest.approx(0.0, abs=1e-6)


def test_quality_focal_loss_by_hand():
    logits = torch.tensor([0.0, math.log(3.0), 0.0])  # sigmoid 0.5, 0.75, 0.5
    quality = torch.tensor([0.3, 0.0, 1.0])
    expected = torch.tensor([
        math.log(2) * 0.2**2,  # BCE(0.5, 0.3) = ln 2 whatever the target; |0.5 - 0.3|^2
        -math.log(0.25) * 0.75**2,  # BCE(0.75, 0) = -ln(1 - 0.75)
        math.log(2) * 0.5**2,
    ])
    assert torch.allclose(quality_focal_loss(logits, quality), expected, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        quality_focal_loss(logits, quality[:2])


def test_distribution_focal_loss_by_hand():
    logits = torch.tensor([
        [0.0, math.log(2.0), 0, 0, 0],  # probabilities (1, 2, 1, 1, 1) / 6
        [0.0, math.log(2.0), 0, 0, 0],
        [math.log(3.0), 0, 0, 0, 0],  # (3, 1, 1, 1, 1) / 7
    ])
    target = torch.tensor([1.25, 4.0, 0.5])
    expected = torch.tensor([
        0.75 * -math.log(2 / 6) + 0.25 * -math.log(1 / 6),  # bins 1 and 2 weighted 0.75 / 0.25
        -math.log(1 / 6),  # exactly the last bin
        0.5 * -math.log(3 / 7) + 0.5 * -math.log(1 / 7),
    ])
    assert torch.allclose(distribution_focal_loss(logits, target), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        distribution_focal_loss(logits, torch.tensor([1.0, 4.5, 0.0]))


# ---- AlignedOTA ------------------------------------------------------------------------------------------


def test_assigner_one_gt_inside_positive_outside_negative():
    gt = torch.tensor([[10.0, 10, 30, 30]])
    points = torch.tensor([[20.0, 20], [16, 24], [24, 14], [52, 52], [100, 100]])
    strides = torch.full((5,), 8.0)
    pred = torch.tensor([
        [10.0, 10, 30, 30],  # exact
        [10, 10, 30, 30],  # exact
        [12, 12, 28, 28],  # IoU 256 / 400
        [10, 10, 30, 30],  # exact box, but the anchor is outside the box and its centre region
        [10, 10, 30, 30],
    ])
    result = aligned_ota_assign(torch.zeros(5, 2), pred, points, strides, gt, torch.tensor([1]))
    # candidates are anchors 0-2: k = int(1 + 1 + 0.64) = 2, the two cheapest (the exact boxes) win
    assert result.gt_index.tolist() == [0, 0, -1, -1, -1]
    assert torch.allclose(result.quality, torch.tensor([1.0, 1, 0, 0, 0]), atol=1e-6)
    assert result.positive.tolist() == [True, True, False, False, False]


def test_assigner_shared_anchor_goes_to_the_cheaper_gt():
    gts = torch.tensor([[0.0, 0, 40, 40], [20, 0, 60, 40]])
    labels = torch.tensor([0, 1])
    points, strides = torch.tensor([[30.0, 20]]), torch.tensor([8.0])  # inside both boxes and centre regions
    # both gts claim the only anchor (k >= 1); the box decides: IoU 38 / 42 with gt 1, 22 / 58 with gt 0
    near_second = aligned_ota_assign(torch.zeros(1, 2), torch.tensor([[18.0, 0, 58, 40]]), points, strides,
                                     gts, labels)
    assert near_second.gt_index.tolist() == [1]
    assert near_second.quality.item() == pytest.approx(38 / 42, abs=1e-5)
    near_first = aligned_ota_assign(torch.zeros(1, 2), torch.tensor([[2.0, 0, 42, 40]]), points, strides,
                                    gts, labels)
    assert near_first.gt_index.tolist() == [0]
    # equal IoU (0.6 with each): the class scores decide
    equal = torch.tensor([[10.0, 0, 50, 40]])
    assert aligned_ota_assign(torch.tensor([[-4.0, 2.0]]), equal, points, strides, gts, labels).gt_index.tolist() == [1]
    assert aligned_ota_assign(torch.tensor([[2.0, -4.0]]), equal, points, strides, gts, labels).gt_index.tolist() == [0]


def test_assigner_without_gt_everything_negative():
    result = aligned_ota_assign(torch.zeros(3, 2), torch.rand(3, 4), torch.rand(3, 2), torch.full((3,), 8.0),
                                torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert result.gt_index.tolist() == [-1, -1, -1] and not result.quality.any()


def test_assigner_rejects_labels_outside_the_head():
    with pytest.raises(ValueError, match="gt_labels"):
        aligned_ota_assign(torch.zeros(1, 2), torch.zeros(1, 4), torch.zeros(1, 2), torch.ones(1),
                           torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([2]))


# ---- NMS -------------------------------------------------------------------------------------------------


def test_batched_nms_is_class_aware_and_sorted():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    labels = torch.tensor([0, 0, 1, 0])
    # boxes 0 and 1 overlap with IoU 81 / 119 = 0.68; box 2 is box 1 in another class
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [3, 0, 2]
    assert batched_nms(boxes, scores, labels, 0.7).tolist() == [3, 0, 1, 2]
    assert batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).tolist() == []


# ---- the detector ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(DENSE_PRESETS))
def test_dense_output_shapes(preset):
    detector = DenseDetector((16, 24), 3, preset, reg_max=16)
    out = detector(torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4))  # a 64 px input: 8x8, 4x4, 2x2 cells
    assert out.cls_logits.shape == (2, 84, 3) and out.box_logits.shape == (2, 84, 4, 17)
    assert out.points.shape == (84, 2) and out.strides.shape == (84,)
    assert [f.shape[1] for f in out.neck_features] == list(DENSE_PRESETS[preset]["widths"])
    assert [tuple(f.shape[-2:]) for f in out.neck_features] == [(8, 8), (4, 4), (2, 2)]
    assert (out.strides == 8).sum() == 64 and (out.strides == 16).sum() == 16 and (out.strides == 32).sum() == 4
    assert out.points[1].tolist() == [8.0, 0.0] and out.points[8].tolist() == [0.0, 8.0]  # row-major, x first
    assert out.points[64 + 5].tolist() == [16.0, 16.0]  # stride 16, cell (1, 1)


def test_tiny_preset_is_test_sized():
    detector = DenseDetector((STAGE_CHANNELS[1], 256), 80, "tiny")
    assert sum(p.numel() for p in detector.parameters()) < 60_000


def test_detector_rejects_bad_inputs():
    detector = DenseDetector((16, 24), 3)
    with pytest.raises(ValueError, match="input channels"):
        detector(torch.randn(1, 8, 8, 8), torch.randn(1, 24, 4, 4))
    with pytest.raises(ValueError, match="half"):
        detector(torch.randn(1, 16, 8, 8), torch.randn(1, 24, 8, 8))
    with pytest.raises(ValueError, match="unknown dense preset"):
        DenseDetector((16, 24), 3, "huge")


def test_decode_boxes_expected_distance_times_stride():
    box_logits = torch.zeros(1, 2, 4, 5)
    box_logits[..., 2] = 50.0  # all the mass on bin 2
    out = DenseOutput(torch.zeros(1, 2, 1), box_logits, torch.tensor([[8.0, 8], [32, 0]]), torch.tensor([8.0, 16]),
                      ())
    assert torch.allclose(decode_boxes(out), torch.tensor([[[-8.0, -8, 24, 24], [0, -32, 64, 32]]]))


def test_postprocess_thresholds_and_empty_result():
    detector = DenseDetector((16, 24), 3)
    out = detector(torch.randn(1, 16, 8, 8), torch.randn(1, 24, 4, 4))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\]"):
            detector.postprocess(out, score_threshold=bad)
    out.cls_logits = torch.full_like(out.cls_logits, -10.0)  # every score ~4.5e-5
    (result,) = detector.postprocess(out)
    assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["labels"].shape == (0,)
    out.cls_logits[0, 3, 1] = 5.0
    (result,) = detector.postprocess(out, max_detections=5)
    assert result["labels"].tolist() == [1]
    box = result["boxes"][0]
    assert box.min() >= 0 and box[2] <= 64 and box[3] <= 64  # clipped to the 64 px input


def test_loss_of_an_image_without_objects_is_negative_qfl_only():
    torch.manual_seed(0)
    detector = DenseDetector((16, 24), 3)
    out = detector(torch.randn(1, 16, 8, 8), torch.randn(1, 24, 4, 4))
    losses = detector.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert losses["giou"].item() == 0 and losses["dfl"].item() == 0
    negative_qfl = quality_focal_loss(out.cls_logits, torch.zeros_like(out.cls_logits)).sum()
    assert losses["qfl"].item() == pytest.approx(negative_qfl.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(negative_qfl.item(), rel=1e-5)
    losses["loss"].backward()  # the graph reaches the box branch too (zero gradient there)


def _scene(targets: list[dict]) -> torch.Tensor:
    """Black 64 px images with each box filled by its class colour (class 0 white, class 1 magenta)."""
    colors = torch.tensor([[1.0, 1, 1], [1, 0, 1]])
    images = torch.zeros(len(targets), 3, 64, 64)
    for image, target in zip(images, targets):
        for (x0, y0, x1, y1), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            image[:, y0:y1, x0:x1] = colors[label][:, None, None]
    return images


def test_overfit_two_images_then_postprocess_finds_the_boxes():
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 16, 60, 48]]), "labels": torch.tensor([1])}]
    torch.manual_seed(0)
    stem = ResNetStem((1, 1, 1)).eval()  # random and frozen
    with torch.no_grad():
        _, stride8, stride16 = stem(_scene(targets), return_stages=True)
    detector = DenseDetector((STAGE_CHANNELS[1], STAGE_CHANNELS[2]), 2, "tiny")
    optimizer = torch.optim.Adam(detector.parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        losses = detector.loss(detector(stride8, stride16), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert sum(history[-5:]) / 5 < 0.3 * history[0]
    with torch.no_grad():
        for _ in range(20):  # let the BN running statistics settle on the final weights
            detector(stride8, stride16)
        detector.eval()
        results = detector.postprocess(detector(stride8, stride16), score_threshold=0.3)
    for result, target in zip(results, targets):
        same_class = result["labels"] == target["labels"][0]
        assert same_class.any()
        assert box_iou(result["boxes"][same_class], target["boxes"]).max() > 0.5


# ---- image pyramid vs the encoder --------------------------------------------------------------------------

SUPERNET = dict(supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0,
                supernet_elastic_heads=[2, 3, 4], supernet_elastic_mlp_ratios=[1.0, 1.5, 2.0],
                supernet_elastic_depths=[1, 2])


def _captured(encoder, pixel_values, task_ids):
    """What `embed_image` computes: stage 2 of the stem, and the tokens it gives `image_proj`."""
    seen = {}
    hooks = [encoder.embed_images.layer2.register_forward_hook(lambda m, i, o: seen.update(stride8=o)),
             encoder.image_proj.register_forward_hook(lambda m, i, o: seen.update(tokens=i[0]))]
    with torch.no_grad():
        encoder.embed_image(pixel_values, task_ids)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("with_supernet", [True, False])
def test_image_pyramid_matches_embed_image(with_supernet):
    model = tiny_model(0, vision_config=SUPERNET) if with_supernet else tiny_model(0)
    encoder = model.get_encoder()
    if with_supernet:
        with torch.no_grad():  # non-zero residual outputs, so the blocks are not the identity
            for block in encoder.supernet.blocks:
                block.attn.proj.weight.normal_(std=0.05)
                block.ffn.shared.fc2.weight.normal_(std=0.05)
    pixel_values = torch.randn(2, 3, 64, 64)
    route = model.config.vision_config.route_id("detection")
    task_ids = torch.tensor([route, route])
    seen = _captured(encoder, pixel_values, task_ids)
    with torch.no_grad():
        stride8, stride16 = image_pyramid(encoder.embed_images, encoder.supernet, pixel_values, task_ids,
                                          model.config.image_bucket_size)
    assert torch.equal(stride8, seen["stride8"])
    assert stride16.shape[-2:] == (4, 4)
    assert torch.allclose(stride16.flatten(2).transpose(1, 2), seen["tokens"], atol=1e-6)  # (B, h*w, C)
