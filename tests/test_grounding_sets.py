"""Grounding over box sets: the metric (acc@0.5 one-to-one, precision / recall / F1 of "none") on
hand-computed cases, the task's metric pairs, and the demo config that trains and measures multi-box
and no-box grounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from ofa_ufo.metrics import get_metric
from ofa_ufo.metrics.grounding import box_sets_match
from ofa_ufo.tasks import get_task
from ofa_ufo.training import ConfigError, Trainer, load_config
from ofa_ufo.training.mixture import build_sources, eval_examples

A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 0.0, 30.0, 10.0]  # disjoint from A


def test_single_box_reference_is_ofas_acc():
    """One reference box: right iff one box is predicted at IoU >= 0.5 (IoU 0.5 exactly counts)."""
    predictions = [[0, 0, 10, 5], [0, 0, 10, 4.9], [], None, [[0, 0, 10, 5], B]]  # IoU 0.5, 0.49, none, none, 2 boxes
    result = get_metric("grounding")(predictions, [A] * 5)
    assert result["acc@0.5"] == pytest.approx(1 / 5)
    assert get_metric("acc@0.5")(predictions, [[A]] * 5) == {"acc@0.5": pytest.approx(1 / 5)}


def test_several_boxes_must_pair_one_to_one():
    assert box_sets_match([B, A], [A, B])  # order does not matter
    assert not box_sets_match([A], [A, B])  # one missing
    assert not box_sets_match([A, B, A], [A, B])  # a duplicate is one box too many
    assert not box_sets_match([A, A], [A, B])  # both on A: B has no partner


def test_pairing_is_a_matching_not_greedy():
    """p1 overlaps both references, p2 only the first: pairing p1 with the first (greedy) strands p2;
    the one-to-one pairing p1-second, p2-first exists, so the example is right."""
    first, second = [0, 0, 10, 10], [0, 0, 10, 8]
    p1 = [0, 0, 10, 9]  # IoU 90/100 = 0.9 with first, 80/90 = 0.89 with second
    p2 = [0, 3, 10, 13]  # IoU 70/130 = 0.54 with first, 50/130 = 0.38 with second
    assert box_sets_match([p1, p2], [first, second])
    assert not box_sets_match([p2, p2], [first, second])


def test_no_object_examples_and_none_precision_recall():
    """refs / preds: [] / [] right; [] / [A] wrong; [A] / [] wrong; [A] / [A] right; [A, B] / [B, A]
    right; [A] / [] wrong. Predicted none 3 times, 1 of them right: precision 1/3; 2 references
    are none, 1 found: recall 1/2; F1 = 2 (1/3)(1/2) / (1/3 + 1/2) = 0.4; acc 3/6."""
    references = [[], [], [A], [A], [A, B], A]
    predictions = [[], [A], [], A, [B, A], None]
    result = get_metric("grounding")(predictions, references)
    assert result == {"acc@0.5": pytest.approx(0.5), "none_precision": pytest.approx(1 / 3),
                      "none_recall": pytest.approx(0.5), "none_f1": pytest.approx(0.4)}


def test_none_scores_are_zero_without_anything_to_count():
    result = get_metric("grounding")([A, B], [A, A])
    assert result == {"acc@0.5": 0.5, "none_precision": 0.0, "none_recall": 0.0, "none_f1": 0.0}
    assert get_metric("acc@0.5")([None], [None]) == {"acc@0.5": 1.0}  # no object, none said: no crash


def test_malformed_box_sets_name_the_example():
    with pytest.raises(ValueError, match=r"prediction 1 must be a box \[x0, y0, x1, y1\], a list of such boxes"):
        get_metric("grounding")([A, [1, 2, 3]], [A, A])
    with pytest.raises(ValueError, match="reference 0 must be"):
        get_metric("grounding")([A], ["the cat"])


def test_metric_pair_gives_every_box():
    task = get_task("grounding")
    result = {"boxes": [A, B], "labels": ["x", "x"], "scores": [0.5, 0.4]}
    assert task.metric_pair(result, {"text": "x", "box": A}) == ([A, B], [A])
    assert task.metric_pair(result, {"text": "x", "boxes": [B, A]}) == ([A, B], [B, A])
    assert task.metric_pair({"boxes": [], "labels": [], "scores": []}, {"text": "x", "boxes": []}) == ([], [])


# ---- the demo config ---------------------------------------------------------------------------

CONFIG = "pretrain_demo_grounding_multi"


def test_demo_config_draws_and_holds_out_box_sets():
    config = load_config(CONFIG, ["demo_train_scenes=64", "eval_examples=40", "tasks={grounding: 1}"])
    source = build_sources(config)["grounding"]
    drawn = [source.draw(k) for k in range(60)]
    held_out, spec = eval_examples(config, "grounding")
    for examples in (drawn, held_out):
        counts = [1 if e.get("box") is not None else len(e["boxes"]) for e in examples]
        assert 0 in counts and max(counts) >= 2 and 1 in counts, counts
    assert spec.metric == "grounding" and spec.generation["max_boxes"] == 3 and len(held_out) == 40


@pytest.mark.parametrize("options, message", [
    ("{grounding: {multi: 0.3}}", r"unknown demo option\(s\) \['multi'\]; its demo examples take \['multi_prob'"),
    ("{grounding: {multi_prob: 0.9, none_prob: 0.2}}", "sum to <= 1"),
    ("{caption: {none_prob: 0.2}}", r"name task\(s\) \['caption'\] that are not in 'tasks'"),
])
def test_demo_options_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, ["tasks={grounding: 1}", f"demo_options={options}"])


def test_demo_config_trains_and_reports_box_set_metrics(tmp_path):
    """A few steps on a d_model-32 model (too short to learn): the held-out report carries the new keys."""
    overrides = {"model_overrides": TINY, "tasks": {"grounding": 1}, "stem_warmup_images": 0, "freeze": [],
                 "batch_size": 2, "max_steps": 2, "eval_examples": 4, "eval_every": 0, "eval_batch_size": 4,
                 "demo_train_scenes": 16, "num_threads": 1, "show_photos": False, "save_every": 0,
                 "output_dir": str(tmp_path)}
    config = load_config(CONFIG, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    threads = torch.get_num_threads()
    try:
        Trainer(config, resume="never").fit()
    finally:
        torch.set_num_threads(threads)
    report = json.loads((Path(tmp_path) / "metrics.json").read_text())
    for key in ("metrics_untrained", "metrics_trained"):
        assert set(report[key]["grounding"]) == {"acc@0.5", "none_precision", "none_recall", "none_f1"}
        assert all(0.0 <= v <= 1.0 for v in report[key]["grounding"].values())
