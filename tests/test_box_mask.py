"""Grounding's auxiliary box-mask loss (`ofa_ufo.tasks.box_mask`, the `GroundingTask.auxiliary` hook):
cell targets and the loss."""

from __future__ import annotations

import pytest
import torch

from ofa_ufo.tasks import get_task, list_tasks
from ofa_ufo.tasks.box_mask import cell_coverage, referred_boxes

GROUNDING = get_task("grounding")


def test_cell_coverage_is_the_share_of_each_cell_in_the_box():
    # a 256 x 128 image on a 4 x 4 grid: cells are 64 x 32 pixels of the original
    assert cell_coverage([(0, 0, 64, 32)], (256, 128), 4, 4).flatten().tolist() == [1.0] + [0.0] * 15
    half = cell_coverage([(32, 0, 96, 32)], (256, 128), 4, 4)
    assert half[0, :2].tolist() == [0.5, 0.5] and half.sum() == 1.0
    quarter = cell_coverage([(224, 112, 288, 144)], (256, 128), 4, 4)  # runs off the image
    assert quarter[3, 3] == pytest.approx(0.25) and quarter.sum() == pytest.approx(0.25)
    assert cell_coverage([], (256, 128), 4, 4).sum() == 0  # "no such object": no cell is named


def test_several_boxes_cover_their_union():
    cover = cell_coverage([(0, 0, 64, 64), (32, 0, 128, 64)], (128, 128), 2, 2)
    assert cover.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_referred_boxes_reads_box_or_boxes():
    assert referred_boxes({"box": [1, 2, 3, 4]}) == [[1, 2, 3, 4]]
    assert referred_boxes({"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert referred_boxes({"boxes": []}) == []


def test_box_mask_loss_reads_only_grounding_rows_and_their_image_tokens():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 1)
    states = torch.randn(3, 16 + 5, 8, requires_grad=True)  # 4 x 4 image tokens, then 5 text tokens
    pixels = torch.zeros(3, 3, 64, 64)
    examples = [{"task": "vqa", "image_size": (64, 64)},
                {"task": "grounding", "image_size": (64, 64), "box": [0, 0, 16, 16]},
                {"task": "grounding", "image_size": (64, 64), "boxes": []}]
    loss = GROUNDING.auxiliary_loss(head, states, pixels, examples)
    targets = torch.zeros(2, 16)
    targets[0, 0] = 1.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        head(states[1:, :16]).squeeze(-1), targets, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert states.grad[0].abs().sum() == 0  # the VQA row takes no part
    assert states.grad[1:, 16:].abs().sum() == 0  # nor do the text tokens
    assert states.grad[1:, :16].abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_box_mask_loss_is_zero_without_grounding_rows():
    head = torch.nn.Linear(8, 1)
    states = torch.randn(1, 20, 8)
    pixels = torch.zeros(1, 3, 64, 64)
    assert GROUNDING.auxiliary_loss(head, states, pixels, [{"task": "vqa", "image_size": (9, 9)}]) == 0
    assert GROUNDING.auxiliary_loss(head, states, None, [{"task": "grounding", "box": [0, 0, 1, 1]}]) == 0


def test_only_grounding_declares_an_auxiliary_loss_with_its_config_field_and_state_key():
    auxiliary = {name: get_task(name).auxiliary for name in list_tasks() if get_task(name).auxiliary is not None}
    assert list(auxiliary) == ["grounding"]
    assert (auxiliary["grounding"].weight_field, auxiliary["grounding"].state_key) == ("box_mask_weight", "box_head")
    head = GROUNDING.auxiliary_head(8)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (8, 1)
    with pytest.raises(NotImplementedError, match="'caption' has no auxiliary loss"):
        get_task("caption").auxiliary_head(8)
