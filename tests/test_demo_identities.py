"""Generated identities for the embedding tasks (ofa_ufo.data.demo_identities): determinism, one look
per identity, distinct identities, camera ids, held-out layouts each metric accepts, and 2-step trainer
runs of the four tasks on them."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import TINY

from ofa_ufo.data.canonical import IDENTITY_TASKS, validate_example
from ofa_ufo.data.demo_identities import (
    CAMERAS,
    HELD_OUT_OFFSET,
    DemoIdentities,
    appearance,
    held_out_examples,
    render_view,
)
from ofa_ufo.data.sources import open_examples
from ofa_ufo.data.specs import load_spec
from ofa_ufo.metrics import get_metric
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.embedding import EmbeddingTask, identities_of

TASKS = list(IDENTITY_TASKS)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("task", TASKS)
def test_items_are_deterministic_and_valid_canonical_examples(task):
    first, again = DemoIdentities(task, num_identities=3), DemoIdentities(task, num_identities=3)
    assert len(first) == 3 * 8
    for index in (0, 5, 23):
        a, b = first[index], again[index]
        assert a["id"] == b["id"] and a["meta"] == b["meta"]
        np.testing.assert_array_equal(pixels(a["image"]), pixels(b["image"]))
        validate_example(a, "demo", index)
    assert first[-1]["id"] == first[23]["id"]
    with pytest.raises(IndexError):
        first[24]
    other_seed = DemoIdentities(task, num_identities=3, seed=1)[0]["image"]
    assert not np.array_equal(pixels(other_seed), pixels(first[0]["image"]))


@pytest.mark.parametrize("task", TASKS)
def test_an_identity_keeps_its_look_and_identities_differ(task):
    looks = [appearance(task, identity) for identity in range(1, 41)]
    assert appearance(task, 7) == looks[6]  # same identity, same colours, pattern and shape
    assert all(a != b for i, a in enumerate(looks) for b in looks[i + 1:])  # no two of 40 identities alike
    colour_keys = [k for k, v in looks[0].items() if isinstance(v, tuple) and len(v) == 3]
    assert colour_keys and len({looks[i][colour_keys[0]] for i in range(40)}) > 30


@pytest.mark.parametrize("task", TASKS)
def test_views_of_one_identity_are_closer_than_views_of_others(task):
    """The look is what an identity keeps across views: the mean colour of the object region, taken
    without camera effects, is nearer between views of one identity than across identities."""
    def signature(identity: int, view: int) -> np.ndarray:
        image = pixels(render_view(task, identity, view, camera=1, size=64))
        return np.sort(image.reshape(-1, 3), axis=0)[:: len(image.reshape(-1, 3)) // 16].ravel()  # colour quantiles

    same = [np.abs(signature(i, 0) - signature(i, 1)).mean() for i in range(1, 11)]
    other = [np.abs(signature(i, 0) - signature(i + 1, 1)).mean() for i in range(1, 11)]
    assert np.mean(same) < np.mean(other)
    a, b = pixels(render_view(task, 3, 0, 1, size=64)), pixels(render_view(task, 3, 1, 1, size=64))
    assert not np.array_equal(a, b)  # views differ (viewpoint, crop, jitter)


@pytest.mark.parametrize("task", ["reid_person", "reid_vehicle"])
def test_reid_training_items_carry_cameras_like_the_market_loader(task):
    data = DemoIdentities(task, num_identities=6)
    metas = [data[i]["meta"] for i in range(len(data))]
    assert set(metas[0]) == {"dataset", "identity", "camera", "split"}
    assert {m["split"] for m in metas} == {"train"}
    assert all(1 <= m["camera"] <= CAMERAS[data.kind] for m in metas)
    for identity in range(1, 7):  # every identity is seen by at least two cameras
        assert len({m["camera"] for m in metas if m["identity"] == identity}) >= 2
    assert data[0]["id"] == f"train/0001_c{metas[0]['camera']}_0"
    assert identities_of(data) == [(m["dataset"], m["identity"]) for m in metas]


@pytest.mark.parametrize("task", ["reid_person", "reid_vehicle"])
def test_reid_held_out_is_a_market_protocol_query_gallery_set(task):
    examples = held_out_examples(task, 50)
    assert len(examples) == 50
    metas = [e["meta"] for e in examples]
    queries = [m for m in metas if m["split"] == "query"]
    assert len(queries) == 10 and {m["split"] for m in metas} == {"query", "gallery"}
    assert min(m["identity"] for m in metas) > HELD_OUT_OFFSET  # never a training identity
    for query in queries:
        gallery = [m for m in metas if m["split"] == "gallery" and m["identity"] == query["identity"]]
        assert len(gallery) == 4 and sum(m["camera"] == query["camera"] for m in gallery) == 1
    perfect = [[1.0 if m["identity"] == q["identity"] else 0.0 for q in queries] for m in metas]
    scores = get_metric("reid")(perfect, metas)
    assert (scores["rank1"], scores["mAP"], scores["valid_queries"]) == (1.0, 1.0, 10)


def test_face_pairs_are_balanced_and_scored_by_verification():
    examples = held_out_examples("face", 80)
    metas = [e["meta"] for e in examples]
    assert len(examples) == 80 and [m["side"] for m in metas[:4]] == [0, 1, 0, 1]
    pairs = {m["pair"]: m for m in metas if m["side"] == 0}
    kinds = Counter(m["same"] for m in pairs.values())
    assert kinds[True] == kinds[False] == 20
    assert sorted({m["fold"] for m in metas}) == list(range(10))
    for pair, first in pairs.items():
        second = next(m for m in metas if m["pair"] == pair and m["side"] == 1)
        assert (first["identity"] == second["identity"]) == first["same"]
    perfect = [[1.0, 0.0] if m["side"] == 0 or m["same"] else [0.0, 1.0] for m in metas]
    assert get_metric("verification")(perfect, metas)["accuracy"] == 1.0
    assert len(held_out_examples("face", 3)) == 0  # fewer than 2 pairs cannot be cross-validated


def test_product_held_out_groups_are_scored_by_recall():
    examples = held_out_examples("product", 40)
    metas = [e["meta"] for e in examples]
    assert len(examples) == 40 and all(m["split"] == "test" for m in metas)
    assert Counter(m["identity"] for m in metas).most_common(1)[0][1] == 4
    assert all(m["super_class"] == appearance("product", m["identity"])["category"] for m in metas)
    one_hot = [[float(m["identity"] == identity) for identity in sorted({m["identity"] for m in metas})]
               for m in metas]
    assert get_metric("recall@k")(one_hot, metas)["recall@1"] == 1.0


def test_held_out_sets_are_deterministic_and_small_sizes_stay_scorable():
    a, b = held_out_examples("reid_person", 10), held_out_examples("reid_person", 10)
    assert [e["meta"] for e in a] == [e["meta"] for e in b]
    np.testing.assert_array_equal(pixels(a[3]["image"]), pixels(b[3]["image"]))
    small = held_out_examples("reid_vehicle", 4)  # 2 identities x (query, gallery from another camera)
    assert [e["meta"]["split"] for e in small] == ["query", "gallery"] * 2
    assert small[0]["meta"]["camera"] != small[1]["meta"]["camera"]
    with pytest.raises(ValueError, match="no demo identities for task 'caption'"):
        held_out_examples("caption", 4)


# ---- the trainer ------------------------------------------------------------------------------------

def test_trainer_accepts_demo_for_the_four_embedding_tasks(tmp_path):
    """One heterogeneous 2-step run: generated identities for training (P x K for the ReID-like tasks),
    held-out identities for scoring before and after."""
    from ofa_ufo.tasks.pk_sampler import PKSource
    from ofa_ufo.training import Trainer
    from ofa_ufo.training.config import config_from_dict

    threads = torch.get_num_threads()
    try:
        config = config_from_dict(dict(
            model_overrides=dict(TINY), tasks={task: 1.0 for task in TASKS}, batch_size=16, max_steps=2,
            eval_examples=10, demo_train_identities=12, num_threads=1, lr=1e-3, output_dir=str(tmp_path / "run")),
            "test")
        trainer = Trainer(config, resume="never")
        sources = trainer.mixture.sources
        assert all(isinstance(sources[t], PKSource) for t in ("reid_person", "reid_vehicle", "product"))
        assert not isinstance(sources["face"], PKSource)  # face: CosFace only, shuffled draws
        assert {t: head.weight.shape[0] for t, head in trainer.heads.items()} == {t: 12 for t in TASKS}
        batch = trainer.mixture.micro_batch(0, 0, 1)
        assert Counter(e["task"] for e in batch) == {t: 4 for t in TASKS}
        person = [e["meta"]["identity"] for e in batch if e["task"] == "reid_person"]
        assert len(set(person)) == 1  # one identity chunk of K = 4
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    headline = {"reid_person": "rank1", "reid_vehicle": "mAP", "face": "accuracy", "product": "recall@1"}
    for task, name in headline.items():
        assert 0.0 <= result.metrics_after[task][name] <= 1.0, (task, result.metrics_after[task])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["metrics_untrained"]) == set(TASKS)
    # the exported model names the training identities (closed set: CosFace classes + BNNeck statistics)
    from transformers import pipeline

    from ofa_ufo.tasks.identities import identity_label

    pipe = pipeline("ofa-ufo", model=str(tmp_path / "run"))
    for task in TASKS:
        example = trainer.mixture.sources[task].examples[0]
        out = pipe(example["image"], task=task, identify=3)
        names = {identity_label(i) for i in trainer.heads[task].class_index}
        assert len(names) == 12 and out["identity"] in names and 0 < out["score"] <= 1
        assert [c["identity"] for c in out["candidates"]][0] == out["identity"] and len(out["candidates"]) == 3
        scores = [c["score"] for c in out["candidates"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6


def test_identity_tasks_are_the_registered_embedding_tasks():
    assert IDENTITY_TASKS == {"reid_person": "person", "reid_vehicle": "vehicle", "face": "face", "product": "product"}
    assert all(isinstance(get_task(task), EmbeddingTask) and get_task(task).identity_kind == kind
               for task, kind in IDENTITY_TASKS.items())
    assert set(CAMERAS) == set(IDENTITY_TASKS.values())  # every kind is drawn here


def test_demo_specs_name_the_generated_identities():
    for task in TASKS:
        spec = load_spec(f"demo_{task}")
        assert spec.task == task and spec.metric == get_task(task).metric
        assert spec.data["source"] == "demo_identities"
    spec = load_spec("demo_product")
    first = next(open_examples(spec.data, spec.task, split="train"))
    assert first["meta"]["identity"] == 1 and first["meta"]["split"] == "train"
    held_out = list(open_examples(spec.data, spec.task))
    assert len(held_out) == spec.data["val_examples"] and held_out[0]["meta"]["identity"] > HELD_OUT_OFFSET


def test_allinone_and_ofa_tasks_train_together_on_the_supernet(tmp_path):
    """The shipped joint config, 2 steps on a tiny routed supernet: every step's batch holds all nine tasks
    (heterogeneous), each row carries its own task id, and both kinds of loss train."""
    from test_supernet import SUPERNET

    from ofa_ufo.training import Trainer
    from ofa_ufo.training.config import load_config

    threads = torch.get_num_threads()
    shipped = load_config("pretrain_demo_allinone_ofa").model_overrides
    tiny = json.dumps({**shipped, **TINY, "vision_config": SUPERNET})  # JSON is YAML
    config = load_config("pretrain_demo_allinone_ofa", [
        f"model_overrides={tiny}", "max_steps=2", "eval_examples=0", "demo_train_scenes=8", "demo_train_identities=8",
        "stem_warmup_images=0", "num_threads=1", "save_every=0", f"output_dir={tmp_path}"])
    try:
        trainer = Trainer(config, resume="never")
        assert trainer.unwrapped.config.vision_config.supernet_routed
        assert trainer.unwrapped.config.embedding_readout == "image"  # metric losses stay off the shared layers
        assert set(trainer.heads) == {"face", "reid_person", "reid_vehicle", "product"}
        examples = trainer.mixture.micro_batch(0, 0, 1)
        assert {e["task"] for e in examples} == set(config.tasks) and len(examples) == config.batch_size
        batch, _ = trainer._micro_batches()[0]
        names = trainer.unwrapped.config.vision_config.task_names
        assert batch["task_ids"].tolist() == [names.index(e["task"]) for e in examples]
        heads_before = {t: h.weight.detach().clone() for t, h in trainer.heads.items()}
        losses = []
        for step in range(2):
            trainer.step = step
            losses.append(trainer.train_step())
        assert all(math.isfinite(loss) for loss in losses)
        assert all(not torch.equal(heads_before[t], h.weight) for t, h in trainer.heads.items())
    finally:
        torch.set_num_threads(threads)
