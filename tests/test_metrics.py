"""Metrics on hand-checkable cases; the Java-backed caption metrics run once per module."""

from __future__ import annotations

import math
import shutil

import pytest

from ofa_ufo.metrics import box_iou, get_metric, list_metrics, normalize_vqa_answer, vqa_score

REQUIRED = ["acc@0.5", "bleu4", "caption", "cider", "coco_map", "meteor", "rouge_l", "top1", "top5", "vqa_accuracy"]


def test_registry_names_and_unknown_metric() -> None:
    assert set(REQUIRED) <= set(list_metrics())
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*cider.*vqa_accuracy"):
        get_metric("bleu")


# --- VQA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("None", "0"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("red, white", "red white"),  # punctuation next to a space is deleted ...
        ("t-shirt", "t shirt"),  # ... elsewhere it becomes a space ...
        ("1,000 t-shirts", "1000 tshirts"),  # ... unless a digit,digit group is present
        ("  left\tside\n", "left side"),
    ],
)
def test_vqa_normalization(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_score(matches: int, expected: float) -> None:
    # k matching humans: k subsets see k-1 matches, 10-k see k; each scores min(1, n/3).
    answers = ["blue"] * matches + ["green", "red"] * 5
    assert vqa_score("blue", answers[:10]) == pytest.approx(expected)


def test_vqa_normalizes_only_when_humans_disagree() -> None:
    assert vqa_score("Two.", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    # The official script leaves a unanimous question unnormalised (case and whitespace aside).
    assert vqa_score("two", ["2"] * 10) == 0.0
    assert vqa_score(" Yes\n", ["yes"] * 10) == 1.0


def test_vqa_accuracy_averages_questions() -> None:
    metric = get_metric("vqa_accuracy")
    result = metric(["yes", "2"], [["yes"] * 10, ["2", "2"] + ["3"] * 8])
    assert result == {"vqa_accuracy": pytest.approx((1.0 + 0.6) / 2)}
    with pytest.raises(ValueError, match="predictions"):
        metric(["yes"], [])


# --- grounding -----------------------------------------------------------------------------------

GOLD = [0.0, 0.0, 10.0, 10.0]


def test_box_iou() -> None:
    assert box_iou(GOLD, GOLD) == 1.0
    assert box_iou(GOLD, [0, 0, 10, 5]) == 0.5
    assert box_iou(GOLD, [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou(GOLD, [10, 0, 20, 10]) == 0.0  # touching edges: zero-width overlap


def test_grounding_accuracy_threshold_and_missing_boxes() -> None:
    predictions = [[0, 0, 10, 5], [0, 0, 10, 4.9], [], None, [1, 1, 10, 10]]
    result = get_metric("acc@0.5")(predictions, [GOLD] * 5)
    assert result == {"acc@0.5": pytest.approx(2 / 5)}  # IoU 0.5 and 0.81 pass; 0.49 and no box fail


# --- top-k ---------------------------------------------------------------------------------------


def test_topk_accuracy() -> None:
    predictions = [["cat", "dog"], ["dog", "cat", "bird", "fish", "ant", "cow"], "cat", ["cow"] * 5 + ["dog"]]
    gold = ["cat", "ant", "dog", "dog"]
    assert get_metric("top1")(predictions, gold) == {"top1": 0.25}
    assert get_metric("top5")(predictions, gold) == {"top5": 0.5}


# --- captioning (Java) ---------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")

CAPTIONS = [
    "a man riding a red bicycle down the street",
    "two cats sleeping on a wooden bench in the sun",
    "a plate of pasta with tomato sauce and basil",
]


@pytest.fixture(scope="module")
def perfect_caption_scores() -> dict[str, float]:
    """All four caption metrics on predictions identical to their single reference (one METEOR JVM)."""
    return get_metric("caption")([c.capitalize() + "." for c in CAPTIONS], [[c] for c in CAPTIONS])


@needs_java
def test_perfect_captions(perfect_caption_scores: dict[str, float]) -> None:
    scores = perfect_caption_scores
    assert set(scores) == {"bleu4", "meteor", "rouge_l", "cider"}
    assert scores["bleu4"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] == pytest.approx(10.0)  # cosine 1 for every n-gram order, times 10
    assert scores["meteor"] == pytest.approx(1.0, abs=1e-3)  # one chunk: a negligible fragmentation penalty


@needs_java
def test_wrong_captions_score_zero() -> None:
    predictions = ["purple elephants juggle oranges quietly tonight", "xyz", ""]
    references = [[c] for c in CAPTIONS]
    assert get_metric("cider")(predictions, references) == {"cider": 0.0}
    assert get_metric("bleu4")(predictions, references)["bleu4"] == pytest.approx(0.0, abs=1e-6)


@needs_java
def test_partial_captions_by_hand() -> None:
    """ROUGE-L: each image's F-measure (beta 1.2) of LCS precision and recall, averaged over images.
    BLEU-4: geometric mean of the clipped 1..4-gram precisions times the brevity penalty."""
    predictions = ["A man riding a bicycle.", CAPTIONS[1], "a plate of rice"]

    def rouge_f(precision: float, recall: float) -> float:
        return (1 + 1.2**2) * precision * recall / (recall + 1.2**2 * precision)

    # LCS 5 of 5 predicted and 9 reference words; identical; "a plate of": 3 of 4 and of 9
    expected = (rouge_f(1.0, 5 / 9) + 1.0 + rouge_f(3 / 4, 3 / 9)) / 3
    assert get_metric("rouge_l")(predictions, [[c] for c in CAPTIONS]) == {"rouge_l": pytest.approx(expected)}
    # 8 words against 9: 1-grams 8/8, 2-grams 6/7 ("a bicycle" is not in the reference), 3-grams 4/6,
    # 4-grams 2/5 ("a man riding a", "bicycle down the street"); brevity penalty exp(1 - 9/8)
    bleu = get_metric("bleu4")(["a man riding a bicycle down the street"], [[CAPTIONS[0]]])["bleu4"]
    assert bleu == pytest.approx(math.exp(1 - 9 / 8) * (1 * 6 / 7 * 4 / 6 * 2 / 5) ** 0.25, rel=1e-6)


def test_caption_input_errors() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        get_metric("cider")(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match="unknown caption metric"):
        get_metric("caption")(["a dog"], [["a dog"]], metrics=("spice",))


# --- COCO mAP ------------------------------------------------------------------------------------


def _gt(*boxes_labels: tuple[list[float], str]) -> dict[str, list]:
    return {"boxes": [b for b, _ in boxes_labels], "labels": [lab for _, lab in boxes_labels]}


def _det(*boxes_labels_scores: tuple[list[float], str, float]) -> dict[str, list]:
    return {
        "boxes": [b for b, _, _ in boxes_labels_scores],
        "labels": [lab for _, lab, _ in boxes_labels_scores],
        "scores": [s for _, _, s in boxes_labels_scores],
    }


def test_coco_map_perfect() -> None:
    references = [_gt(([0, 0, 10, 10], "cat"), ([20, 20, 50, 40], "dog")), _gt(([5, 5, 30, 30], "cat"))]
    predictions = [
        _det(([0, 0, 10, 10], "cat", 0.9), ([20, 20, 50, 40], "dog", 0.8)),
        _det(([5, 5, 30, 30], "cat", 0.7)),
    ]
    assert get_metric("coco_map")(predictions, references) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}


def test_coco_map_half_found() -> None:
    # Two cats; only the top-scored detection is right. Interpolated precision is 1 up to recall 0.5
    # and 0 beyond: 51 of COCO's 101 recall points (0, 0.01, ..., 0.5), at every IoU threshold.
    references = [_gt(([0, 0, 10, 10], "cat")), _gt(([20, 20, 40, 40], "cat"))]
    wrong_box = [_det(([0, 0, 10, 10], "cat", 0.9)), _det(([100, 100, 110, 110], "cat", 0.8))]
    no_box = [_det(([0, 0, 10, 10], "cat", 0.9)), _det()]
    for predictions in (wrong_box, no_box):
        result = get_metric("coco_map")(predictions, references)
        assert result == {"map": pytest.approx(51 / 101), "map50": pytest.approx(51 / 101)}


def test_coco_map_loose_box() -> None:
    # IoU 0.62 matches at thresholds 0.50, 0.55, 0.60 only: 3 of the 10 thresholds.
    result = get_metric("coco_map")([_det(([0, 0, 10, 6.2], "cat", 0.9))], [_gt((GOLD, "cat"))])
    assert result == {"map": pytest.approx(0.3), "map50": pytest.approx(1.0)}


def test_coco_map_needs_ground_truth() -> None:
    with pytest.raises(ValueError, match="ground-truth"):
        get_metric("coco_map")([_det()], [_gt()])


def test_vqa_accuracy_with_fewer_than_four_answers_is_exact_match():
    from ofa_ufo.metrics import get_metric

    scores = get_metric("vqa_accuracy")(["red", "two", "blue"], [["red"], ["2", "3"], ["green"]])
    assert scores["vqa_accuracy"] == pytest.approx(2 / 3)
