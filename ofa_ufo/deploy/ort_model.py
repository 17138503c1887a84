"""OFA-UFO generation over ONNX Runtime sessions, behind transformers' `generate`.

    model = AutoModelForSeq2SeqLM.from_pretrained(ONNX_DIR)    # or OFAUFOOnnxForConditionalGeneration
    model.generate(**processor(images=image, text=prompt), num_beams=5, max_new_tokens=16)
    pipe = pipeline("ofa-ufo", model=ONNX_DIR); pipe(image, task="caption")

An exported directory (`ofa_ufo.deploy.onnx_export.export_onnx`) holds two graphs: the encoder
(prompt + image -> encoder states and everything the decoder reads from them: padding mask,
cross-attention position keys, the cross-attention keys and values of every decoder layer) and
one decoder step over a self-attention cache whose length may be 0 (the first step). The model
here runs them; `GenerationMixin` does the rest (greedy, beam search, constraints, the tasks'
logits processors), exactly as for the PyTorch model. Its config type is `ofa-ufo-onnx`, so that
`AutoModelForSeq2SeqLM` and `pipeline("ofa-ufo", model=ONNX_DIR)` pick this class for such a
directory (`register`, called by `import ofa_ufo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoProcessor, GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration, OFAUFOPreTrainedModel
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.registration import register_seq2seq_variant
from ofa_ufo.layers.kv_cache import OFAUFOCache

__all__ = [
    "DECODER_FILE", "ENCODER_FILE", "MANIFEST_FILE", "OFAUFOOnnxConfig", "OFAUFOOnnxEncoderOutput",
    "OFAUFOOnnxForConditionalGeneration", "OnnxStepCache", "check_processor", "decoder_input_names",
    "decoder_output_names", "encoder_input_names", "encoder_output_names", "register",
]

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_with_past_model.onnx"
MANIFEST_FILE = "onnx_manifest.json"


def encoder_input_names() -> list[str]:
    """The encoder graph's inputs: what `OFAUFOProcessor` returns (`model_input_names`)."""
    return ["input_ids", "attention_mask", "pixel_values", "image_mask"]


def encoder_output_names(layers: int) -> list[str]:
    return ["last_hidden_state", "padding_mask", "cross_position_keys", *_kv_names("present", "encoder", layers)]


def decoder_input_names(layers: int) -> list[str]:
    return ["input_ids", "encoder_padding_mask", "cross_position_keys",
            *_kv_names("past_key_values", "decoder", layers), *_kv_names("past_key_values", "encoder", layers)]


def decoder_output_names(layers: int) -> list[str]:
    return ["logits", *_kv_names("present", "decoder", layers)]


def _kv_names(prefix: str, side: str, layers: int) -> list[str]:
    """Per layer, key then value (optimum's naming: `past_key_values.0.decoder.key`, `present.0.encoder.value`)."""
    return [f"{prefix}.{i}.{side}.{kind}" for i in range(layers) for kind in ("key", "value")]


class OFAUFOOnnxConfig(OFAUFOConfig):
    """The config of an exported directory: the source model's fields under its own model type, so the
    Auto classes load the ONNX Runtime model for it (and never try to read PyTorch weights there)."""

    model_type = "ofa-ufo-onnx"


@dataclass
class OFAUFOOnnxEncoderOutput(ModelOutput):
    """The encoder graph's outputs as torch tensors (zero-copy views of ONNX Runtime's arrays):
    last_hidden_state (B, S, D), padding_mask (B, S) True where padded, cross_position_keys (B, H, S, D/H)
    and cross_key_values, per decoder layer its cross-attention key then value (B, H, S, D/H)."""

    last_hidden_state: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    cross_position_keys: torch.Tensor | None = None
    cross_key_values: tuple[torch.Tensor, ...] | None = None


class _OnnxEncoder(nn.Module):
    """`get_encoder()` of the ONNX model: runs the encoder session as `generate` calls an encoder."""

    main_input_name = "input_ids"

    def __init__(self, session, pad_token_id: int) -> None:
        super().__init__()
        self.session = session
        self.pad_token_id = pad_token_id
        pixels = {i.name: i.shape for i in session.get_inputs()}.get("pixel_values")  # (B, 3, S, S), S fixed
        self.image_size = pixels[-1] if pixels else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                **kwargs: Any) -> OFAUFOOnnxEncoderOutput:
        """As `OFAEncoder.forward`. Text-only rows (no `pixel_values`, or `image_mask` False) run with blank
        pixels that the mask hides; `task_ids` are accepted and unused (an exported model is a dense subnet)."""
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = input_ids.ne(self.pad_token_id)
        if pixel_values is None:
            pixel_values = torch.zeros(batch, 3, self.image_size, self.image_size)
            image_mask = torch.zeros(batch, dtype=torch.bool)
        elif image_mask is None:
            image_mask = torch.ones(batch, dtype=torch.bool)
        feed = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long(),
                "pixel_values": pixel_values.float(), "image_mask": image_mask.bool()}
        states, padding, position_keys, *cross = (
            torch.from_numpy(a) for a in self.session.run(None, {k: _array(v) for k, v in feed.items()}))
        return OFAUFOOnnxEncoderOutput(states, padding, position_keys, tuple(cross))


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view (a copy only when the tensor is strided, e.g. after slicing)."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


class OFAUFOOnnxForConditionalGeneration(OFAUFOForConditionalGeneration):
    """Prompted generation over an exported directory's ONNX Runtime sessions (no PyTorch weights).

    A subclass of the PyTorch model for its generation behaviour only (one encoder row per input under
    beam search, the fairseq rules, the cache, the decoding settings), so that `generate` is the same
    code for both; its modules are replaced by the two sessions: `get_encoder()` runs the encoder graph,
    `forward` the decoder step graph. Several decoder tokens run one step at a time (the graph takes
    one new token per row), so teacher-forced scoring (`score_candidates`) works too. Not covered:
    training (`labels`), image generation (`code_grid`, `logits_range`) and embeddings (`embed`): those
    need the PyTorch model.
    """

    config_class = OFAUFOOnnxConfig
    config: OFAUFOOnnxConfig
    _tied_weights_keys = None  # no weights: the graphs hold them

    def __init__(self, config: OFAUFOOnnxConfig, encoder_session=None, decoder_session=None,
                 manifest: dict[str, Any] | None = None) -> None:
        OFAUFOPreTrainedModel.__init__(self, config)  # not the PyTorch model's __init__: it would build the modules
        if encoder_session is None or decoder_session is None:
            raise ValueError("an ONNX model needs its sessions: load it with "
                             "OFAUFOOnnxForConditionalGeneration.from_pretrained(ONNX_DIR)")
        self.encoder = _OnnxEncoder(encoder_session, config.pad_token_id)
        self.decoder_session = decoder_session
        self.manifest = manifest or {}
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, threads: int | None = None,
                        session_options: Any = None, providers: list[str] | None = None,
                        **kwargs: Any) -> OFAUFOOnnxForConditionalGeneration:
        """Open an exported directory: config.json, generation_config.json, the two graphs and the manifest.
        `threads` sets ONNX Runtime's intra-op thread count (default: one per core; through `pipeline`:
        `model_kwargs={"threads": 2}`); `session_options` (an `onnxruntime.SessionOptions`, which the Auto
        classes cannot take: they copy their arguments) and `providers` go to both sessions (default: CPU).
        Other keyword arguments (those `pipeline` passes) are ignored. When the directory holds processor
        files, their model inputs and image size must match the encoder graph's."""
        # onnxruntime is an optional dependency (the `export` extra): imported only when a graph is opened
        import onnxruntime

        if threads is not None:
            session_options = session_options or onnxruntime.SessionOptions()
            session_options.intra_op_num_threads = threads

        path = Path(pretrained_model_name_or_path)
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{path} is not an exported ONNX directory: no {MANIFEST_FILE} (write one with "
                                    f"`python -m ofa_ufo.export --model DIR --format onnx --output {path}`)")
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        config = OFAUFOOnnxConfig.from_pretrained(path)
        providers = providers or ["CPUExecutionProvider"]
        sessions = []
        for graph in ("encoder", "decoder_with_past"):
            graph_file = path / manifest["graphs"][graph]["file"]
            if not graph_file.is_file():
                raise FileNotFoundError(f"{graph_file} is missing ({MANIFEST_FILE} names it as the {graph} graph)")
            sessions.append(onnxruntime.InferenceSession(str(graph_file), session_options, providers=providers))
        model = cls(config, *sessions, manifest=manifest)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        if (path / "processor_config.json").is_file():
            check_processor(model, AutoProcessor.from_pretrained(path), path)
        return model

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # the tensors generate sees live on the CPU, whatever provider runs the graphs

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the graphs' float inputs (pixel_values) are fp32, int8 graphs included

    def get_encoder(self, modality: str | None = None) -> _OnnxEncoder:
        return self.encoder

    def get_decoder(self) -> None:
        return None  # one graph with the output projection: no separate decoder module

    def get_input_embeddings(self) -> None:
        return None

    def get_output_embeddings(self) -> None:
        return None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: OFAUFOOnnxEncoderOutput | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """As `OFAUFOForConditionalGeneration.forward` for inference: logits (R, T, V) of `decoder_input_ids`
        (R, T) after what `cache` holds; R may be k times the encoder's rows (beams share an encoder row)."""
        for name in ("labels", "code_grid", "logits_range", "logits_mask"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"the ONNX model does not take {name}= (training or image generation): "
                                          "use the PyTorch model directory for that")
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (the prompt) or precomputed encoder_outputs")
            encoder_outputs = self.encoder(input_ids, attention_mask, pixel_values, image_mask)
        if decoder_input_ids is None:
            raise ValueError("Pass decoder_input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past = self._past(cache, decoder_input_ids.shape[0])
        logits, present = self._decode(decoder_input_ids, encoder_outputs, past)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if use_cache:
            if not isinstance(cache, OnnxStepCache):
                cache = OnnxStepCache()
            cache.arrays = present  # in place: generate hands the same object back next step
        return Seq2SeqLMOutput(logits=logits, cache=cache if use_cache else None,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Hold the keys/values as the step graph's numpy arrays (`OnnxStepCache`): no tensor round trip per
        step. The default case builds it directly (transformers' DynamicCache set-up walks the config on every
        request, a visible share of a small model's request); a cache the caller passed or a
        `cache_implementation` goes through `generate`'s own set-up first."""
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation in (None, "dynamic")):
            model_kwargs["cache"] = OnnxStepCache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if (isinstance(cache, EncoderDecoderCache) and not isinstance(cache, OnnxStepCache)
                and cache.get_seq_length() == 0):  # a cache the caller filled is kept (and read by `_past`)
            model_kwargs["cache"] = OnnxStepCache()

    def _decode(self, tokens: torch.Tensor, encoder_outputs: OFAUFOOnnxEncoderOutput,
                past: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Run the step graph once per column of `tokens` (R, T): logits (R, T, V) and the final K/V."""
        layers = self.config.decoder_layers
        fixed = {"encoder_padding_mask": _array(encoder_outputs.padding_mask),
                 "cross_position_keys": _array(encoder_outputs.cross_position_keys)}
        fixed.update(zip(_kv_names("past_key_values", "encoder", layers),
                         (_array(t) for t in encoder_outputs.cross_key_values)))
        past_names = _kv_names("past_key_values", "decoder", layers)
        steps = []
        for column in range(tokens.shape[1]):
            feed = {"input_ids": _array(tokens[:, column : column + 1].long()), **fixed, **dict(zip(past_names, past))}
            logits, *past = self.decoder_session.run(None, feed)
            steps.append(logits)
        return torch.from_numpy(steps[0] if len(steps) == 1 else np.concatenate(steps, axis=1)), past

    def _past(self, cache: Cache | None, rows: int) -> list[np.ndarray]:
        """The self-attention keys/values the cache holds, per layer key then value: (R, H, past, D/H),
        with past 0 for an empty cache (the first step)."""
        if isinstance(cache, OnnxStepCache) and cache.arrays is not None:
            return cache.arrays
        layers, heads = self.config.decoder_layers, self.config.decoder_attention_heads
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if self_cache is None or self_cache.get_seq_length() == 0:
            empty = np.zeros((rows, heads, 0, self.config.d_model // heads), dtype=np.float32)
            return [empty] * (2 * layers)
        return [_array(t) for layer in self_cache.layers[:layers] for t in (layer.keys, layer.values)]

    def embed(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("embedding tasks (reid, face, retrieval) are not exported to ONNX: "
                                  "use the PyTorch model directory")

    def project(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("the output projection is inside the ONNX decoder graph")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("an ONNX model is saved by exporting the PyTorch model "
                                  "(`python -m ofa_ufo.export`); copy its directory to move it")


class OnnxStepCache(OFAUFOCache):
    """The cache `generate` carries for the ONNX model: the step graph's present keys/values as the numpy
    arrays it returned (per layer key then value, (R, H, T, D/H)), fed back unchanged next step. Beam
    search's reordering indexes them in numpy; the cross-attention side stays empty (its keys and values
    live in the encoder outputs). The wrapped `DynamicCache`s exist for the interface only."""

    def __init__(self, arrays: list[np.ndarray] | None = None) -> None:
        super().__init__(DynamicCache(), DynamicCache())
        self.arrays = arrays

    def __len__(self) -> int:
        return 0 if self.arrays is None else len(self.arrays) // 2

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.arrays is None else self.arrays[2 * layer_idx].shape[2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.arrays is not None:
            rows = beam_idx.cpu().numpy()
            self.arrays = [array[rows] for array in self.arrays]


def check_processor(model: OFAUFOOnnxForConditionalGeneration, processor: OFAUFOProcessor,
                    where: str | Path = "the ONNX directory") -> None:
    """Raise a ValueError naming the input when the encoder graph does not take what `processor` gives:
    the same input names, and pixels of the processor's image size."""
    graph = {i.name: i for i in model.encoder.session.get_inputs()}
    given = list(processor.model_input_names)
    for name in given:
        if name not in graph:
            raise ValueError(f"{where}: the processor gives input {name!r} but {ENCODER_FILE} takes "
                             f"{sorted(graph)}; export the model again with this processor")
    for name in graph:
        if name not in given:
            raise ValueError(f"{where}: {ENCODER_FILE} needs input {name!r} that the processor does not give "
                             f"(it gives {given})")
    size = processor.image_processor.size
    side = size if isinstance(size, int) else size.get("height")
    expected = list(graph["pixel_values"].shape[2:])
    if expected != [side, side]:
        raise ValueError(f"{where}: input 'pixel_values' of {ENCODER_FILE} is {expected[0]}x{expected[1]} px but the "
                         f"processor's image size makes {side}x{side}; export again at the processor's size")


def register() -> None:
    """Register the `ofa-ufo-onnx` config type with the Auto classes (idempotent; `import ofa_ufo` calls it)."""
    register_seq2seq_variant(OFAUFOOnnxConfig, OFAUFOOnnxForConditionalGeneration)
