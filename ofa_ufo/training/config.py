"""Experiment configs: one small YAML file per run, checked field by field.

A config names the model (a preset or a `save_pretrained` directory), the task mixture with
its sampling ratios and data sources, and the optimisation settings. Command-line overrides
are `key=value` pairs parsed as YAML (`max_steps=200`, `tasks={caption: 1, vqa: 2}`).
Unknown keys and wrong types are errors that name the field, so a typo never silently falls
back to a default. The resolved config is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ofa_ufo.data.demo_examples import check_demo_options
from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE, check_object_size
from ofa_ufo.models.damo_yolo import DENSE_PRESETS
from ofa_ufo.tasks import get_task, list_tasks

CONFIG_DIR = Path(__file__).parent / "configs"


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads `5e-4` (YAML 1.1: no dot) as a string; read it as the float it means."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """YAML as configs and `key=value` overrides mean it (safe loading; `5e-4` is a float)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A config file or override that does not match `TrainConfig`."""


@dataclass
class TrainConfig:
    # model: a preset name (`ofa_ufo_tiny`) or a save_pretrained directory to fine-tune from
    model: str = "ofa_ufo_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for a preset
    # VQGANModel directory (save_pretrained) that encodes text_to_image / image_infill targets
    vqgan: str = ""
    # task -> sampling ratio; each optimizer step holds every task in these proportions
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    # task -> data: "demo" (generated scenes) or a spec name/path from tasks/; missing tasks use demo
    data: dict[str, str] = field(default_factory=dict)
    # read `.jsonl` data lazily too (streamed; .tsv/.tar files, folders and shard patterns always are): each
    # process reads its share, record by record, and the position is kept in checkpoints (docs/data.md)
    streaming: bool = False
    # a streamed record that cannot be read: "raise" (the error names file and record) or "skip" (counted, logged)
    stream_on_error: str = "raise"
    # task -> held-out data ("demo", spec or .jsonl); default: the validation side of `data`
    eval_data: dict[str, str] = field(default_factory=dict)
    # fraction of text_to_image examples trained with an empty caption (the unconditional prompt that
    # classifier-free guidance, the pipeline's guidance_scale, contrasts with); Parti and Make-A-Scene use 0.1-0.2
    caption_dropout: float = 0.0
    demo_train_scenes: int = 20000
    demo_max_objects: int = 3
    # (min, max) side of a demo object's box as a fraction of the image side (training, held-out scenes and
    # the stem warm-up alike); larger objects keep shapes legible on coarse grids (8 x 8 VQGAN codes)
    demo_object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE
    # task -> keyword arguments of its demo example builder (ofa_ufo.data.demo_examples), for the training
    # draws and the held-out demo scenes alike, e.g. {grounding: {multi_prob: 0.3, none_prob: 0.2}}
    demo_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # identities of the generated demo data of each embedding task (reid_person, reid_vehicle, face,
    # product), 8 images each (ofa_ufo.data.demo_identities)
    demo_train_identities: int = 1000
    # a smaller trained model this run's preset starts from, grown into it so that it computes the same outputs
    # (ofa_ufo.models.growth: widths tiled, added layers identity): a save_pretrained directory, or a config name
    # whose run trains first (its finished model in its output_dir is reused); "": start from random weights
    grow_from: str = ""
    grow_overrides: list[str] = field(default_factory=list)  # key=value overrides of the grow_from config's run
    # generated scenes that train the ResNet stem alone (per-cell object labels) before step 0 of a
    # fresh run: the demo's stand-in for OFA's ImageNet-pretrained ResNet (ofa_ufo.training.stem_warmup)
    stem_warmup_images: int = 0
    # the warm-up labels each stem cell as an N x N grid of sub-cells, so the stem also learns where in a
    # cell an object lies (box precision for grounding and detection); 1: one label per cell
    stem_warmup_subcells: int = 1
    eval_examples: int = 100  # held-out examples per task (0: no evaluation)
    eval_every: int = 0  # steps between evaluations (0: before and after training only)
    # the last evaluation also scores the model with every held-out image replaced by a constant grey one: what
    # the prompt alone earns, printed as the table's "blind" column
    eval_blind: bool = False
    eval_batch_size: int = 16
    objective: str = "cross_entropy"  # or "scst" (captioning, CIDEr reward)
    label_smoothing: float = 0.1
    # weight of the embedding tasks' head losses (CosFace + triplet, summed over tasks) against the mean
    # token loss of the generative tasks, when a run mixes both
    head_loss_weight: float = 1.0
    # weight of grounding's auxiliary box-mask loss (ofa_ufo/tasks/box_mask.py: a linear head on the encoder's
    # image tokens predicts how much of each token's cell the referred box covers), added to the summed
    # token loss; 0: off, as in OFA
    box_mask_weight: float = 0.0
    # the dense detection head (DAMO-YOLO, docs/dense_detection.md) a run training dense_detection adds to its
    # model: a preset of ofa_ufo.models.damo_yolo.DENSE_PRESETS ("": small); its classes come from the data
    dense_head: str = ""
    # weight of the dense head's loss (a per-task mean per pass, like the feature-head losses) against the
    # mean token loss of the generative tasks
    dense_loss_weight: float = 1.0
    # distillation from a frozen teacher (docs/distillation.md): {teacher: DIR, token_kl, temperature, top_k,
    # correct_only, feature, feature_layers, feature_tasks, feature_temperature, embedding, teacher_dtype, stem}
    # (ofa_ufo.training.distillation); {}: off
    distill: dict[str, Any] = field(default_factory=dict)
    scst_beams: int = 5
    scst_max_new_tokens: int = 16
    # optimisation (OFA: Adam(0.9, 0.999), eps 1e-8, wd 0.01, linear decay after warmup)
    batch_size: int = 16  # global samples per micro-batch, over all processes
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-4
    # parameter-name prefix -> LR multiplier (longest prefix wins), e.g. {model.encoder: 0.3}
    lr_scale: dict[str, float] = field(default_factory=dict)
    end_lr: float = 0.0
    warmup_ratio: float = 0.01
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 5.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; the final model is the EMA when set
    # share of max_steps a routed supernet trains with every task on its shared FFN before each task's expert
    # starts as a copy of it (ofa_ufo.layers.moe; 0: experts from step 0, as the reference's pretrained start)
    task_experts_from: float = 0.0
    freeze_embeddings: bool = False
    # parameter-name prefixes left untrained, e.g. [model.encoder.embed_images] (a pretrained ResNet
    # stem: its backward pass is skipped too, the larger part of a CPU step at small image sizes, and
    # its BatchNorm keeps its running statistics)
    freeze: list[str] = field(default_factory=list)
    # BatchNorm layers (the ResNet stem) use their running statistics instead of per-batch ones
    # (OFA's --freeze-resnet): then grad accumulation and N processes equal one big batch exactly
    freeze_batchnorm: bool = False
    # auto: bf16 autocast where the device is fast at it (CUDA bf16, a CPU with AMX / AVX512-BF16), fp32
    # elsewhere (an AVX2-only CPU emulates bf16, ~150x slower) | fp32 | bf16 (forced); fp32 weights and optimizer
    # state either way. The choice is printed at the start and saved in metrics.json (docs/training.md)
    precision: str = "auto"
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads (0: torch's default)
    # DataLoader worker processes that build the next micro-batches while the model trains (0: build
    # them in the training process; on a GPU the batch building is otherwise most of the step); at
    # most the CPUs this process may use
    data_workers: int = 0
    # output
    output_dir: str = "checkpoints/run"
    save_every: int = 0  # steps between resumable checkpoints (0: at the end only)
    keep_last: int = 2
    log_every: int = 10
    show_photos: bool = False  # print predictions on the bundled real photos at the end
    description: str = ""

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_CHOICES = {"objective": ("cross_entropy", "scst"), "precision": ("auto", "fp32", "bf16"),
            "stream_on_error": ("raise", "skip")}
_NON_NEGATIVE = ("demo_train_scenes", "stem_warmup_images", "demo_train_identities", "eval_examples", "eval_every",
                 "end_lr", "warmup_ratio", "weight_decay", "clip_norm", "ema_decay", "label_smoothing", "caption_dropout",
                 "head_loss_weight", "box_mask_weight", "dense_loss_weight", "num_threads", "data_workers",
                 "save_every", "seed")
_POSITIVE = ("batch_size", "grad_accum", "max_steps", "lr", "keep_last", "log_every", "eval_batch_size",
             "scst_beams", "scst_max_new_tokens", "demo_max_objects", "stem_warmup_subcells")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """`value` as the field's type (ints are accepted for floats, lists for tuples), else ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None  # an optional field left unset (YAML null)
        return _coerce(name, value, next(a for a in typing.get_args(annotation) if a is not type(None)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        if len(value) != len(args):
            raise ConfigError(f"field {name!r} expects {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if origin is dict and isinstance(value, dict):
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(name, k, key_type): _coerce(f"{name}.{k}", v, value_type) for k, v in value.items()}
    base = origin or annotation
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"field {name!r} expects {_type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _check_ranges(config: TrainConfig) -> None:
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"field {name!r} must be one of {list(choices)}, got {getattr(config, name)!r}")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ConfigError(f"field {name!r} must be >= 0, got {getattr(config, name)!r}")
    for name in _POSITIVE:
        if getattr(config, name) <= 0:
            raise ConfigError(f"field {name!r} must be > 0, got {getattr(config, name)!r}")
    if not config.tasks or any(r <= 0 for r in config.tasks.values()):
        raise ConfigError(f"field 'tasks' needs at least one task with a ratio > 0, got {config.tasks!r}")
    unknown_tasks = sorted(set(config.tasks) - set(list_tasks()))
    if unknown_tasks:
        raise ConfigError(f"field 'tasks' names unknown task(s) {unknown_tasks}; registered tasks: {list_tasks()}")
    if config.batch_size < len(config.tasks):
        raise ConfigError(f"batch_size {config.batch_size} cannot hold one sample of each of the "
                          f"{len(config.tasks)} tasks {sorted(config.tasks)}")
    stray = sorted((set(config.data) | set(config.eval_data) | set(config.demo_options)) - set(config.tasks))
    if stray:
        raise ConfigError(f"fields 'data'/'eval_data'/'demo_options' name task(s) {stray} that are not in 'tasks' "
                          f"{sorted(config.tasks)}")
    try:
        check_demo_options(config.demo_options)
    except ValueError as error:
        raise ConfigError(f"field 'demo_options': {error}") from None
    bad_scales = {k: v for k, v in config.lr_scale.items() if v <= 0}
    if bad_scales:
        raise ConfigError(f"field 'lr_scale' needs multipliers > 0, got {bad_scales!r}")
    if config.warmup_ratio >= 1:
        raise ConfigError(f"field 'warmup_ratio' must be < 1, got {config.warmup_ratio}")
    if config.ema_decay >= 1:
        raise ConfigError(f"field 'ema_decay' must be < 1, got {config.ema_decay}")
    if not 0 <= config.task_experts_from <= 1:
        raise ConfigError(f"field 'task_experts_from' is a share of max_steps in [0, 1], "
                          f"got {config.task_experts_from}")
    try:
        check_object_size(config.demo_object_size)
    except ValueError as error:
        raise ConfigError(f"field 'demo_object_size': {error}") from None
    if config.dense_head and config.dense_head not in DENSE_PRESETS:
        raise ConfigError(f"field 'dense_head' must be one of the dense presets {sorted(DENSE_PRESETS)}, "
                          f"got {config.dense_head!r}")
    if config.caption_dropout >= 1:
        raise ConfigError(f"field 'caption_dropout' must be < 1 (a fraction of the examples), "
                          f"got {config.caption_dropout}")
    if config.grow_overrides and not config.grow_from:
        raise ConfigError("field 'grow_overrides' changes the grow_from run, but grow_from is empty")
    if config.grow_from and config.stem_warmup_images:
        raise ConfigError("fields 'grow_from' and 'stem_warmup_images' exclude each other: a grown model's ResNet "
                          "stem is the small model's (set stem_warmup_images=0 or grow_from='')")
    _check_source_options(config)
    distill = parse_distill(config.distill)
    if distill is not None and distill.stem and not config.stem_warmup_images:
        raise ConfigError("field 'distill' sets stem: true (the stem warm-up learns the teacher's stem features) "
                          "but stem_warmup_images is 0: set the number of generated scenes it learns from")


def _check_source_options(config: TrainConfig) -> None:
    """A field that only some tasks' training sources read (`Task.source_options`, e.g. caption_dropout)
    is a mistake in a run without any of those tasks."""
    owners: dict[str, list[str]] = {}
    for name in list_tasks():
        for option in get_task(name).source_options:
            owners.setdefault(option, []).append(name)
    for option, tasks in owners.items():
        if getattr(config, option) and not set(tasks) & set(config.tasks):
            raise ConfigError(f"field {option!r} applies to {' / '.join(tasks)} examples, but tasks has no "
                              f"{' or '.join(tasks)}")


def checked_dataclass(cls: type, raw: dict[str, Any], source: str, check: Callable[[Any], None]) -> Any:
    """`cls(**raw)` with every value coerced to its field's type, then `check(config)`; unknown keys,
    wrong types and the check's complaints are ConfigErrors prefixed by `source` (a file name)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys are {sorted(hints)}")
    try:
        config = cls(**{k: _coerce(k, v, hints[k]) for k, v in raw.items()})
        check(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


# the encoder's output states; those at the image positions only; the image tokens entering the encoder; the
# dense detector's neck outputs (dense rows)
DISTILL_FEATURE_LAYERS = ("encoder", "encoder_image", "image", "neck")
DISTILL_TEACHER_DTYPES = ("fp32", "bf16")


@dataclass
class DistillSettings:
    """The `distill` field (docs/distillation.md; used by ofa_ufo.training.distillation)."""

    teacher: str = ""  # save_pretrained directory of the teacher
    token_kl: float = 1.0  # weight of the token KL (0: off)
    temperature: float = 1.0  # softens both token distributions (> 1 with top_k only: see token_kl)
    top_k: int = 0  # > 0: the token KL over the teacher's k most likely tokens only (0: whole vocabulary)
    correct_only: bool = False  # the token KL only at target tokens the teacher ranks first
    feature: float = 0.0  # starting weight of the feature (CWD) loss, decayed to 0.1x over the run (0: off)
    feature_layers: list[str] = field(default_factory=lambda: ["encoder"])
    # the tasks whose rows the CWD of the encoder / image states covers (None: every task's): the CWD on
    # grounding's rows taught a demo student to encode the image the same whatever phrase it was asked for
    # (docs/distillation.md)
    feature_tasks: list[str] | None = None
    feature_temperature: float = 1.0  # CWD's tau (DAMO-YOLO: 1)
    embedding: float = 1.0  # weight of the embedding loss on rows without target tokens (0: off)
    teacher_dtype: str = "fp32"  # fp32 | bf16 (the teacher's weights and forward)
    # the stem warm-up (stem_warmup_images scenes) regresses the teacher's stem features, not per-cell labels
    # (ofa_ufo.training.stem_warmup.distill_stem; stem_warmup_subcells is then unused): a small student's own
    # stem starts from what the teacher sees
    stem: bool = False


def _check_distill(settings: DistillSettings) -> None:
    if not settings.teacher:
        raise ConfigError("'teacher' must name the teacher's save_pretrained directory")
    if settings.teacher_dtype not in DISTILL_TEACHER_DTYPES:
        raise ConfigError(f"'teacher_dtype' must be one of {list(DISTILL_TEACHER_DTYPES)}, "
                          f"got {settings.teacher_dtype!r}")
    unknown = [name for name in settings.feature_layers if name not in DISTILL_FEATURE_LAYERS]
    if unknown:
        raise ConfigError(f"'feature_layers' names unknown layer(s) {unknown}; "
                          f"valid layers: {list(DISTILL_FEATURE_LAYERS)}")
    for name in ("token_kl", "feature", "embedding", "top_k"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name!r} must be >= 0, got {getattr(settings, name)}")
    for name in ("temperature", "feature_temperature"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name!r} must be > 0, got {getattr(settings, name)}")


def parse_distill(raw: dict[str, Any]) -> DistillSettings | None:
    """The checked `distill` field (None when empty); ConfigError naming the bad key."""
    if not raw:
        return None
    return checked_dataclass(DistillSettings, raw, "field 'distill'", _check_distill)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and check a config; `source` (a file name) prefixes every error."""
    return checked_dataclass(TrainConfig, raw, source, _check_ranges)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (`pretrain_ofa_tiny`, `finetune/vqav2`) or any YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(f"no config file {str(name_or_path)!r}; shipped configs: {', '.join(names)}")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (`lr=3e-4`, `tasks={vqa: 1}`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip(), read_yaml(value)


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a config file (or the defaults when None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        raw[key] = value
    if overrides:
        source += " + overrides"
    return config_from_dict(raw, source)
