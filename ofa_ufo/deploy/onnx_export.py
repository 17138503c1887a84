"""Export a (dense, per-task) OFA-UFO model to ONNX: an encoder graph and a decoder step graph with a
self-attention cache, optionally int8-quantised with ONNX Runtime's `quantize_dynamic`.

    export_onnx(model, "caption_onnx/", processor)                     # fp32
    export_onnx(model, "caption_int8/", processor, quantize="int8")    # int8 weights, dynamic activations
    export_onnx(supernet, "grounding_onnx/", processor, task="grounding")   # extracts the subnet first
    model = load_onnx_model("caption_onnx/")                           # generate() over ONNX Runtime

The graphs come from the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) tracing the
model's own encoder and decoder code, so there is no second implementation of the model to keep in
step. Tracing freezes Python branches, so the example inputs are chosen to take the general path of
each: a padded prompt (the padding bias is always added, zero where nothing is padded), a past of
2 tokens (the cache length read from its shape; 0 works at run time) and 2 decoder rows per encoder
row (beams fold onto their input's encoder row; 1 row per input is the same computation).
`ofa_ufo.deploy.ort_model` runs the result.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.cache_utils import DynamicCache

from ofa_ufo.core.timing import cpu_name
from ofa_ufo.deploy.ort_model import (
    DECODER_FILE,
    ENCODER_FILE,
    MANIFEST_FILE,
    OFAUFOOnnxConfig,
    OFAUFOOnnxForConditionalGeneration,
    decoder_input_names,
    decoder_output_names,
    encoder_input_names,
    encoder_output_names,
)
from ofa_ufo.deploy.subnets import extract_subnet
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.layers.kv_cache import OFAUFOCache
from ofa_ufo.layers.position import split_heads
from ofa_ufo.models.ofa import OFAUFOEncoderOutput
from ofa_ufo.tasks import get_task

__all__ = ["DEFAULT_OPSET", "QUANTIZATIONS", "calibration_feeds", "export_onnx", "load_onnx_model", "quantize_int8",
           "simplify_graph"]

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; ONNX Runtime 1.16+ runs it
RESCORE_TOP = 16  # logits per row an int8 decoder graph computes again in fp32 (more than beam search's 2 x 5)
QUANTIZATIONS = ("int8",)


class _EncoderGraph(nn.Module):
    """Processor inputs -> encoder states, padding mask, and what every decoder step would otherwise
    recompute from them: the cross-attention position keys and each layer's cross-attention K/V."""

    def __init__(self, model: OFAUFOForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.model.encoder(input_ids, attention_mask, pixel_values, image_mask)
        decoder = self.model.model.decoder
        memory = out.last_hidden_state  # (B, S, D)
        position_keys = split_heads(decoder.cross_pos_k_linear(out.position_embeddings), decoder.num_heads)
        cross = []
        for layer in decoder.layers:  # the projections OFAAttention caches on the first step
            attention = layer.cross_attn
            cross += [split_heads(attention.k_proj(memory), attention.num_heads),
                      split_heads(attention.v_proj(memory), attention.num_heads)]  # (B, H, S, D/H) each
        return (memory, out.padding_mask, position_keys, *cross)


class _DecoderStepGraph(nn.Module):
    """One decoder step: new tokens (R, 1) + past self-attention K/V (R, H, P, D/H) + the encoder graph's
    outputs -> logits (R, 1, V) and present K/V (R, H, P + 1, D/H), through the model's own decoder.

    `int8_head`: the graph is for `quantize_int8`. The output projection multiplies its own copy of the
    tied embedding, stored (D, V), which the quantiser turns into an int8 MatMul (given the embedding
    itself, which a Gather reads too, it would dequantise all V x D of it at every step before an fp32
    Gemm). An int8 projection decides near ties between tokens by its rounding (a weak demo model's
    "red" vs "green" flipped on 8 of 40 questions), so the `RESCORE_TOP` best logits of each row are
    then computed again in fp32 from the embedding's rows: the choice among the top candidates is the
    fp32 model's, at the cost of K x D multiply-adds per row instead of V x D."""

    def __init__(self, model: OFAUFOForConditionalGeneration, int8_head: bool = False) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.decoder_layers
        self.head = nn.Parameter(model.lm_head.weight.detach().t().contiguous()) if int8_head else None  # (D, V)

    def forward(self, input_ids: torch.Tensor, encoder_padding_mask: torch.Tensor, cross_position_keys: torch.Tensor,
                *key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past, cross = key_values[: 2 * self.layers], key_values[2 * self.layers :]
        cache = OFAUFOCache(_filled(past), _filled(cross))
        cache.is_updated = {i: True for i in range(self.layers)}  # cross K/V are given: never recomputed
        # The decoder reads the encoder states' row count and device only once cross K/V are cached;
        # the padding mask (B, S) stands in for them, so the graph takes no unused (B, S, D) input.
        encoder_outputs = OFAUFOEncoderOutput(last_hidden_state=encoder_padding_mask, padding_mask=encoder_padding_mask,
                                              cross_position_keys=cross_position_keys)
        states = self.model.model.decoder(input_ids, encoder_outputs, cache)  # (R, 1, D)
        present = [t for layer in cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
        if self.head is None:
            return (self.model.project(states), *present)
        approximate = states @ self.head  # (R, 1, V), int8 once quantised
        top = approximate.topk(min(RESCORE_TOP, approximate.shape[-1]), dim=-1).indices  # (R, 1, K)
        rows = nn.functional.embedding(top, self.model.lm_head.weight)  # (R, 1, K, D) fp32
        exact = (rows @ states.unsqueeze(-1)).squeeze(-1)  # (R, 1, K, D) @ (R, 1, D, 1) -> (R, 1, K)
        return (approximate.scatter(-1, top, exact), *present)


def _filled(key_values: tuple[torch.Tensor, ...]) -> DynamicCache:
    """A cache holding the given per-layer key, value pairs."""
    return DynamicCache([(key_values[i], key_values[i + 1]) for i in range(0, len(key_values), 2)])


def _example_inputs(model: OFAUFOForConditionalGeneration,
                    image_size: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Tracing inputs that take the general branch everywhere (see the module docstring)."""
    config = model.config
    words = [config.bos_token_id, 100, 200, 300, 400, config.eos_token_id]
    input_ids = torch.tensor([words, words[:2] + [config.eos_token_id] + [config.pad_token_id] * 3])  # row 2 padded
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.rand(2, 3, image_size, image_size, generator=generator) * 2 - 1  # (B, 3, S, S) in [-1, 1]
    image_mask = torch.ones(2, dtype=torch.bool)
    encoder_inputs = (input_ids, input_ids.ne(config.pad_token_id).long(), pixel_values, image_mask)
    with torch.no_grad():
        encoded = _EncoderGraph(model)(*encoder_inputs)
    heads = config.decoder_attention_heads
    rows, past = 2 * input_ids.shape[0], 2
    past_kv = [torch.randn(rows, heads, past, config.d_model // heads, generator=generator)
               for _ in range(2 * config.decoder_layers)]
    tokens = torch.full((rows, 1), 100, dtype=torch.long)
    return encoder_inputs, (tokens, encoded[1], encoded[2], *past_kv, *encoded[3:])


def _dynamic_axes(layers: int) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, str]]]:
    """Batch, prompt, source, rows and past lengths are dynamic; image size and one new token per step are fixed."""
    prompt, source = {0: "batch", 1: "prompt_length"}, {0: "batch", 1: "source_length"}
    heads_source = {0: "batch", 2: "source_length"}
    encoder = {"input_ids": prompt, "attention_mask": prompt, "pixel_values": {0: "batch"}, "image_mask": {0: "batch"},
               "last_hidden_state": source, "padding_mask": source}
    encoder.update({name: heads_source for name in encoder_output_names(layers)[2:]})
    decoder = {"input_ids": {0: "rows"}, "encoder_padding_mask": source, "cross_position_keys": heads_source,
               "logits": {0: "rows"}}
    decoder.update({name: {0: "rows", 2: "past_length"} for name in decoder_input_names(layers)[3:3 + 2 * layers]})
    decoder.update({name: heads_source for name in decoder_input_names(layers)[3 + 2 * layers :]})
    decoder.update({name: {0: "rows", 2: "total_length"} for name in decoder_output_names(layers)[1:]})
    return encoder, decoder


def _check_exportable(model: Any, task: str | None) -> OFAUFOForConditionalGeneration:
    """The model to export: a dense model as it is, a routed supernet only with the task to fix."""
    if isinstance(model, OFAUFOOnnxForConditionalGeneration) or not isinstance(model, OFAUFOForConditionalGeneration):
        raise TypeError(f"export_onnx takes an OFAUFOForConditionalGeneration (a PyTorch model directory), "
                        f"got {type(model).__name__}")
    vision = model.config.vision_config
    if vision.routes_tasks:
        if task is None:
            raise ValueError(
                f"the model is a routed UFO supernet (tasks {vision.task_names}): its vision encoder depends on "
                "the task, which a graph cannot switch. Extract a subnet first (`ofa-ufo extract --task TASK` or "
                "`ofa_ufo.extract_subnet`), or name the task to fix, e.g. `--task grounding` (task='grounding') "
                "extracts it on the fly")
        return extract_subnet(model, task)
    if task is not None and vision.supernet_layers and task != vision.supernet_task:
        raise ValueError(f"the model is a subnet extracted for task {vision.supernet_task!r}, not {task!r}: "
                         "drop --task or export the supernet with it")
    return model


def export_onnx(model: OFAUFOForConditionalGeneration, output: str | Path, processor: OFAUFOProcessor | None = None,
                *, task: str | None = None, quantize: str | None = None, opset: int = DEFAULT_OPSET,
                source: str | None = None, calibration: Sequence[Image.Image] | None = None,
                simplify: bool = True) -> Path:
    """Write an ONNX directory that `AutoModelForSeq2SeqLM` and, with a processor, `pipeline("ofa-ufo",
    model=output)` load: encoder_model.onnx, decoder_with_past_model.onnx, config.json (type
    `ofa-ufo-onnx`), generation_config.json, the processor's files and onnx_manifest.json (graph inputs
    and outputs, opset, precision, source, the CPU and library versions it was exported with).

    The image input is fixed at the processor's image size (without a processor: `config.image_size`).
    `quantize="int8"`: both graphs through `quantize_int8` (int8 weights, activations quantised per
    call; the decoder's output projection int8 with its best logits recomputed in fp32, see
    `_DecoderStepGraph`); with `calibration` images (what the model will see; the processor is needed)
    the encoder's convolutions become int8 too, their activation ranges measured on those images.
    `task` fixes a routed supernet's task by extracting its subnet first (see `_check_exportable`).
    `simplify` (default) runs onnxslim over each traced graph before quantising: the tracer computes every
    reshape's target from `Shape` / `Gather` / `Concat` nodes at run time (a third of the decoder step's
    nodes), which onnxslim folds into constant shapes and removes (`simplify_graph`).
    The model itself is left untouched (the exporter's graph passes would change its weights in place:
    a copy is exported).
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    if calibration is not None and (quantize is None or processor is None):
        raise ValueError("calibration images are for quantize='int8' and need the processor that prepares them")
    dense = _check_exportable(model, task)
    dense = (copy.deepcopy(dense) if dense is model else dense).float().eval()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        graphs = Path(scratch) if quantize else output
        _export_graphs(dense, _image_size(dense, processor), graphs, opset, int8_head=bool(quantize))
        if simplify:
            for name in (ENCODER_FILE, DECODER_FILE):
                simplify_graph(graphs / name)
        if quantize:
            feeds = calibration_feeds(processor, calibration) if calibration is not None else None
            quantize_int8(graphs / ENCODER_FILE, output / ENCODER_FILE, feeds)
            quantize_int8(graphs / DECODER_FILE, output / DECODER_FILE, lookups=False)
    _write_support_files(dense, processor, output, opset, quantize or "fp32", source,
                         len(calibration) if calibration is not None else 0, simplify)
    return output


def simplify_graph(path: str | Path) -> None:
    """Rewrite the ONNX graph at `path` in place with onnxslim (constant folding, shape arithmetic folded
    into constant reshape targets, dead and duplicate nodes removed); the outputs are unchanged (tests)."""
    # onnx and onnxslim are optional dependencies (the `export` extra): imported only when simplifying
    import onnx
    import onnxslim  # (the same optional dependency)

    onnx.save(onnxslim.slim(str(path)), str(path))


def load_onnx_model(path: str | Path, **kwargs: Any) -> OFAUFOOnnxForConditionalGeneration:
    """The model of an exported directory (`OFAUFOOnnxForConditionalGeneration.from_pretrained`; `threads=`,
    `session_options=`, `providers=` as there)."""
    return OFAUFOOnnxForConditionalGeneration.from_pretrained(path, **kwargs)


def _image_size(model: OFAUFOForConditionalGeneration, processor: OFAUFOProcessor | None) -> int:
    if processor is None:
        return model.config.image_size
    size = processor.image_processor.size
    return size if isinstance(size, int) else size["height"]


def _export_graphs(model: OFAUFOForConditionalGeneration, image_size: int, output: Path, opset: int,
                   int8_head: bool = False) -> None:
    layers = model.config.decoder_layers
    encoder_inputs, decoder_inputs = _example_inputs(model, image_size)
    encoder_axes, decoder_axes = _dynamic_axes(layers)
    jobs = ((_EncoderGraph(model), encoder_inputs, ENCODER_FILE, encoder_input_names(), encoder_output_names(layers),
             encoder_axes),
            (_DecoderStepGraph(model, int8_head), decoder_inputs, DECODER_FILE, decoder_input_names(layers),
             decoder_output_names(layers), decoder_axes))
    for graph, inputs, name, input_names, output_names, axes in jobs:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns at every frozen branch and size read; the example inputs are chosen for them
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, inputs, str(output / name), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)


def quantize_int8(source: str | Path, target: str | Path,
                  calibration: Sequence[dict[str, np.ndarray]] | None = None, lookups: bool = True) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights for the MatMul, Gemm and Gather ops of the
    transformer (per output channel), activations quantised on the fly per call. Attention's
    activation-by-activation products stay fp32. `lookups=False` leaves the Gathers (embedding
    lookups: size, not speed) fp32, for a graph that reads exact rows of a table (the decoder's rescoring).

    Convolutions (the ResNet stem, a dense head) need `calibration`, feeds of the graph's inputs: with
    it they are quantised statically first (int8 weights per channel, uint8 activations whose ranges
    are the min / max seen on the feeds, QDQ format), which ONNX Runtime runs as int8 convolutions.
    Without it they stay fp32: dynamic int8 convolutions are slower than fp32 ones on x86 CPUs, and
    activation ranges need data that looks like what the model will see."""
    # onnxruntime is an optional dependency (the `export` extra): imported only when quantising
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if calibration is not None and not calibration:
        raise ValueError("calibration needs at least one feed (image)")
    with tempfile.TemporaryDirectory() as scratch:
        if calibration:
            static = Path(scratch) / "convs_int8.onnx"
            quantize_static(str(source), str(static), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            source = static
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"] + ["Gather"] * lookups,
                         weight_type=QuantType.QInt8, per_channel=True, extra_options={"MatMulConstBOnly": True})


class _Feeds:
    """ONNX Runtime's calibration reader protocol (`get_next` until None) over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(processor: OFAUFOProcessor, images: Sequence[Image.Image],
                      task: str = "caption") -> list[dict[str, np.ndarray]]:
    """Encoder graph feeds for `quantize_int8(..., calibration=)`: each image with `task`'s prompt."""
    prompt = get_task(task).prompt()
    dtypes = {"input_ids": np.int64, "attention_mask": np.int64, "pixel_values": np.float32, "image_mask": np.bool_}
    feeds = []
    for image in images:
        inputs = processor(images=[image], text=[prompt])
        feeds.append({name: inputs[name].numpy().astype(dtypes[name]) for name in encoder_input_names()})
    return feeds


def _write_support_files(model: OFAUFOForConditionalGeneration, processor: OFAUFOProcessor | None, output: Path,
                         opset: int, precision: str, source: str | None, calibration_images: int = 0,
                         simplified: bool = False) -> None:
    """config.json, generation_config.json, the processor's files and the manifest."""
    # onnx and onnxruntime are optional dependencies (the `export` extra), read here for their versions
    import onnx
    import onnxruntime  # (the same optional dependency)

    config = OFAUFOOnnxConfig.from_dict(model.config.to_dict())
    config.architectures = ["OFAUFOOnnxForConditionalGeneration"]
    config.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    if processor is not None:
        processor.save_pretrained(output)
    layers = model.config.decoder_layers
    manifest = {
        "format": "onnx",
        "precision": precision,
        "calibration_images": calibration_images,  # > 0: the encoder's convolutions are int8 as well
        "opset": opset,
        "simplified": simplified,  # by onnxslim (simplify_graph)
        "source_model": source or model.name_or_path or None,
        "task": model.config.vision_config.supernet_task,
        "image_size": _image_size(model, processor),
        "graphs": {
            "encoder": {"file": ENCODER_FILE, "inputs": encoder_input_names(), "outputs": encoder_output_names(layers)},
            "decoder_with_past": {"file": DECODER_FILE, "inputs": decoder_input_names(layers),
                                  "outputs": decoder_output_names(layers)},
        },
        "exported_with": {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
                          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    if simplified:  # only then is onnxslim needed: `--no-simplify` exports without it
        import onnxslim  # (the same optional dependency)

        manifest["exported_with"]["onnxslim"] = onnxslim.__version__
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
