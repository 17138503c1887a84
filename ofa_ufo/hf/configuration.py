"""Configuration of the OFA-UFO encoder-decoder.

Field names follow the OFA Hugging Face port (BART-like names plus OFA's extras) so that a
converted OFA `config.json` maps onto this class by a short rename table. The vision section
(`vision_config`) holds the ResNet stem and the UFO supernet; zero supernet blocks is exactly OFA.
"""

from __future__ import annotations

import numbers
import os
import warnings

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ofa_ufo.hf.saved_files import CONFIG_FILES, check_files, local_directory, naming_files
from ofa_ufo.models.damo_yolo import DENSE_PRESETS
from ofa_ufo.tasks import FREE_PROMPT, list_tasks

# How retrieval tasks (ReID, face, product) read an embedding out of the model (`OFAUFOModel.embed`):
# "decoder": the final decoder state at the first step (image and prompt through every layer);
# "image": the mean of the image tokens entering the text-image encoder (after the supernet's task
# route and projection), which keeps metric-learning gradients out of the layers the generation tasks use.
EMBEDDING_READOUTS = ("decoder", "image")

RESNET_LAYERS = {
    "resnet14": (1, 1, 1),  # not OFA sizes: the small CNN students' stems (docs/distillation.md)
    "resnet26": (2, 2, 2),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

# Keys that PreTrainedConfig itself consumes or writes; anything else unknown is a user error.
_BASE_KEYS = {
    "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
    "experts_implementation", "per_layer_config", "transformers_version", "model_type",
    "_attn_implementation_internal", "_experts_implementation_internal", "num_labels",
}


# The annotations the fields use (strings: `from __future__ import annotations`) -> (accepted type, wording).
# bool is checked apart: JSON `true` is no number, and 1 is no flag.
_FIELD_TYPES = {
    "int": (numbers.Integral, "an integer"), "float": (numbers.Real, "a number"), "bool": (bool, "true or false"),
    "str": (str, "a string"), "None": (type(None), "null"), "dict": (dict, "an object"),
    "PreTrainedConfig": (PreTrainedConfig, "a config"),
}

_PLURALS = {"int": "integers", "float": "numbers", "str": "strings"}


def _fits(value: object, annotation: str) -> bool:
    """Whether `value` fits one alternative of a field annotation (`int`, `list[int]`, ...); unknown forms pass."""
    if annotation.startswith("list[") and annotation.endswith("]"):
        return isinstance(value, (list, tuple)) and all(_fits(v, annotation[5:-1]) for v in value)
    if annotation not in _FIELD_TYPES:
        return True
    if isinstance(value, bool) != (annotation == "bool") and annotation != "None":
        return False
    return isinstance(value, _FIELD_TYPES[annotation][0])


def check_field_types(config: PreTrainedConfig) -> None:
    """Raise a TypeError naming the field and the type it needs for a value of the wrong type (e.g. a
    config.json with `"d_model": "768"`), which would otherwise fail later inside an arithmetic or torch."""
    for name in type(config).__annotations__:
        field = type(config).__dataclass_fields__.get(name)
        if field is None or not isinstance(field.type, str):
            continue
        options = [option.strip() for option in field.type.split("|")]
        value = getattr(config, name)
        if not any(_fits(value, option) for option in options):
            wanted = " or ".join(_FIELD_TYPES[o][1] if o in _FIELD_TYPES else f"a list of {_PLURALS.get(o[5:-1], o)}"
                                 for o in options)
            raise TypeError(f"{type(config).__name__} field {name} must be {wanted}, got {value!r}")


def check_dense_head(entry: dict) -> dict:
    """The `dense_head` config entry with its preset checked and its labels a list; ValueError naming the
    problem (an unknown key or preset, labels that are missing, empty, repeated or not strings)."""
    unknown = sorted(set(entry) - {"preset", "labels"})
    if unknown:
        raise ValueError(f"dense_head takes 'preset' and 'labels', got unknown key(s) {unknown}")
    preset = entry.get("preset", "tiny")
    if not isinstance(preset, str) or preset not in DENSE_PRESETS:
        raise ValueError(f"dense_head preset must be one of {sorted(DENSE_PRESETS)}, got {preset!r}")
    labels = entry.get("labels")
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or not labels:
        raise ValueError(f"dense_head labels must be a non-empty list of class names, got {labels!r}")
    if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"dense_head labels must be distinct non-empty strings, got {list(labels)!r}")
    return {"preset": preset, "labels": list(labels)}


def reject_unknown_fields(config: PreTrainedConfig, kwargs: dict) -> None:
    """Raise on fields the config does not define, instead of silently storing them."""
    unknown = sorted(set(kwargs) - _BASE_KEYS)
    if unknown:
        fields = sorted(set(config.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__))
        raise ValueError(
            f"{type(config).__name__} got unknown field(s) {unknown}. Valid fields: {fields}"
        )


@strict(accept_kwargs=True)
class OFAUFOVisionConfig(PreTrainedConfig):
    """Vision section: ResNet stages 1-3 (stride 16) and the UFO supernet blocks after it.

    `task_names` is the model's task vocabulary, saved with its weights: a routed supernet routes a task
    on its position there (`route_id`), so registering or reordering tasks never re-routes a checkpoint.
    """

    model_type = "ofa-ufo-vision"

    resnet_type: str = "resnet101"
    resnet_drop_path_rate: float = 0.0
    supernet_layers: int = 0
    supernet_dim: int = 1024
    supernet_heads: int = 16
    supernet_head_dim: int = 64
    supernet_mlp_ratio: float = 4.0
    supernet_num_tasks: int = 0  # routers per block; a routed supernet has one per name in task_names
    supernet_routed: bool = True  # False: an extracted dense subnet (no routers, one FFN per block)
    supernet_task: str | None = None  # the task an extracted subnet serves
    supernet_layer_heads: list[int] | None = None  # per-block sizes of an extracted subnet
    supernet_layer_hidden: list[int] | None = None
    supernet_elastic_heads: list[int] | None = None  # choices sampled per block in training
    supernet_elastic_mlp_ratios: list[float] | None = None
    supernet_elastic_depths: list[int] | None = None
    supernet_sample_arch: bool = False  # sample an elastic arch every training step
    supernet_sandwich: bool = False  # also train the largest and smallest arch each step
    task_names: list[str] | None = None  # the task vocabulary (None: saved before it existed, see _legacy_task_names)

    def __post_init__(self, **kwargs):
        check_field_types(self)
        if self.resnet_type not in RESNET_LAYERS:
            raise ValueError(
                f"Unknown resnet_type {self.resnet_type!r}; expected one of {sorted(RESNET_LAYERS)}"
            )
        if self.supernet_layers < 0:
            raise ValueError(f"supernet_layers must be >= 0, got {self.supernet_layers}")
        reject_unknown_fields(self, kwargs)
        super().__post_init__(**kwargs)
        self._check_supernet()
        if self.task_names is None:
            self.task_names = self._legacy_task_names()
        self._check_task_names()
        if self.supernet_layers and not self.supernet_num_tasks:
            self.supernet_num_tasks = len(self.task_names) if self.supernet_routed else 1

    @property
    def routes_tasks(self) -> bool:
        """Whether the model has a routed supernet, the one part whose output depends on the task id."""
        return bool(self.supernet_layers and self.supernet_routed)

    def route_id(self, task: str) -> int:
        """The id the supernet routes `task` on: its position in `task_names` (free prompts route as
        captioning). The one name -> id map; a model without a routed supernet ignores the id (0)."""
        if not self.routes_tasks:
            return 0
        name = "caption" if task == FREE_PROMPT else task
        if name not in self.task_names:
            raise ValueError(f"Unknown task {task!r} for this model; its tasks (task_names): "
                             f"{', '.join(self.task_names)}")
        return self.task_names.index(name)

    def _legacy_task_names(self) -> list[str]:
        """What a config saved without `task_names` meant: an extracted subnet serves its one task; a routed
        supernet routed on positions in the registry's order (now as then, cut to its router count), so only
        there is taking today's order a guess worth a warning."""
        if self.supernet_task is not None:
            return [self.supernet_task]
        names = list_tasks()
        if not self.routes_tasks:
            return names
        if self.supernet_num_tasks > len(names):
            raise ValueError(f"this supernet routes {self.supernet_num_tasks} tasks but only {len(names)} are "
                             "registered and its config has no task_names: register its tasks, in their old order, "
                             "before loading")
        warnings.warn("config has no vision_config.task_names (saved before task vocabularies): routing by "
                      "today's registry order; save the model again to pin it", UserWarning)
        return names[: self.supernet_num_tasks or None]

    def _check_task_names(self) -> None:
        """Every name must be a registered task (its prompt and decoding are code) and routers must match."""
        unknown = [name for name in self.task_names if name not in (*list_tasks(), FREE_PROMPT)]
        if unknown:
            raise ValueError(f"this model's task_names include unregistered task(s) {unknown}: register them "
                             "(ofa_ufo.tasks.register_task) before loading the model")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names has repeated names: {self.task_names}")
        routers = len(self.task_names) if self.supernet_routed else 1
        if self.supernet_layers and self.supernet_num_tasks not in (0, routers):
            raise ValueError(f"supernet_num_tasks={self.supernet_num_tasks} does not match the {routers} router(s) "
                             f"task_names {self.task_names} gives")

    def _check_supernet(self) -> None:
        """Per-block sizes and elastic choices must fit the stored (largest) weights."""
        for name, values, limit in (
            ("supernet_layer_heads", self.supernet_layer_heads, self.supernet_heads),
            ("supernet_elastic_heads", self.supernet_elastic_heads, self.supernet_heads),
            ("supernet_elastic_depths", self.supernet_elastic_depths, self.supernet_layers),
        ):
            if values is not None and not all(1 <= v <= limit for v in values):
                raise ValueError(f"{name}={values}: every value must lie in [1, {limit}]")
        if self.supernet_elastic_mlp_ratios is not None and not all(
            0 < r <= self.supernet_mlp_ratio for r in self.supernet_elastic_mlp_ratios
        ):
            raise ValueError(
                f"supernet_elastic_mlp_ratios={self.supernet_elastic_mlp_ratios}: every ratio must lie in "
                f"(0, {self.supernet_mlp_ratio}]"
            )
        for name in ("supernet_layer_heads", "supernet_layer_hidden"):
            values = getattr(self, name)
            if values is not None and len(values) != self.supernet_layers:
                raise ValueError(f"{name} has {len(values)} entries for {self.supernet_layers} supernet layers")

    @property
    def layer_heads(self) -> list[int]:
        return list(self.supernet_layer_heads or [self.supernet_heads] * self.supernet_layers)

    @property
    def layer_hidden(self) -> list[int]:
        full = int(self.supernet_dim * self.supernet_mlp_ratio)
        return list(self.supernet_layer_hidden or [full] * self.supernet_layers)

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        return RESNET_LAYERS[self.resnet_type]


@strict(accept_kwargs=True)
class OFAUFOConfig(PreTrainedConfig):
    """Architecture of an OFA-UFO model; saved as `config.json` beside the weights.

    Defaults are the OFA-Base shape. The unified vocabulary is text ids, then `num_codes` VQGAN
    code tokens starting at `code_offset`, then `num_bins` location bins at `bin_offset`.
    `embedding_readout` picks the retrieval tasks' embedding (`EMBEDDING_READOUTS`).
    """

    model_type = "ofa-ufo"
    sub_configs_defaults = {"vision_config": OFAUFOVisionConfig}
    attribute_map = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "decoder_layers",
    }

    vocab_size: int = 59457
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    init_std: float = 0.02
    max_position_embeddings: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    attn_scale_factor: float = 2.0
    normformer: bool = True
    scale_heads: bool = True
    image_size: int = 384
    code_image_size: int = 128
    num_codes: int = 8192
    num_bins: int = 1000
    code_offset: int = 50265
    bin_offset: int = 58457
    label_smoothing: float = 0.0
    box_mode: str = "normalized"
    embedding_readout: str = "decoder"
    max_image_size: int = 512
    vision_config: dict | PreTrainedConfig | None = None
    # the DAMO-YOLO dense detection head (task dense_detection, docs/dense_detection.md):
    # {"preset": a DENSE_PRESETS name, "labels": its class names}; None: no dense head
    dense_head: dict | None = None
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 0
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        check_field_types(self)
        reject_unknown_fields(self, kwargs)
        super().__post_init__(**kwargs)
        self._check()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> OFAUFOConfig:
        """As transformers', but a config.json that is truncated, not JSON or not a JSON object, or holds a
        field of the wrong type or value, fails with an error naming the file (a `SavedFileError`)."""
        directory = local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        check_files(directory, CONFIG_FILES)
        overrides = sorted(set(kwargs) & set(cls.__dataclass_fields__))  # a bad override is not the file's fault
        what = "the model config" + (f" (with the overrides {', '.join(overrides)})" if overrides else "")
        with naming_files(directory, CONFIG_FILES, what):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _check(self) -> None:
        """Catch shapes that would only fail deep inside torch."""
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by {side}_attention_heads={heads}")
        if self.bin_offset + self.num_bins > self.vocab_size:
            raise ValueError(
                f"bins [{self.bin_offset}, {self.bin_offset + self.num_bins}) exceed vocab_size={self.vocab_size}"
            )
        if self.code_offset + self.num_codes > self.bin_offset:
            raise ValueError(f"codes [{self.code_offset}, +{self.num_codes}) overlap bins at {self.bin_offset}")
        if self.box_mode not in ("normalized", "ofa"):
            raise ValueError(f"box_mode must be 'normalized' or 'ofa', got {self.box_mode!r}")
        if self.dense_head is not None:
            self.dense_head = check_dense_head(self.dense_head)
        if self.embedding_readout not in EMBEDDING_READOUTS:
            raise ValueError(f"embedding_readout must be one of {EMBEDDING_READOUTS}, got {self.embedding_readout!r}")
        grid = self.image_size // 16
        if grid > self.image_bucket_size:
            raise ValueError(
                f"image_size={self.image_size} gives a {grid}x{grid} grid; the 2-D relative bias "
                f"supports at most {self.image_bucket_size} (image_size <= {16 * self.image_bucket_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads
