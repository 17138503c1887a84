"""Hugging Face face of the model: `OFAUFOModel` and `OFAUFOForConditionalGeneration`.

Parameter names follow the OFA Hugging Face port (`encoder.*`, `decoder.*`) under the usual
`model.` prefix, so official checkpoints convert with a rename table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForSeq2SeqLM
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel, initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.modeling_outputs import Seq2SeqLMOutput, Seq2SeqModelOutput

from ofa_ufo.core.hardware import resolve_precision
from ofa_ufo.generation.fairseq_rules import FAIRSEQ_MAX_LEN_EOS, check_fairseq_option, fairseq_max_len_eos_processor
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.model_card import write_model_card
from ofa_ufo.hf.saved_files import GENERATION_FILES, check_files, check_saved_model, local_directory, read_json_object
from ofa_ufo.layers.attention import OFAAttention
from ofa_ufo.layers.kv_cache import OFAUFOCache
from ofa_ufo.layers.moe import TaskMoEFFN
from ofa_ufo.layers.packed_linear import pack_linears
from ofa_ufo.layers.tied_embedding import training_lookups, vocab_logits
from ofa_ufo.models.damo_yolo import DenseDetector, DenseOutput, ZeroHead, image_pyramid
from ofa_ufo.models.ofa import OFADecoder, OFAEncoder, OFAUFOEncoderOutput
from ofa_ufo.models.resnet import OUT_CHANNELS, STAGE_CHANNELS

DENSE_TASK = "dense_detection"  # the task the dense head serves: its rows route the supernet as this task


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder input: <s> + labels[:-1], with ignored (-100) positions as padding."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted.eq(-100), pad_token_id)


def embedding_readout(config: OFAUFOConfig, decoder_states: torch.Tensor | None,
                      image_embedding: torch.Tensor | None) -> torch.Tensor:
    """The raw retrieval embedding (B, D) under `config.embedding_readout`.

    "decoder": the final (layer-normed) decoder state (B, T, D) at the first step, whose input is
    the decoder start token only. The decoder is causal, so this is the same whether it ran on the
    start token alone (`embed`) or on a whole teacher-forced target (training, where it shares the
    forward pass of token tasks). "image": the encoder's `image_embedding`, the mean image token
    before the text-image layers, so metric losses never reach the layers generation tasks share.
    """
    if config.embedding_readout == "image":
        if image_embedding is None:
            raise ValueError("the 'image' embedding read-out needs pixel_values")
        return image_embedding
    return decoder_states[:, 0]


@dataclass
class OFAUFOSeq2SeqModelOutput(Seq2SeqModelOutput):
    """`Seq2SeqModelOutput` plus the encoder's mean image token (B, D), for the "image" read-out."""

    image_embedding: torch.FloatTensor | None = None


@dataclass
class OFAUFOSeq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus the decoder's final states (B, T, D) and the encoder's mean image
    token (B, D), for embedding read-outs (`embedding_readout`)."""

    decoder_last_hidden_state: torch.FloatTensor | None = None
    image_embedding: torch.FloatTensor | None = None


def _check_supernet_kind(path, config: OFAUFOConfig) -> None:
    saved_file = Path(str(path)) / "config.json"
    if not saved_file.is_file():
        return
    saved = read_json_object(saved_file).get("vision_config") or {}
    wanted = config.vision_config
    if saved.get("supernet_layers", 0) and wanted.supernet_layers and saved.get("supernet_routed", True) != wanted.supernet_routed:
        kinds = {True: "a routed supernet", False: f"an extracted subnet (task {saved.get('supernet_task')!r})"}
        raise ValueError(
            f"{path} holds {kinds[saved.get('supernet_routed', True)]} but the given config describes "
            f"{kinds[wanted.supernet_routed]}; load it with its own config.json"
        )


def _registered_subclass(directory: Path | None, cls: type) -> type | None:
    """The subclass of `cls` that AutoModelForSeq2SeqLM has registered for the model type `directory`'s
    config.json names, when that is another type than `cls`'s; None otherwise. `pipeline("ofa-ufo")` loads
    through `OFAUFOForConditionalGeneration`, which so hands such a directory to its own class."""
    if directory is None or not (directory / "config.json").is_file():
        return None
    model_type = read_json_object(directory / "config.json").get("model_type")
    if model_type == cls.config_class.model_type or model_type not in CONFIG_MAPPING:
        return None
    model_class = AutoModelForSeq2SeqLM._model_mapping.get(CONFIG_MAPPING[model_type], None)
    return model_class if isinstance(model_class, type) and issubclass(model_class, cls) else None


def with_precision(model: PreTrainedModel, precision: str, conflicting: list[str] | None = None) -> PreTrainedModel:
    """`model` cast to what `precision` (auto | fp32 | bf16) resolves to on its device; the choice is kept as
    `model.precision_choice`. Only floating-point PyTorch models can be cast (an int8 or ONNX one cannot).
    bf16 on a CPU also packs the Linear weights for oneDNN (`pack_linears`: outputs equal up to bf16 rounding,
    faster decoding)."""
    if conflicting:
        raise ValueError(f"give either precision= or {conflicting[0]}=, not both")
    device = next((param.device for param in model.parameters()), torch.device("cpu"))  # an ONNX model has none
    choice = resolve_precision(precision, device)
    if choice.precision == "bf16" and model.config.model_type != OFAUFOConfig.model_type:
        raise ValueError(f"precision={precision!r} means bf16 here, but a {model.config.model_type!r} model keeps "
                         "its own precision; load it without precision=")
    if model.config.model_type == OFAUFOConfig.model_type:
        model = model.to(choice.dtype)
        if choice.precision == "bf16" and device.type == "cpu":
            pack_linears(model)  # oneDNN's packed bf16 weights for inference (ofa_ufo.layers.packed_linear)
    model.precision_choice = choice
    return model


class OFAUFOPreTrainedModel(PreTrainedModel):
    config_class = OFAUFOConfig
    config: OFAUFOConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = ["EncoderLayer", "DecoderLayer", "ResNetStem"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """As transformers', plus a clear error when a dense extracted subnet is loaded into a routed
        supernet config (or the reverse), instead of silently re-initialising routers and experts, and errors
        that name the file for truncated or corrupt files (`ofa_ufo.hf.saved_files`): the config (see
        `OFAUFOConfig.from_pretrained`), generation_config.json (which transformers would skip in silence) and
        the weights. Called by `pipeline("ofa-ufo", model=DIR)` (transformers passes `_from_pipeline`), it
        first checks every file the pipeline loads next: the Auto classes read tokenizer_config.json and
        processor_config.json before any OFA-UFO code runs, and their errors name no file.
        `precision="auto"` loads bf16 weights where the device is fast at bf16 and fp32 elsewhere
        (`ofa_ufo.core.hardware`); "fp32" / "bf16" as asked. `torch_dtype` / `dtype` keep transformers' meaning."""
        precision = kwargs.pop("precision", None)
        if precision is not None:
            model = cls.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
            return with_precision(model, precision, conflicting=[k for k in ("dtype", "torch_dtype") if k in kwargs])
        if isinstance(config, OFAUFOConfig):
            _check_supernet_kind(pretrained_model_name_or_path, config)
        directory = local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if directory is not None and kwargs.get("_from_pipeline"):
            check_saved_model(directory)
        check_files(directory, GENERATION_FILES)
        loader = _registered_subclass(directory, cls)
        if loader is not None:  # e.g. exported ONNX graphs (`ofa-ufo-onnx`, registered by ofa_ufo.deploy.ort_model)
            return loader.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        except SafetensorError as error:  # safetensors' message names no file: a truncated download or copy
            files = ", ".join(sorted(str(f) for f in Path(str(pretrained_model_name_or_path)).glob("*.safetensors")))
            raise OSError(f"cannot read the weights of {pretrained_model_name_or_path} ({files or 'not a local folder'}): "
                          f"{error}; the file is truncated or corrupt, save or copy it again") from None

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
        """As transformers', plus a model card (README.md: tasks, architecture, usage; see
        `ofa_ufo.hf.model_card`), which never replaces a README.md this library did not write.
        transformers writes no card here, only for `push_to_hub` (its own, which is then kept)."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_model_card(save_directory, self.config)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT-style normal(0, init_std) for linears and embeddings (as OFA); He init for the ResNet convs."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d) and getattr(module, "zero_init", False):
            # The last BN of each residual block starts at scale 0, so the block starts as the identity
            # (Goyal et al. 2017): a ResNet stem trained from scratch on demo shapes reached held-out
            # accuracy 0.54 instead of 0.24 after 6,400 images (benchmarks/LOG.md). Checkpoints
            # load their own values.
            super()._init_weights(module)
            init.zeros_(module.weight)
        elif isinstance(module, OFAAttention) and module.c_attn is not None:
            init.ones_(module.c_attn)
        elif isinstance(module, nn.Embedding) and module.num_embeddings == self.config.vocab_size:
            super()._init_weights(module)
            init.copy_(module.weight, _with_sinusoidal_bins(module.weight, self.config))
        elif isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            # A supernet block's residual outputs start at 0, so the freshly added ViT blocks start as the
            # identity over the (warmed-up) stem's grid instead of washing its image signal out
            # (benchmarks/LOG.md, "With the OFA tasks"). Checkpoints load their own values.
            super()._init_weights(module)
            init.zeros_(module.weight)
        elif isinstance(module, ZeroHead):  # after its convs (children first): DAMO-YOLO's prior init again
            module.reset_parameters()
        elif isinstance(module, TaskMoEFFN):
            for linear in (module.shared.fc1, module.shared.fc2):
                self._init_weights(linear)
            module.experts.init_from(module.shared, init.copy_)
            init.zeros_(module.router)
        else:
            super()._init_weights(module)


def build_dense_head(config: OFAUFOConfig) -> DenseDetector | None:
    """The DAMO-YOLO head `config.dense_head` asks for, over ResNet stage 2 (stride 8) and the stride-16 grid
    (the supernet's width, or ResNet stage 3's without a supernet); None when it asks for none."""
    if config.dense_head is None:
        return None
    vision = config.vision_config
    grid = vision.supernet_dim if vision.supernet_layers else OUT_CHANNELS
    return DenseDetector((STAGE_CHANNELS[1], grid), len(config.dense_head["labels"]), config.dense_head["preset"])


def _with_sinusoidal_bins(weight: torch.Tensor, config: OFAUFOConfig) -> torch.Tensor:
    """The token table with its location-bin rows set to a sinusoidal code of the bin index (RMS
    init_std), so neighbouring bins start out similar; a model trained from scratch then learns
    coordinates much sooner than from independent random rows (grounding loss 4.89 vs 5.30 after
    150 steps on demo scenes). Only random init is affected; checkpoints load their own rows."""
    bins = torch.arange(config.num_bins, dtype=torch.float32)[:, None]  # (num_bins, 1)
    freqs = torch.pow(10000.0, -torch.arange(0, config.d_model, 2, dtype=torch.float32) / config.d_model)
    angles = bins * freqs[None]  # (num_bins, d_model / 2)
    code = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, : config.d_model]
    table = weight.detach().clone()
    table[config.bin_offset : config.bin_offset + config.num_bins] = code * config.init_std * 2**0.5
    return table


class OFAUFOModel(OFAUFOPreTrainedModel):
    """Encoder-decoder without the output projection; returns decoder states."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: OFAUFOConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = OFAEncoder(config, self.shared)
        self.decoder = OFADecoder(config, self.shared)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> OFAEncoder:
        return self.encoder

    def get_decoder(self) -> OFADecoder:
        return self.decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: OFAUFOEncoderOutput | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        code_grid: int | torch.Tensor | None = None,
        **kwargs,
    ) -> OFAUFOSeq2SeqModelOutput:
        """Run the encoder unless `encoder_outputs` are given, then the decoder on `decoder_input_ids`
        (`code_grid`: which target rows are VQGAN code grids, see `OFADecoder.forward`)."""
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (the prompt) or precomputed encoder_outputs")
            encoder_outputs = self.encoder(
                input_ids, attention_mask, pixel_values, image_mask, task_ids, output_hidden_states=output_hidden_states
            )
        if decoder_input_ids is None:
            raise ValueError("Pass decoder_input_ids or labels")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = OFAUFOCache(DynamicCache(), DynamicCache())
        elif not use_cache:
            cache = None
        states = self.decoder(decoder_input_ids, encoder_outputs, cache, code_grid)
        return OFAUFOSeq2SeqModelOutput(
            last_hidden_state=states,
            cache=cache,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            image_embedding=encoder_outputs.image_embedding,
        )

    def embed(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        image_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Image (+ prompt) embedding (B, D = d_model) for retrieval tasks (ReID, face, product).

        Under the "decoder" read-out (`config.embedding_readout`) the encoder reads the image and the
        task's prompt (routed by `task_ids` in a UFO supernet), the decoder runs one step on the start
        token and its final state is the embedding; under "image" only the image embedding runs
        (stem, routed supernet, projection) and its tokens are averaged. L2-normalised unless
        `normalize=False` (training losses take the raw one).
        """
        if self.config.embedding_readout == "image":
            if pixel_values is None:
                raise ValueError("the 'image' embedding read-out needs pixel_values")
            tokens, _ = self.encoder.embed_image(pixel_values, task_ids)  # (B, N, D)
            features = embedding_readout(self.config, None, tokens.mean(1))
        else:
            start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long,
                               device=input_ids.device)  # (B, 1)
            outputs = self(input_ids, attention_mask, pixel_values, image_mask, task_ids, decoder_input_ids=start,
                           use_cache=False)
            features = embedding_readout(self.config, outputs.last_hidden_state, None)  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features


class OFAUFOForConditionalGeneration(OFAUFOPreTrainedModel, GenerationMixin):
    """Prompted generation over the unified vocabulary; `labels` give the (label-smoothed) loss."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    # Training lookups add their gradient rows into `model.shared.weight.grad` in place, outside
    # autograd (faster: no out-of-place (V, D) sums). Then `torch.autograd.grad` and gradient hooks
    # (DDP's reducer, FSDP) do not see those rows, so this is off by default; the Trainer turns it on
    # for single-process runs that call `loss.backward()`.
    tied_gradients_in_place: bool = False

    def __init__(self, config: OFAUFOConfig):
        super().__init__(config)
        self.model = OFAUFOModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.dense_head = build_dense_head(config)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> OFAEncoder:
        return self.model.encoder

    def get_decoder(self) -> OFADecoder:
        return self.model.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: OFAUFOEncoderOutput | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        label_smoothing: float | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        code_grid: int | torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        logits_mask: torch.BoolTensor | None = None,
        dense_targets: list[dict[str, torch.Tensor]] | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput | dict[str, torch.Tensor]:
        """labels (B, T) with -100 at ignored positions; label_smoothing defaults to config.label_smoothing.

        `logits_to_keep` > 0 computes logits for the last that many positions only (generate uses 1).
        `code_grid` marks rows whose target is a VQGAN code grid (see `OFADecoder.forward`).
        `logits_range=(start, end)` projects onto vocabulary rows [start, end) only (e.g. the code
        tokens for image generation) and leaves the other logits at -inf; see `project`.
        `logits_mask` (B, T) computes logits only where it is set and returns them as (N, V), in
        row-major order of the mask (with `labels`, the loss uses the labels at those positions):
        a training loss needs logits only at target tokens, and in a batch that mixes tasks most
        decoder positions are padding behind short targets.
        `dense_targets` (one {"boxes" (N, 4) model-input px, "labels" (N,)} per image) runs the dense head
        instead and returns its loss dict {"loss", "qfl", "dfl", "giou"} with the neck's outputs ("neck_features",
        finest first, for distillation) (the training path, so that it goes through a DDP wrapper's forward);
        only `pixel_values` and `task_ids` are read then.
        """
        if dense_targets is not None:
            head = self._require_dense_head()
            output = self.detect_dense(pixel_values, task_ids)
            return {**head.loss(output, dense_targets), "neck_features": output.neck_features}
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        keep_all = not (logits_to_keep and labels is None)
        with training_lookups(self.model.shared, self._lookup_mode(keep_all and logits_range is None)):
            outputs = self.model(
                input_ids, attention_mask, pixel_values, image_mask, task_ids, decoder_input_ids, encoder_outputs,
                cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states, code_grid=code_grid,
            )
        states = outputs.last_hidden_state
        if not keep_all:
            states = states[:, -logits_to_keep:]
        if logits_mask is not None:
            if logits_mask.shape != states.shape[:2]:
                raise ValueError(f"logits_mask must have the decoder's (batch, length) shape {tuple(states.shape[:2])}, "
                                 f"got {tuple(logits_mask.shape)}")
            states = states[logits_mask]  # (B, T, D) -> (N, D)
        logits = self.project(states, logits_range)  # (B, T, V), or (N, V) with logits_mask
        loss = None
        if labels is not None:
            if logits_range is not None:
                raise ValueError("logits_range is for generation; the training loss needs every logit")
            loss = self._token_loss(logits, labels if logits_mask is None else labels[logits_mask], label_smoothing)
        return OFAUFOSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            decoder_last_hidden_state=outputs.last_hidden_state,
            image_embedding=outputs.image_embedding,
        )

    def detect_dense(self, pixel_values: torch.Tensor, task_ids: torch.LongTensor | None = None) -> DenseOutput:
        """The dense head's raw output for images (B, 3, H, W): ResNet stage 2 (stride 8) and the stride-16
        grid (routed by the supernet as `task_ids`, default the dense_detection task) through neck and head.
        `self.dense_head.postprocess(output)` gives boxes in model-input pixels."""
        head = self._require_dense_head()
        encoder, vision = self.model.encoder, self.config.vision_config
        if task_ids is None and encoder.supernet is not None:
            task_ids = torch.full((pixel_values.shape[0],), vision.route_id(DENSE_TASK), dtype=torch.long,
                                  device=pixel_values.device)  # (B,)
        stride8, stride16 = image_pyramid(encoder.embed_images, encoder.supernet, pixel_values, task_ids,
                                          self.config.image_bucket_size)
        return head(stride8, stride16)

    def _require_dense_head(self) -> DenseDetector:
        if self.dense_head is None:
            raise ValueError("this model has no dense detection head (config.dense_head is None): create one with "
                             "create_model(..., dense_head={'preset': 'tiny', 'labels': [...]}) or train task "
                             "dense_detection (docs/dense_detection.md)")
        return self.dense_head

    def _lookup_mode(self, full_logits: bool) -> str | None:
        """How training lookups send gradients into the tied matrix (`training_lookups`): only when every
        logit is computed does the output projection give that matrix the dense gradient they join."""
        tied = self.lm_head.weight is self.model.shared.weight
        if not (self.training and torch.is_grad_enabled() and full_logits and tied):
            return None
        return "in_place" if self.tied_gradients_in_place else "sparse"

    def _token_loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float | None) -> torch.Tensor:
        """Mean cross-entropy (fp32) of logits (..., V) against labels (...), -100 ignored."""
        smoothing = self.config.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=smoothing)

    def embed(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        image_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Image (+ prompt) embedding (B, d_model); see `OFAUFOModel.embed`."""
        return self.model.embed(pixel_values, input_ids, attention_mask, task_ids, image_mask, normalize)

    def project(self, states: torch.Tensor, logits_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Decoder states (B, T, D) -> logits (B, T, V) through the tied output embedding.

        With `logits_range=(start, end)` only the rows [start, end) of the output matrix are multiplied
        (a view, no copy): (end - start) x D work per position instead of V x D. The result keeps the
        vocabulary's width and ids, with -inf outside the range, so `generate`, logits processors and
        samplers see ordinary vocabulary logits.
        """
        if logits_range is None:
            return vocab_logits(states, self.lm_head.weight)
        start, end = logits_range
        if not 0 <= start < end <= self.config.vocab_size:
            raise ValueError(f"logits_range must satisfy 0 <= start < end <= vocab_size={self.config.vocab_size}, "
                             f"got {logits_range}")
        sliced = vocab_logits(states, self.lm_head.weight[start:end])  # (B, T, end - start)
        logits = sliced.new_full((*sliced.shape[:-1], self.config.vocab_size), float("-inf"))
        logits[..., start:end] = sliced
        return logits

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor | None, dict]:
        """Expand decoder inputs per beam/sample but keep one encoder row per input.

        The decoder's cross-attention serves the k beams of an input from that single row
        (see `OFAAttention`), so the encoder states are never copied k times.
        """
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        if encoder_outputs is not None:  # the encoder already ran: its image inputs are not needed again
            model_kwargs.pop("pixel_values", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None, **kwargs
    ) -> tuple[GenerationConfig, dict]:
        """Also take `fairseq_max_len_eos=...` as a `generate` keyword (transformers would pass an unknown
        field on to the model); with the rule on, it supersedes `forced_eos_token_id` (same position)."""
        rule = kwargs.pop(FAIRSEQ_MAX_LEN_EOS, None)
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if rule is not None:
            setattr(generation_config, FAIRSEQ_MAX_LEN_EOS, check_fairseq_option(rule))
        if check_fairseq_option(getattr(generation_config, FAIRSEQ_MAX_LEN_EOS, None)):
            generation_config.forced_eos_token_id = None
        return generation_config, model_kwargs

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        """transformers' processors plus, with `fairseq_max_len_eos` on, OFA's rule at the length limit
        (see `ofa_ufo.generation.fairseq_rules`), after the caller's own processors (constraints) and
        before the sampling warpers."""
        rule = fairseq_max_len_eos_processor(generation_config)
        if rule is not None:
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), rule])
        return super()._get_logits_processor(generation_config, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Let `generate` build its usual cache, then switch it to `OFAUFOCache` (see there)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is EncoderDecoderCache:
            model_kwargs["cache"] = OFAUFOCache(cache.self_attention_cache, cache.cross_attention_cache)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
