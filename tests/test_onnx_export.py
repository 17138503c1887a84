"""ONNX export (`ofa_ufo.deploy.onnx_export`) and generation over ONNX Runtime (`ofa_ufo.deploy.ort_model`).

The model is the caption subnet of a tiny routed UFO supernet whose routers and experts are randomised
(so the caption route is not the shared default), exported once per module through `ofa-ufo export
--task caption` (the subnet is extracted on the fly). Parity is checked against `extract_subnet` run
in PyTorch: logits within 1e-4, identical greedy and beam-5 tokens, identical pipeline answers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, pipeline

import ofa_ufo
from ofa_ufo.cli.main import main
from ofa_ufo.core.timing import cpu_name
from ofa_ufo.deploy.onnx_export import export_onnx, load_onnx_model, quantize_int8
from ofa_ufo.deploy.ort_model import OFAUFOOnnxForConditionalGeneration, OnnxStepCache, check_processor
from ofa_ufo.export import main as export_main

SUPERNET = dict(supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0)
SMALL_TABLES = dict(max_position_embeddings=64, image_bucket_size=4)  # 64 px -> a 4x4 grid; smaller graphs
GRAPHS = ("encoder_model.onnx", "decoder_with_past_model.onnx")


@pytest.fixture(scope="module")
def routed():
    model = tiny_model(0, vision_config=SUPERNET, **SMALL_TABLES)
    with torch.no_grad():
        for block in model.get_encoder().supernet.blocks:
            block.ffn.router.normal_()
            block.ffn.experts.fc2_weight.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def exported(routed, processor, tmp_path_factory):
    """The supernet saved, exported by the command line with --task caption, and the PyTorch subnet."""
    root = tmp_path_factory.mktemp("onnx_export")
    routed.save_pretrained(root / "supernet")
    processor.save_pretrained(root / "supernet")
    argv = ["export", "--model", str(root / "supernet"), "--task", "caption", "--format", "onnx",
            "--output", str(root / "onnx")]
    assert main(argv) == 0
    dense = ofa_ufo.extract_subnet(routed, "caption").eval()
    dense.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    return SimpleNamespace(root=root, onnx=root / "onnx", dense=dense)


@pytest.fixture(scope="module")
def onnx_model(exported):
    return AutoModelForSeq2SeqLM.from_pretrained(exported.onnx)


@pytest.fixture(scope="module")
def inputs(processor):
    """Three rows: prompts of different lengths (padding), the middle one without an image."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(images=[images[0], None, images[1]],
                      text=[" what does the image describe?", " hi", " what is in the corner of the picture?"])
    return dict(batch)


def test_the_command_writes_the_published_layout(exported):
    files = {p.name for p in exported.onnx.iterdir()}
    assert {*GRAPHS, "config.json", "generation_config.json", "onnx_manifest.json", "processor_config.json"} <= files
    assert json.loads((exported.onnx / "config.json").read_text())["model_type"] == "ofa-ufo-onnx"
    manifest = json.loads((exported.onnx / "onnx_manifest.json").read_text())
    assert (manifest["precision"], manifest["opset"], manifest["task"]) == ("fp32", 17, "caption")
    assert manifest["exported_with"]["cpu"] == cpu_name()
    assert manifest["source_model"] == str(exported.root / "supernet")
    encoder = onnx.load(str(exported.onnx / GRAPHS[0]), load_external_data=False).graph
    decoder = onnx.load(str(exported.onnx / GRAPHS[1]), load_external_data=False).graph
    assert [i.name for i in encoder.input] == manifest["graphs"]["encoder"]["inputs"] == [
        "input_ids", "attention_mask", "pixel_values", "image_mask"]
    assert [o.name for o in decoder.output] == manifest["graphs"]["decoder_with_past"]["outputs"] == [
        "logits", "present.0.decoder.key", "present.0.decoder.value",
        "present.1.decoder.key", "present.1.decoder.value"]
    assert [i.name for i in decoder.input][:4] == ["input_ids", "encoder_padding_mask", "cross_position_keys",
                                                   "past_key_values.0.decoder.key"]

    def dims(graph, name):
        value = next(v for v in graph.input if v.name == name)
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(encoder, "input_ids") == ["batch", "prompt_length"]  # dynamic batch and length
    assert dims(encoder, "pixel_values") == ["batch", 3, 64, 64]  # the processor's image size
    assert dims(decoder, "input_ids") == ["rows", 1]  # one new token per step
    assert dims(decoder, "past_key_values.0.decoder.key") == ["rows", 4, "past_length", 8]
    assert dims(decoder, "past_key_values.0.encoder.key") == ["batch", 4, "source_length", 8]


def test_fp32_logits_match_pytorch(exported, onnx_model, inputs):
    assert isinstance(onnx_model, OFAUFOOnnxForConditionalGeneration)
    decoder = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12], [0, 50, 60, 70, 2]])
    with torch.no_grad():
        expected = exported.dense(**inputs, decoder_input_ids=decoder, use_cache=False).logits
        got = onnx_model(**inputs, decoder_input_ids=decoder, use_cache=False).logits
    assert got.shape == expected.shape == (3, 5, exported.dense.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    text_only = {k: inputs[k] for k in ("input_ids", "attention_mask")}  # PyTorch then builds no image tokens
    with torch.no_grad():
        expected = exported.dense(**text_only, decoder_input_ids=decoder, use_cache=False).logits
        got = onnx_model(**text_only, decoder_input_ids=decoder).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 5])
def test_greedy_and_beam_tokens_match_pytorch(exported, onnx_model, inputs, num_beams):
    settings = dict(num_beams=num_beams, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = exported.dense.generate(**inputs, **settings)
        got = onnx_model.generate(**inputs, **settings)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert got.sequences.shape == (3, 9)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), atol=1e-4, rtol=0)


def test_pipeline_serves_the_onnx_directory(exported):
    from_onnx = pipeline("ofa-ufo", model=str(exported.onnx))
    from_torch = pipeline("ofa-ufo", model=str(exported.root / "dense"))
    assert isinstance(from_onnx.model, OFAUFOOnnxForConditionalGeneration)
    image = np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    for task, text in (("caption", None), ("vqa", "what color is it?"), ("itm", "a red circle")):
        got, expected = from_onnx(image, task=task, text=text, max_new_tokens=5), from_torch(
            image, task=task, text=text, max_new_tokens=5)
        assert got.keys() == expected.keys()
        if "text" in expected:
            assert got["text"] == expected["text"]
        assert got["score"] == pytest.approx(expected["score"], rel=1e-3)


def test_routed_supernet_needs_a_task(exported, routed, processor, tmp_path, capsys):
    with pytest.raises(ValueError, match="routed UFO supernet.*Extract a subnet first.*--task grounding"):
        export_onnx(routed, tmp_path / "out", processor)
    assert not (tmp_path / "out" / GRAPHS[0]).exists()
    assert main(["export", "--model", str(exported.root / "supernet"), "--output", str(tmp_path / "cli")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert last.startswith("export: error: the model is a routed UFO supernet") and "--task grounding" in last


def test_a_processor_that_does_not_match_the_graph_is_named(exported, onnx_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported.onnx, copy, ignore=shutil.ignore_patterns("*.onnx"))
    for name in GRAPHS:  # the graphs are only read: links save copying them
        os.link(exported.onnx / name, copy / name)
    ofa_ufo.create_processor("ofa_ufo_tiny", image_size=96).save_pretrained(copy)
    with pytest.raises(ValueError, match="'pixel_values'.* 64x64 px .* 96x96"):
        AutoModelForSeq2SeqLM.from_pretrained(copy)
    size = SimpleNamespace(size=64)
    with pytest.raises(ValueError, match="needs input 'image_mask'"):
        check_processor(onnx_model, SimpleNamespace(model_input_names=["input_ids", "attention_mask", "pixel_values"],
                                                    image_processor=size))
    with pytest.raises(ValueError, match="gives input 'task_ids'"):
        check_processor(onnx_model, SimpleNamespace(model_input_names=[*onnx_model.manifest["graphs"]["encoder"][
            "inputs"], "task_ids"], image_processor=size))


def test_what_the_graphs_do_not_cover_is_refused(onnx_model, inputs):
    with pytest.raises(NotImplementedError, match="code_grid"):
        onnx_model(**inputs, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long), code_grid=8)
    with pytest.raises(NotImplementedError, match="embedding"):
        onnx_model.embed(inputs["pixel_values"], inputs["input_ids"])


def test_int8_graphs_quantise_the_weights_and_track_fp32(exported, onnx_model, inputs, tmp_path):
    int8 = tmp_path / "int8"
    shutil.copytree(exported.onnx, int8, ignore=shutil.ignore_patterns("*.onnx"))
    for name in GRAPHS:
        quantize_int8(exported.onnx / name, int8 / name)
    decoder = onnx.load(str(int8 / GRAPHS[1])).graph
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in decoder.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in decoder.initializer)
    assert (int8 / GRAPHS[1]).stat().st_size < 0.5 * (exported.onnx / GRAPHS[1]).stat().st_size
    quantized = AutoModelForSeq2SeqLM.from_pretrained(int8)
    tokens = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12], [0, 50, 60, 70, 2]])
    with torch.no_grad():
        reference = onnx_model(**inputs, decoder_input_ids=tokens, use_cache=False).logits.flatten()
        got = quantized(**inputs, decoder_input_ids=tokens, use_cache=False).logits.flatten()
    assert not torch.equal(got, reference)  # really another graph
    assert torch.corrcoef(torch.stack([got, reference]))[0, 1] > 0.9


def test_the_int8_head_rescores_its_top_logits_in_fp32(exported, inputs, tmp_path):
    """Only the output projection quantised (the decoder layers stay fp32, so the graph's states are the
    PyTorch model's), on a model whose final bias points at token 100 with token 101 a near twin: the
    two best logits of every row are these, their values and order the fp32 ones; the rest are int8's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ofa_ufo.deploy import onnx_export

    dense = copy.deepcopy(exported.dense)
    with torch.no_grad():
        table = dense.lm_head.weight  # (V, D), tied to the input embedding
        table[101] = table[100] + 1e-3 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
        dense.model.decoder.layer_norm.bias.copy_(40 * table[100] / table[100].norm())
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    # a copy, as export_onnx does: the exporter's graph passes change weights in place
    onnx_export._export_graphs(copy.deepcopy(dense), 64, graphs, 17, int8_head=True)
    config = dense.config
    decoder = onnx.load(str(graphs / GRAPHS[1])).graph
    tables = {t.name for t in decoder.initializer if list(t.dims) == [config.d_model, config.vocab_size]}
    head = [n.name for n in decoder.node if n.op_type == "MatMul" and n.input[1] in tables]
    assert len(head) == 1  # the projection's own (D, V) copy, not the tied embedding
    int8 = tmp_path / "int8"
    shutil.copytree(exported.onnx, int8, ignore=shutil.ignore_patterns("*.onnx"))
    shutil.copy(graphs / GRAPHS[0], int8 / GRAPHS[0])
    others = [n.name for n in decoder.node if n.op_type == "MatMul" and n.name not in head]
    quantize_dynamic(str(graphs / GRAPHS[1]), str(int8 / GRAPHS[1]), nodes_to_exclude=others,
                     op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True)
    tokens = torch.tensor([[0, 5, 6, 7], [0, 9, 10, 11], [0, 50, 60, 2]])
    with torch.no_grad():
        reference = dense(**inputs, decoder_input_ids=tokens, use_cache=False).logits  # (3, 4, V)
        got = AutoModelForSeq2SeqLM.from_pretrained(int8)(**inputs, decoder_input_ids=tokens).logits
    best = reference.topk(2, dim=-1).indices
    assert set(best.flatten().tolist()) == {100, 101}
    assert torch.equal(got.topk(2, dim=-1).indices, best)
    torch.testing.assert_close(got.gather(-1, best), reference.gather(-1, best), atol=1e-4, rtol=0)
    assert (got - reference).abs().max() > 1e-3  # really int8 outside the top


def test_int8_export_with_calibration_images_quantises_the_convolutions(exported, processor, inputs, tmp_path):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    output = export_onnx(exported.dense, tmp_path / "int8", processor, quantize="int8", calibration=images)
    assert json.loads((output / "onnx_manifest.json").read_text())["calibration_images"] == 3
    encoder = onnx.load(str(output / GRAPHS[0])).graph
    produced_by = {o: n.op_type for n in encoder.node for o in n.output}
    convs = [n for n in encoder.node if n.op_type == "Conv"]
    assert convs and all(produced_by.get(n.input[0]) == "DequantizeLinear" for n in convs)  # int8 activations
    assert all(produced_by.get(n.input[1]) == "DequantizeLinear" for n in convs)  # and int8 weights
    decoder = onnx.load(str(output / GRAPHS[1])).graph
    config = exported.dense.config
    tables = {t.name for t in decoder.initializer if np.prod(t.dims) == config.d_model * config.vocab_size}
    # no step dequantises a whole (V, D) table: the projection is an int8 MatMul of its own copy
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in tables for n in decoder.node)
    quantized = AutoModelForSeq2SeqLM.from_pretrained(output)
    with torch.no_grad():
        reference = exported.dense.get_encoder()(**{k: v for k, v in inputs.items()}).last_hidden_state.flatten()
        got = quantized.get_encoder()(**inputs).last_hidden_state.flatten()
    assert torch.corrcoef(torch.stack([got, reference]))[0, 1] > 0.9
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(exported.dense, tmp_path / "fp32", processor, calibration=images)
    with pytest.raises(ValueError, match="at least one"):
        export_onnx(exported.dense, tmp_path / "none", processor, quantize="int8", calibration=[])


@pytest.mark.slow
def test_int8_exports_from_the_module_command_and_without_a_processor(exported, inputs, tmp_path, capsys):
    output = tmp_path / "int8"
    argv = ["--model", str(exported.root / "dense"), "--format", "onnx", "--output", str(output), "--quantize", "int8"]
    assert export_main(argv) == 0
    assert "int8" in capsys.readouterr().out
    assert json.loads((output / "onnx_manifest.json").read_text())["precision"] == "int8"
    result = pipeline("ofa-ufo", model=str(output))(np.zeros((16, 16, 3), np.uint8), task="caption", max_new_tokens=4)
    assert isinstance(result["text"], str) and 0 <= result["score"] <= 1
    bare = export_onnx(exported.dense, tmp_path / "bare")  # graphs at config.image_size, no processor files
    assert not (bare / "processor_config.json").exists()
    assert json.loads((bare / "onnx_manifest.json").read_text())["image_size"] == 64
    with torch.no_grad():
        expected = exported.dense.generate(**inputs, num_beams=5, max_new_tokens=6)
        assert load_onnx_model(bare).generate(**inputs, num_beams=5, max_new_tokens=6).tolist() == expected.tolist()


SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Concat")


def test_simplified_graphs_fold_the_shape_arithmetic_and_keep_the_logits(exported, onnx_model, inputs, tmp_path):
    """The default export runs onnxslim over the traced graphs: the reshape targets the tracer computes at
    run time become constants, the logits stay those of the graphs as traced."""
    plain = export_onnx(exported.dense, tmp_path / "plain", simplify=False)
    manifests = [json.loads((d / "onnx_manifest.json").read_text()) for d in (exported.onnx, plain)]
    assert [m["simplified"] for m in manifests] == [True, False]
    assert ["onnxslim" in m["exported_with"] for m in manifests] == [True, False]
    counts = []
    for directory in (exported.onnx, plain):
        nodes = onnx.load(str(directory / GRAPHS[1]), load_external_data=False).graph.node
        counts.append(sum(node.op_type in SHAPE_OPS for node in nodes))
    print("shape nodes in the decoder step graph (simplified, as traced):", counts)
    assert counts[0] < 0.5 * counts[1]
    decoder = torch.tensor([[0, 5, 9]] * 3)
    with torch.no_grad():
        expected = load_onnx_model(plain)(**inputs, decoder_input_ids=decoder, use_cache=False).logits
        got = onnx_model(**inputs, decoder_input_ids=decoder, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_step_cache_reorders_its_rows_for_beam_search():
    """Beam search hands the cache the beams that continue: row i of each array becomes row beam_idx[i]."""
    key = np.arange(3 * 2 * 4 * 1, dtype=np.float32).reshape(3, 2, 4, 1)  # (rows, heads, past, head dim)
    cache = OnnxStepCache([key, key + 100])
    assert (len(cache), cache.get_seq_length()) == (1, 4)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.arrays[0][:, 0, 0, 0].tolist() == [16.0, 16.0, 0.0]  # the first element of rows 2, 2 and 0
    assert cache.arrays[1][:, 0, 0, 0].tolist() == [116.0, 116.0, 100.0]
    assert (len(OnnxStepCache()), OnnxStepCache().get_seq_length()) == (0, 0)
