"""Embedding tasks (reid_person, reid_vehicle, face, product): the read-out through the pipeline,
routing per task on a supernet, CosFace and batch-hard triplet losses on hand-computed cases,
and a tiny training run with the feature heads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from transformers import pipeline

import ofa_ufo
from ofa_ufo.layers.metric_learning import (
    CosFaceHead,
    batch_hard_triplet_loss,
    cosface_logits,
    cosface_loss,
    pairwise_distances,
)
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.pk_sampler import PKSource

EMBEDDING_TASKS = ["reid_person", "reid_vehicle", "face", "product"]
SUPERNET = dict(supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8,
                supernet_elastic_heads=[2, 3, 4], supernet_elastic_depths=[1, 2])


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return pipeline("ofa-ufo", model=str(tiny_checkpoint))


# ---- inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", EMBEDDING_TASKS)
def test_pipeline_returns_a_normalised_embedding_of_d_model(pipe, task):
    result = pipe(_image(0), task=task)
    assert set(result) == {"embedding"}
    json.dumps(result)
    vector = np.asarray(result["embedding"])
    assert vector.shape == (TINY["d_model"],)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5


def test_embeddings_are_deterministic_and_batch_independent(pipe):
    images = [_image(0), _image(1), _image(2)]
    alone = [pipe(image, task="reid_person")["embedding"] for image in images]
    again = pipe(images[0], task="reid_person")["embedding"]
    batched = [r["embedding"] for r in pipe(images, task="reid_person", batch_size=3)]
    assert again == alone[0]
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(alone[0], alone[1])  # different images, different embeddings


def test_pipeline_embedding_is_the_model_read_out(pipe, model, processor):
    batch = processor(images=[_image(0)], text=[get_task("face").prompt()], return_tensors="pt")
    with torch.no_grad():
        direct = model.embed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                             image_mask=batch["image_mask"])  # (1, D)
        raw = model.embed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                          image_mask=batch["image_mask"], normalize=False)
    assert direct.shape == (1, TINY["d_model"])
    torch.testing.assert_close(direct, raw / raw.norm(dim=-1, keepdim=True))
    np.testing.assert_allclose(pipe(_image(0), task="face")["embedding"], direct[0].numpy(), atol=1e-5)


def test_text_generation_requests_on_an_embedding_task_are_clear_errors(pipe, model, processor):
    with pytest.raises(ValueError, match="'reid_person' returns an embedding, not text.*num_beams"):
        pipe(_image(0), task="reid_person", num_beams=3)
    with pytest.raises(ValueError, match="'product' returns an embedding, not text: it has no text generation"):
        get_task("product").generate_kwargs(model.config, processor.tokenizer, {})
    with pytest.raises(ValueError, match="'face' takes no text"):
        pipe(_image(0), task="face", text="who is it?")
    with pytest.raises(ValueError, match="'face' needs an input image: the `image` argument is None"):
        pipe(None, task="face")
    assert "takes no text" in pipe([_image(0)], task="face", text="who is it?")[0]["error"]


def test_prompts_exist_in_every_style():
    for style in ("ofa", "instruct"):
        prompts = {get_task(task).prompt(style=style) for task in EMBEDDING_TASKS}
        assert len(prompts) == 4 and all(p.startswith(" ") for p in prompts)
    assert get_task("reid_person").prompt() == " what is the identity of the person in the image?"


def test_tasks_have_their_allinone_settings_and_metrics():
    settings = {t: (get_task(t).cosface_scale, get_task(t).cosface_margin, get_task(t).triplet_weight > 0,
                    get_task(t).instances_per_identity, get_task(t).metric) for t in EMBEDDING_TASKS}
    assert settings == {"reid_person": (30.0, 0.2, True, 4, "reid"), "reid_vehicle": (20.0, 0.2, True, 4, "reid"),
                        "face": (50.0, 0.3, False, 0, "verification"), "product": (30.0, 0.2, True, 4, "recall@k")}
    routes = ofa_ufo.create_config("ofa_ufo_tiny_ufo", **TINY, vision_config=SUPERNET).vision_config
    ids = [routes.route_id(t) for t in EMBEDDING_TASKS]
    assert len(set(ids)) == 4 and min(ids) > routes.route_id("caption")


# ---- routing on a supernet ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def supernet(processor, tmp_path_factory):
    torch.manual_seed(0)
    model = ofa_ufo.create_model("ofa_ufo_tiny_ufo", **TINY, vision_config=SUPERNET).eval()
    path = tmp_path_factory.mktemp("ufo")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, path


def _embed(model, processor, task: str, ids: torch.Tensor | None = None) -> torch.Tensor:
    batch = processor(images=[_image(0)], text=[get_task(task).prompt()], return_tensors="pt")
    ids = torch.tensor([model.config.vision_config.route_id(task)]) if ids is None else ids
    with torch.no_grad():
        return model.embed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], ids,
                           batch["image_mask"])[0]


def test_each_task_routes_on_its_own_id(supernet, processor):
    model, path = supernet
    pipe = pipeline("ofa-ufo", model=str(path))
    for task in EMBEDDING_TASKS:  # the pipeline sends the task's id
        np.testing.assert_allclose(pipe(_image(0), task=task)["embedding"], _embed(model, processor, task).numpy(),
                                   atol=1e-5)
    # same prompt and image, only the task id differs: the route (task embedding, experts) changes the vector
    prompt_of_person = _embed(model, processor, "reid_person")
    vehicle = torch.tensor([model.config.vision_config.route_id("reid_vehicle")])
    routed_as_vehicle = _embed(model, processor, "reid_person", vehicle)
    assert (prompt_of_person - routed_as_vehicle).abs().max() > 1e-4


def test_image_readout_is_the_mean_image_token_and_keeps_metric_losses_out_of_shared_layers(processor):
    """embedding_readout="image": the embedding is the routed image tokens' mean before the text-image
    encoder, the same in training and at inference, and its losses train only the image side."""
    from ofa_ufo.training.mixture import build_batch
    from ofa_ufo.training.objectives import cross_entropy_and_features

    torch.manual_seed(0)
    model = ofa_ufo.create_model("ofa_ufo_tiny_ufo", **TINY, vision_config=SUPERNET, embedding_readout="image")
    model.eval()
    with torch.no_grad():
        for p in model.get_encoder().supernet.parameters():  # fresh blocks are the identity; make them route
            p.add_(0.05 * torch.randn_like(p))
    batch = processor(images=[_image(0), _image(1)], text=[get_task("face").prompt()] * 2, return_tensors="pt")
    ids = torch.tensor([model.config.vision_config.route_id("face")] * 2)
    with torch.no_grad():
        tokens, _ = model.get_encoder().embed_image(batch["pixel_values"], ids)  # (2, N, D)
        embedded = model.embed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], ids,
                               batch["image_mask"])
    torch.testing.assert_close(embedded, torch.nn.functional.normalize(tokens.mean(1), dim=-1))
    assert (_embed(model, processor, "face") - _embed(model, processor, "reid_person")).abs().max() > 1e-4

    rows = [{"id": str(i), "task": "face", "image": Image.fromarray(_image(i)), "meta": {"identity": i}}
            for i in range(2)]
    train_batch = build_batch(processor, rows, model.config)
    model.train()
    _, tokens_counted, features, _ = cross_entropy_and_features(model, train_batch, 0.0)
    assert tokens_counted == 0
    features.pow(2).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[n] is None or not grads[n].any() for n in grads
               if n.startswith(("model.encoder.layers.", "model.decoder.")))
    assert grads["model.encoder.image_proj.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".supernet." in n)
    with pytest.raises(ValueError, match="embedding_readout must be one of"):
        ofa_ufo.create_model("ofa_ufo_tiny", **TINY, embedding_readout="pooled")


def test_a_task_expert_changes_only_its_task(processor):
    torch.manual_seed(0)
    model = ofa_ufo.create_model("ofa_ufo_tiny_ufo", **TINY, vision_config=SUPERNET).eval()
    face, person = (model.config.vision_config.route_id(t) for t in ("face", "reid_person"))
    with torch.no_grad():
        for block in model.get_encoder().supernet.blocks:
            block.ffn.router[face] = torch.tensor([0.0, 1.0])  # face takes its own expert
            block.ffn.router[person] = torch.tensor([1.0, 0.0])  # person the shared one
    before = {t: _embed(model, processor, t) for t in ("face", "reid_person")}
    with torch.no_grad():
        for block in model.get_encoder().supernet.blocks:
            block.ffn.experts.fc2_bias[face] += torch.randn(block.ffn.experts.fc2_bias.shape[1])
    assert (_embed(model, processor, "face") - before["face"]).abs().max() > 1e-4
    torch.testing.assert_close(_embed(model, processor, "reid_person"), before["reid_person"])


# ---- losses on hand-computed cases ----------------------------------------------------------------

def test_cosface_logits_and_loss_by_hand():
    features = torch.tensor([[3.0, 0.0], [0.0, -2.0]])  # normalised: (1, 0), (0, -1)
    weight = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])  # normalised: (1, 0), (0, 1), (-1, 0)
    labels = torch.tensor([0, 1])
    logits = cosface_logits(features, weight, labels, scale=30.0, margin=0.2)
    # cosines [[1, 0, -1], [0, -1, 0]]; target cosine minus 0.2, all times 30
    expected = torch.tensor([[24.0, 0.0, -30.0], [0.0, -36.0, 0.0]])
    torch.testing.assert_close(logits, expected)
    loss = cosface_loss(features, weight, labels, scale=30.0, margin=0.2)
    by_hand = (-24 + math.log(math.exp(24) + 1 + math.exp(-30)) + 36 + math.log(2 + math.exp(-36))) / 2
    assert abs(loss.item() - by_hand) < 1e-5


def test_cosface_margin_lowers_exactly_the_target_logit_by_s_times_m():
    torch.manual_seed(0)
    features, weight, labels = torch.randn(5, 8), torch.randn(7, 8), torch.tensor([0, 3, 6, 3, 1])
    for task in EMBEDDING_TASKS:
        s, m = get_task(task).cosface_scale, get_task(task).cosface_margin
        gap = cosface_logits(features, weight, None, s, m) - cosface_logits(features, weight, labels, s, m)
        expected = torch.zeros(5, 7)
        expected[torch.arange(5), labels] = s * m
        torch.testing.assert_close(gap, expected)


def test_cosface_head_has_one_row_per_identity():
    head = CosFaceHead([("market", 7), ("market", 2), ("veri", 7)], dim=16, scale=30.0, margin=0.2)
    assert head.weight.shape == (3, 16) and head.weight.std() < 0.01
    assert head.labels([("veri", 7), ("market", 7)]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not among the head's 3 classes"):
        head.labels([("market", 99)])


def test_identity_classifier_names_the_nearest_class_and_round_trips(tmp_path):
    """Features whose BNNeck output is a class row are classified as that class; the exported file
    gives the same answers; names carry the dataset prefix."""
    from ofa_ufo.tasks.identities import IdentityClassifier, identity_label, load_identities, save_identities

    head = CosFaceHead([("market", "a"), ("market", "b"), (None, "c")], dim=8, scale=30.0, margin=0.2).eval()
    with torch.no_grad():
        head.weight.copy_(torch.eye(8)[:3] * 2.0)
        head.neck.running_mean.copy_(torch.linspace(-1, 1, 8))
        head.neck.running_var.copy_(torch.linspace(0.5, 2.0, 8))
    classifier = IdentityClassifier.from_head(head)
    labels = classifier.labels
    assert labels == ["market/a", "market/b", "c"]
    assert identity_label(("market", 7)) == "market/7" and identity_label((None, 7)) == "7"
    neck = head.neck
    rows = head.weight.detach()[[2, 0]]
    features = (rows - neck.bias) / neck.weight * torch.sqrt(neck.running_var + neck.eps) + neck.running_mean
    top = classifier.classify(features, top_k=2)
    assert [row[0][0] for row in top] == ["c", "market/a"]
    assert top[0][0][1] == pytest.approx(math.exp(30) / (math.exp(30) + 2), rel=1e-5)  # cosines 1, 0, 0
    assert top[0][0][1] > top[0][1][1]
    save_identities(tmp_path, {"face": classifier})
    loaded = load_identities(tmp_path)["face"]
    assert loaded.labels == labels and loaded.classify(features, top_k=2) == top
    assert load_identities(tmp_path / "elsewhere") == {}
    with pytest.raises(ValueError, match="do not match 8-dim"):
        classifier.classify(torch.zeros(1, 4))


def test_identify_needs_exported_identities_and_a_valid_count(pipe):
    with pytest.raises(ValueError, match="identify=True needs the closed set of identities task 'face'"):
        pipe(_image(0), task="face", identify=True)
    with pytest.raises(ValueError, match="identify must be True or a positive number"):
        pipe(_image(0), task="face", identify="yes")
    assert set(pipe(_image(0), task="face", identify=False)) == {"embedding"}


def test_cosface_head_bnneck_standardises_over_the_batch():
    torch.manual_seed(0)
    features, labels = torch.randn(6, 8) * 0.01 + 3.0, torch.tensor([0, 1, 2, 0, 1, 2])  # a constant part dominates
    head = CosFaceHead(["a", "b", "c"], dim=8, scale=30.0, margin=0.2).train()
    exact = features.double()  # by hand in float64: BatchNorm1d's biased batch variance and eps
    mean, var = exact.mean(0), exact.var(0, unbiased=False)
    standardised = (exact - mean) / torch.sqrt(var + head.neck.eps)
    expected = cosface_loss(standardised, head.weight.double(), labels, 30.0, 0.2).float()
    loss = head(features, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)  # float32 keeps ~1e-3 of a 0.01 spread
    assert not torch.allclose(expected, cosface_loss(features, head.weight, labels, 30.0, 0.2))
    assert head.neck.bias.requires_grad is False and head.neck.weight.requires_grad is True
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    loss.backward()
    optimizer.step()
    assert head.neck.bias.grad is None and torch.equal(head.neck.bias, torch.zeros(8))
    assert head.neck.weight.grad is not None  # the neck's scale trains
    running_mean, running_var = head.neck.running_mean.clone(), head.neck.running_var.clone()
    assert running_mean.abs().max() > 0.1  # the batch above updated the running statistics
    row = features[:1]
    single = head(row, labels[:1])  # one row in train mode: the running statistics, no error
    by_running = (row - running_mean) / torch.sqrt(running_var + head.neck.eps) * head.neck.weight.detach()
    torch.testing.assert_close(single, cosface_loss(by_running, head.weight, labels[:1], 30.0, 0.2))
    torch.testing.assert_close(head.neck.running_mean, running_mean)  # and leaves them unchanged
    plain = CosFaceHead(["a", "b", "c"], dim=8, scale=30.0, margin=0.2, neck=False)
    assert plain.neck is None
    torch.testing.assert_close(plain(features, labels), cosface_loss(features, plain.weight, labels, 30.0, 0.2))


def test_triplet_picks_the_hardest_positive_and_negative():
    # 1-D features; identities a a a b b b. Distances are |x_i - x_j|.
    features = torch.tensor([[0.0], [1.0], [4.0], [5.0], [6.0], [9.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # anchor 0: hardest positive 4 (to 4.0), hardest negative 5 (to 5.0) -> gap -1
    # anchor 1: positive 3, negative 4 -> -1;  anchor 2: positive 4, negative 1 -> 3
    # anchor 3: positive 4 (to 9), negative 1 (to 4) -> 3;  anchor 4: 3, 2 -> 1;  anchor 5: 4, 5 -> -1
    gaps = torch.tensor([-1.0, -1.0, 3.0, 3.0, 1.0, -1.0])
    soft = batch_hard_triplet_loss(features, labels)
    torch.testing.assert_close(soft, torch.log1p(torch.exp(gaps)).mean())
    hinge = batch_hard_triplet_loss(features, labels, margin=0.3)
    torch.testing.assert_close(hinge, torch.tensor((0 + 0 + 3.3 + 3.3 + 1.3 + 0) / 6))


def test_triplet_skips_anchors_without_a_positive_and_has_finite_gradients():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])  # anchor 2 has no positive: left out
    loss = batch_hard_triplet_loss(features, labels)
    # anchor 0: d_ap 5, d_an 1; anchor 1: d_ap 5, d_an sqrt(9 + 9)
    expected = (math.log1p(math.exp(5 - 1)) + math.log1p(math.exp(5 - math.sqrt(18)))) / 2
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert torch.isfinite(features.grad).all()
    lonely = batch_hard_triplet_loss(torch.ones(2, 3, requires_grad=True), torch.tensor([0, 1]))
    assert lonely.item() == 0.0 and lonely.requires_grad
    torch.testing.assert_close(pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]])),
                               torch.tensor([[1e-6, 5.0], [5.0, 1e-6]]))


def test_pk_source_draws_whole_identity_chunks():
    identities = [i % 5 for i in range(23)]  # 5 identities with 4 or 5 images
    source = PKSource("reid_person", [{"i": i} for i in range(23)], identities, k=4, seed=0)
    assert len(source) == 20  # each identity: one chunk of 4 per epoch
    for start in range(0, 3 * len(source), 4):
        chunk = [identities[source.draw(start + j)["i"]] for j in range(4)]
        assert len(set(chunk)) == 1
    first = [source.draw(i)["i"] for i in range(20)]
    assert sorted({identities[i] for i in first}) == [0, 1, 2, 3, 4]


# ---- training -------------------------------------------------------------------------------------

def _identity_rows(tmp_path, identities: int = 3, per_identity: int = 4) -> list[dict]:
    rows = []
    for person in range(identities):
        color = np.array([80 * person, 255 - 80 * person, 128], dtype=np.uint8)
        for k in range(per_identity):
            noise = np.random.default_rng(10 * person + k).integers(0, 40, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(np.clip(color + noise, 0, 255).astype(np.uint8)).save(tmp_path / f"p{person}_{k}.png")
            rows.append({"id": f"p{person}_{k}", "task": "reid_person", "image": f"p{person}_{k}.png",
                         "meta": {"dataset": "toy", "identity": person, "camera": k % 2, "split": "train"}})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_training_features_are_the_inference_read_out(model, processor, tmp_path):
    from ofa_ufo.training.mixture import build_batch
    from ofa_ufo.training.objectives import cross_entropy_and_features

    rows = _identity_rows(tmp_path, identities=1, per_identity=2)
    examples = [{**row, "image": Image.open(tmp_path / row["image"]).convert("RGB")} for row in rows]
    caption = {"id": "c", "task": "caption", "image": examples[0]["image"], "target": "a picture of a thing"}
    batch = build_batch(processor, [caption, *examples], model.config)
    assert (batch["labels"][1:] == -100).all() and (batch["labels"][0] != -100).any()
    with torch.no_grad():
        _, tokens, features, _ = cross_entropy_and_features(model, batch, 0.0)
        alone = processor(images=[e["image"] for e in examples], text=[get_task("reid_person").prompt()] * 2,
                          return_tensors="pt")
        direct = model.embed(alone["pixel_values"], alone["input_ids"], alone["attention_mask"],
                             image_mask=alone["image_mask"], normalize=False)
    assert tokens == int((batch["labels"][0] != -100).sum())
    torch.testing.assert_close(features[1:], direct, atol=1e-4, rtol=1e-4)


def test_a_mixed_run_trains_the_cosface_head_and_checkpoints_it(tmp_path):
    from ofa_ufo.training import Trainer
    from ofa_ufo.training.config import config_from_dict

    rows = _identity_rows(tmp_path)
    data = _write_jsonl(tmp_path / "reid.jsonl", rows)
    held_out = [{**row, "meta": {**row["meta"], "split": "query" if row["meta"]["camera"] else "gallery"}}
                for row in rows]
    eval_data = _write_jsonl(tmp_path / "reid_eval.jsonl", held_out)
    threads = torch.get_num_threads()
    try:
        config = config_from_dict(dict(
            model_overrides=dict(TINY), tasks={"reid_person": 7, "vqa": 1}, data={"reid_person": str(data)},
            eval_data={"reid_person": str(eval_data)}, batch_size=10, max_steps=2, eval_examples=12,
            demo_train_scenes=4, num_threads=1, lr=1e-3, output_dir=str(tmp_path / "run")), "test")
        trainer = Trainer(config, resume="never")
        assert trainer.mixture.quotas == {"reid_person": 8, "vqa": 2}
        assert set(trainer.heads) == {"reid_person"} and trainer.heads["reid_person"].weight.shape == (3, 32)
        start = trainer.heads["reid_person"].weight.detach().clone()
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert {"rank1", "mAP"} <= set(result.metrics_after["reid_person"])  # scored on query vs gallery
    assert not torch.equal(trainer.heads["reid_person"].weight.detach(), start)
    saved = torch.load(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "trainer_state.pt",
                       weights_only=True)
    torch.testing.assert_close(saved["heads"]["reid_person.weight"], trainer.heads["reid_person"].weight.detach())


def test_embedding_task_data_errors(tmp_path):
    from ofa_ufo.data import DemoScenes
    from ofa_ufo.training import ConfigError, Trainer
    from ofa_ufo.training.config import config_from_dict
    from ofa_ufo.training.mixture import DemoSource

    base = dict(model_overrides=dict(TINY), tasks={"reid_person": 1}, batch_size=8, max_steps=1, eval_examples=0,
                demo_train_scenes=4, num_threads=1, output_dir=str(tmp_path / "run"))
    threads = torch.get_num_threads()
    try:
        scenes = DemoSource("reid_person", DemoScenes("train", 4, seed=0), seed=0)  # scenes have no identities
        with pytest.raises(ValueError, match="'reid_person' trains on identity-labelled data, not demo scenes"):
            ofa_ufo.get_task("reid_person").training_source(scenes, seed=0, options={})
        data = _write_jsonl(tmp_path / "reid.jsonl", _identity_rows(tmp_path, identities=2))
        with pytest.raises(ConfigError, match="chunks of K=4 but gets 6 samples"):
            Trainer(config_from_dict({**base, "batch_size": 6, "data": {"reid_person": str(data)}}, "test"),
                    resume="never")
    finally:
        torch.set_num_threads(threads)
