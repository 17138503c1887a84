"""The task vocabulary saved with the weights (`vision_config.task_names`): a routed checkpoint routes
the same way whatever tasks a later process registers, or in which order."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from test_supernet import supernet_model

import ofa_ufo

ROUTED = ("caption", "grounding", "face", "vqa")  # one image and prompt, routed four ways

# A fresh process: optionally change the registry (a task registered ahead of the built-in ones, before or
# after loading; or the whole registry reversed), load the checkpoint, route ROUTED by the model's own
# vocabulary, save the logits and ids, print the registry order that process saw.
SCRIPT = """
import json, sys
import torch
import ofa_ufo
from ofa_ufo import tasks

mode, folder, routed = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
torch.set_num_threads(1)


def reorder(items):
    tasks._REGISTRY.clear()
    tasks._REGISTRY.update(items)


def register_first(name):
    tasks.register_task(tasks.Task(name))
    items = list(tasks._REGISTRY.items())
    reorder(items[-1:] + items[:-1])


if mode == "reversed":
    reorder(list(tasks._REGISTRY.items())[::-1])
if mode == "registered_before":
    register_first("my_task")
model = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(folder).eval()
if mode == "registered_after":
    register_first("my_task")
inputs = torch.load(f"{folder}/inputs.pt", weights_only=True)
ids = torch.tensor([model.config.vision_config.route_id(task) for task in routed])
with torch.no_grad():
    logits = model(**inputs, task_ids=ids, decoder_input_ids=torch.zeros(len(routed), 2, dtype=torch.long)).logits
torch.save({"logits": logits, "ids": ids}, f"{folder}/{mode}.pt")
print(json.dumps(ofa_ufo.list_tasks()))
"""


def _run(mode: str, folder) -> tuple[dict[str, torch.Tensor], list[str]]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(folder), ",".join(ROUTED)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    registry = json.loads(result.stdout.strip().splitlines()[-1])
    return torch.load(folder / f"{mode}.pt", weights_only=True), registry


@pytest.fixture(scope="module")
def checkpoint(processor, tmp_path_factory):
    """A tiny routed supernet (routers and experts differ per task) saved with one input repeated per
    route, and the logits a fresh process with the stock registry computes for it."""
    folder = tmp_path_factory.mktemp("routed")
    supernet_model(seed=3).save_pretrained(folder)
    image = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    batch = processor(images=[image] * len(ROUTED), text=[" what does the image describe?"] * len(ROUTED),
                      return_tensors="pt")
    torch.save({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")},
               folder / "inputs.pt")
    reference, registry = _run("reference", folder)
    return folder, reference, registry


def test_the_saved_routes_are_the_save_time_registry_order(checkpoint):
    folder, reference, registry = checkpoint
    saved = json.loads((folder / "config.json").read_text())["vision_config"]["task_names"]
    assert saved == registry
    assert reference["ids"].tolist() == [registry.index(task) for task in ROUTED]
    logits = reference["logits"]
    assert all((logits[i] - logits[0]).abs().max() > 1e-4 for i in range(1, len(ROUTED)))  # routes matter


@pytest.mark.parametrize("mode", ["registered_before", "registered_after", "reversed"])
def test_registry_changes_do_not_reroute_a_checkpoint(checkpoint, mode):
    folder, reference, stock = checkpoint
    outputs, registry = _run(mode, folder)
    assert registry != stock and any(registry.index(t) != stock.index(t) for t in ROUTED)  # old ids would move
    assert outputs["ids"].tolist() == reference["ids"].tolist()
    assert torch.equal(outputs["logits"], reference["logits"])


def test_a_task_outside_the_vocabulary_has_no_route(checkpoint):
    folder, _, _ = checkpoint
    vision = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(folder).config.vision_config
    with pytest.raises(ValueError, match="Unknown task 'segmentation' for this model.*caption"):
        vision.route_id("segmentation")
    assert vision.route_id("prompt") == vision.route_id("caption") == vision.task_names.index("caption")


def test_an_unregistered_task_in_the_checkpoint_is_named(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["task_names"] = ["caption", "segmentation", "vqa", "depth"]
    config["vision_config"]["supernet_num_tasks"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unregistered task\(s\) \['segmentation', 'depth'\]: register them"):
        ofa_ufo.OFAUFOConfig.from_pretrained(tmp_path)


def test_a_legacy_checkpoint_routes_by_todays_registry_order_with_a_warning(checkpoint, tmp_path):
    folder, reference, registry = checkpoint
    original = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(folder).eval()
    original.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vision_config"]["task_names"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no vision_config.task_names"):
        legacy = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert legacy.config.vision_config.task_names == ofa_ufo.list_tasks() == registry
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    ids = torch.tensor([ofa_ufo.list_tasks().index(task) for task in ROUTED])
    decoder = torch.zeros(len(ROUTED), 2, dtype=torch.long)
    with torch.no_grad():
        expected = original(**inputs, task_ids=ids, decoder_input_ids=decoder).logits
        routed = torch.tensor([legacy.config.vision_config.route_id(task) for task in ROUTED])
        assert torch.equal(legacy(**inputs, task_ids=routed, decoder_input_ids=decoder).logits, expected)


def test_a_legacy_supernet_with_fewer_routers_keeps_the_first_names():
    with pytest.warns(UserWarning, match="no vision_config.task_names"):
        vision = ofa_ufo.OFAUFOVisionConfig(supernet_layers=1, supernet_num_tasks=3)
    assert vision.task_names == ofa_ufo.list_tasks()[:3]
    with pytest.raises(ValueError, match="routes 99 tasks but only"):
        ofa_ufo.OFAUFOVisionConfig(supernet_layers=1, supernet_num_tasks=99)


def test_only_a_routed_legacy_config_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = ofa_ufo.OFAUFOVisionConfig()
        dense = ofa_ufo.OFAUFOVisionConfig(supernet_layers=1, supernet_routed=False, supernet_task="vqa")
    assert plain.task_names == ofa_ufo.list_tasks() and dense.task_names == ["vqa"]
    assert plain.route_id("grounding") == dense.route_id("grounding") == 0  # nothing routes on the id


def test_create_model_and_extract_subnet_write_the_vocabulary(tmp_path):
    supernet = supernet_model()
    supernet.save_pretrained(tmp_path / "supernet")
    ofa_ufo.extract_subnet(supernet, "grounding").save_pretrained(tmp_path / "subnet")
    plain = ofa_ufo.create_model("ofa_ufo_tiny", d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4)
    plain.save_pretrained(tmp_path / "plain")
    saved = {name: json.loads((tmp_path / name / "config.json").read_text())["vision_config"]
             for name in ("supernet", "subnet", "plain")}
    assert saved["supernet"]["task_names"] == saved["plain"]["task_names"] == ofa_ufo.list_tasks()
    assert saved["supernet"]["supernet_num_tasks"] == len(ofa_ufo.list_tasks())
    assert saved["subnet"]["task_names"] == ["grounding"] and saved["subnet"]["supernet_num_tasks"] == 1
