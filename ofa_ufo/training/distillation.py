"""Distillation into a small student (UFO's CNN / chip students, DAMO-YOLO's feature distillation).

A run sets `distill: {teacher: DIR, ...}` (`DistillSettings`): the teacher, a `save_pretrained` directory
(a task subnet or a whole supernet), runs frozen in eval mode beside the run's model (the student) on the
same batch, and three weighted losses join the student's own:

- token KL on the teacher's distributions at the target tokens, KL(p_t^T || p_s^T) x T^2, summed over
  tokens like the token loss (the trainer divides both by the step's token count), over the whole
  vocabulary or over the teacher's top k tokens (`top_k`, see `token_kl`), at every target token or only
  where the teacher ranks the target first (`correct_only`);
- channel-wise distillation (CWD, DAMO-YOLO) of encoder states ("encoder": the encoder's output at every
  position, "encoder_image": its output at the image positions only, DAMO-YOLO's spatial softmax without
  the prompt's tokens, "image": the image tokens entering it; on the rows of `feature_tasks`, default all)
  and of the dense detector's neck ("neck": each level's map, on the rows trained through the dense head,
  DAMO-YOLO's own use): a learned linear map (a 1x1 conv on the neck) where the widths differ, a non-affine
  normalisation of every channel, then per channel a softmax over the positions and KL(teacher || student)
  x tau^2 / (rows x channels), summed over the neck's levels; its weight decays as
  w(t) = 1 - 0.9 (1 - cos(pi t / T)) / 2;
- embedding distillation for the rows without target tokens (ReID, face, product): 1 - cosine between
  the (projected) student and the teacher embedding, a mean over those rows.

The projections train with the student and are kept in the trainer state, never exported.
Teacher outputs are computed on the fly (no cache). Each step's parts (the student's own token CE and each
weighted distillation loss, `take_sums`) go to the run's log, TensorBoard (`train/distill/<name>`),
training.png and metrics.json (`distill_losses`), so a run shows which part moves its loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration, embedding_readout, shift_tokens_right
from ofa_ufo.training.config import ConfigError, DistillSettings, parse_distill

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATE_KEY = "distill"  # the projections' entry in a checkpoint's trainer state
_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask")
_VOCAB_FIELDS = ("vocab_size", "code_offset", "num_codes", "bin_offset", "num_bins")


# ---- the losses ------------------------------------------------------------------------------


def feature_weight(step: int, total: int) -> float:
    """DAMO-YOLO's decaying distillation weight: 1 at step 0, 0.55 halfway, 0.1 at `total`."""
    return 1.0 - 0.9 * (1.0 - math.cos(math.pi * min(step, total) / max(total, 1))) / 2.0


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             top_k: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over N target tokens of KL(teacher || student) on their temperature-softened distributions
    (N, V) x T^2 (Hinton's scaling keeps the gradient size independent of T).

    `top_k` > 0 compares the two distributions over the teacher's k most likely tokens of each row only,
    both renormalised there: a label-smoothed teacher puts a little mass on each of the unified vocabulary's
    ~59k tokens, and softening (T > 1) turns that tail into most of the distribution (at the demo chips
    teacher's VQA targets its top 5 tokens hold 84 % of the mass at T = 1, 3 % at T = 2), so the full KL
    mostly teaches the student to be uniform. Over the top k the student learns the teacher's ranking of its
    candidates; its own cross-entropy keeps pushing the rest down.

    `labels` (N,): the KL only at the tokens whose target the teacher ranks first; where the teacher is wrong
    its distribution pulls the student towards the wrong answer (a teacher weaker than the student on a
    task, as the demo chips supernet on VQA, then teaches the student down)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if labels is not None:
        right = teacher_logits.argmax(-1) == labels  # (N,)
        student_logits, teacher_logits = student_logits[right], teacher_logits[right]
    if top_k:
        index = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices  # (N, k)
        student_logits, teacher_logits = student_logits.gather(-1, index), teacher_logits.gather(-1, index)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum()
    return kl * temperature**2


def normalize_channels(states: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Non-affine batch norm of (B, L, C) states: each channel to mean 0, variance 1 over the valid
    positions (`mask` (B, L)), as DAMO-YOLO's BatchNorm without weights puts both feature sets on one scale."""
    weights = mask[..., None].to(states.dtype)  # (B, L, 1)
    count = weights.sum().clamp_min(1.0)
    mean = (states * weights).sum((0, 1)) / count  # (C,)
    var = (((states - mean) ** 2) * weights).sum((0, 1)) / count
    return (states - mean) / torch.sqrt(var + eps)


def channel_wise_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """CWD of (B, L, C) maps: per row and channel, softmax over the valid positions (`mask` (B, L)) at
    temperature `tau`, KL(teacher || student) summed over channels and positions x tau^2, / (B x C)."""
    pad = ~mask[..., None]  # (B, L, 1)
    log_s = F.log_softmax((student.float() / tau).masked_fill(pad, -1e9), dim=1)  # softmax over L
    log_t = F.log_softmax((teacher.float() / tau).masked_fill(pad, -1e9), dim=1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(pad, 0.0).sum()
    return kl * tau**2 / (student.shape[0] * student.shape[2])


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cosine(student, teacher) of (B, D) embeddings (retrieval ranks by cosine)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


# ---- forward passes --------------------------------------------------------------------------


@dataclass
class PassOutputs:
    """What distillation reads from one forward pass of a model over a training batch."""

    logits: torch.Tensor  # (N, V) at the N target tokens
    encoder: torch.Tensor  # (B, S, D) encoder output
    encoder_image: torch.Tensor | None  # (B, n, D) encoder output at the image positions
    image: torch.Tensor | None  # (B, n, D) image tokens entering the encoder layers
    mask: torch.Tensor  # (B, S) valid (non-padding) encoder positions
    features: torch.Tensor | None  # (B, D) embedding read-out


def model_pass(model, batch: dict[str, torch.Tensor], task_ids: torch.Tensor | None) -> PassOutputs:
    """One teacher-forced forward pass (logits only at target tokens) with the states distillation reads."""
    config = getattr(model, "module", model).config
    labels = batch["labels"]
    targets = labels != -100  # (B, T)
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    inputs = {k: batch[k] for k in _INPUT_KEYS if batch.get(k) is not None}
    out = model(**inputs, task_ids=task_ids, decoder_input_ids=decoder_input_ids, code_grid=batch.get("code_grid"),
                logits_mask=targets, output_hidden_states=True)
    text = batch["input_ids"].shape[1]
    images = out.encoder_last_hidden_state.shape[1] - text  # image tokens come first
    image_valid = torch.ones(labels.shape[0], images, dtype=torch.bool, device=labels.device)
    if batch.get("image_mask") is not None:
        image_valid = image_valid & batch["image_mask"].bool()[:, None]
    mask = torch.cat([image_valid, batch["attention_mask"].bool()], 1)  # (B, S)
    image = out.encoder_hidden_states[0][:, :images] if images else None  # (B, n, D)
    encoder_image = out.encoder_last_hidden_state[:, :images] if images else None  # (B, n, D)
    features = embedding_readout(config, out.decoder_last_hidden_state, out.image_embedding)
    return PassOutputs(out.logits, out.encoder_last_hidden_state, encoder_image, image, mask, features)


def load_teacher(path: str, dtype: str, device: torch.device | str) -> OFAUFOForConditionalGeneration:
    """The teacher from its save_pretrained directory: eval mode, no gradients, in `dtype` (fp32 | bf16)."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"field 'distill.teacher': {path} is not a save_pretrained directory (no config.json)")
    teacher = OFAUFOForConditionalGeneration.from_pretrained(path).to(device=device, dtype=TEACHER_DTYPES[dtype])
    teacher.requires_grad_(False)
    return teacher.eval()


# ---- the distiller ---------------------------------------------------------------------------


def _projection(student_dim: int, teacher_dim: int) -> nn.Module:
    """The learned student -> teacher width map (DAMO-YOLO's align conv; a linear map on tokens)."""
    return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


def _neck_widths(model, role: str, path: str) -> tuple[int, ...]:
    """The channels of a model's dense-neck levels; ConfigError when it has no dense head."""
    head = getattr(model, "dense_head", None)
    if head is None:
        raise ConfigError(f"distill feature layer 'neck' needs a dense detection head on teacher and student; the "
                          f"{role} {path} has none (train task dense_detection, docs/dense_detection.md)")
    return tuple(head.preset["widths"])


def _neck_projections(teacher, student, teacher_path: str) -> nn.ModuleList:
    """Per neck level, the student -> teacher channel map (DAMO-YOLO's 1x1 align conv) or the identity."""
    t_widths = _neck_widths(teacher, "teacher", teacher_path)
    s_widths = _neck_widths(student, "student", "model")
    return nn.ModuleList(nn.Identity() if s == t else nn.Conv2d(s, t, 1) for s, t in zip(s_widths, t_widths))


class Distiller:
    """The teacher, the projections, and the distillation losses of one training pass."""

    def __init__(self, settings: DistillSettings, teacher, student, tasks: list[str], total_steps: int) -> None:
        check_pair(teacher, student, tasks, settings.teacher, settings.feature_tasks)
        self.settings, self.teacher, self.total_steps = settings, teacher, total_steps
        teacher_dim, student_dim = teacher.config.d_model, student.config.d_model
        layers = [name for name in settings.feature_layers if name != "neck"] if settings.feature else []
        self.projections = nn.ModuleDict({name: _projection(student_dim, teacher_dim)
                                          for name in [*layers, "embedding"]})
        self.token_layers = layers  # read on the decoder's rows; the neck on the dense head's
        if settings.feature and "neck" in settings.feature_layers:
            self.projections["neck"] = _neck_projections(teacher, getattr(student, "module", student),
                                                         settings.teacher)
        self.sums = dict.fromkeys(self.part_names(), 0.0)

    def part_names(self) -> list[str]:
        """The loss parts this run records per step (`take_sums`): the student's own token CE, then each
        distillation loss the settings switch on, in a fixed order (the same on every process)."""
        settings, names = self.settings, ["student_ce"]
        if settings.token_kl:
            names.append("token_kl")
        if settings.feature and self.token_layers:
            names.append("feature")
        if settings.embedding:
            names.append("embedding")
        if "neck" in self.projections:
            names.append("neck")
        return names

    def take_sums(self) -> dict[str, float]:
        """The loss parts summed over this step's passes so far, weighted as they enter the loss (token parts
        summed over target tokens, the others over passes of their means), then reset for the next step."""
        sums, self.sums = self.sums, dict.fromkeys(self.sums, 0.0)
        return {name: float(value) for name, value in sums.items()}

    def _record(self, name: str, value: torch.Tensor) -> None:
        """Add a part's value of one pass, kept on its device (read once per step, by `take_sums`)."""
        if name in self.sums:
            self.sums[name] = self.sums[name] + value.detach().float()

    def parameters(self) -> list[nn.Parameter]:
        """The projections' parameters (the teacher's are frozen and not the run's to optimise)."""
        return list(self.projections.parameters())

    def to(self, device: torch.device | str) -> Distiller:
        self.projections.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.projections.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.projections.load_state_dict(state)

    def student_losses(self, model, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]],
                       label_smoothing: float, step: int) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """The trainer's one call: (summed token loss + weighted token KL, weighted mean distillation losses,
        embedding read-outs (B, D), encoder states (B, S, D)) of one student pass over `batch`."""
        student = model_pass(model, batch, batch.get("task_ids"))
        labels = batch["labels"]
        loss = F.cross_entropy(student.logits.float(), labels[labels != -100], label_smoothing=label_smoothing,
                               reduction="sum")
        self._record("student_ce", loss)
        token, mean = self.losses(student, batch, examples, step)
        return loss + token, mean, student.features, student.encoder

    def _teacher_pass(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> PassOutputs:
        """The teacher's pass on the batch, its tasks routed by the teacher's own task vocabulary."""
        vision = self.teacher.config.vision_config
        device = batch["input_ids"].device
        task_ids = torch.tensor([vision.route_id(e["task"]) for e in examples], device=device)  # (B,)
        dtype = next(self.teacher.parameters()).dtype
        cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            return model_pass(self.teacher, cast, task_ids)

    def losses(self, student: PassOutputs, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]],
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted token KL summed over the target tokens, weighted feature + embedding losses as means)."""
        settings, teacher = self.settings, self._teacher_pass(batch, examples)
        zero = student.encoder.new_zeros((), dtype=torch.float32)
        token = zero
        if settings.token_kl and student.logits.numel():
            labels = batch["labels"]
            targets = labels[labels != -100] if settings.correct_only else None  # (N,), as the logits' rows
            token = settings.token_kl * token_kl(student.logits, teacher.logits, settings.temperature,
                                                 settings.top_k, targets)
            self._record("token_kl", token)
        mean = zero
        if settings.feature and self.token_layers:
            weight = settings.feature * feature_weight(step, self.total_steps)
            covered = [settings.feature_tasks is None or e["task"] in settings.feature_tasks for e in examples]
            rows = torch.tensor(covered, device=student.encoder.device)  # (B,)
            feature = weight * sum(self._feature_loss(name, student, teacher, rows) for name in self.token_layers)
            self._record("feature", feature)
            mean = mean + feature
        rows = (batch["labels"] == -100).all(1)  # (B,): rows trained through their embedding only
        if settings.embedding and rows.any() and student.features is not None:
            projected = self.projections["embedding"](student.features[rows])
            embedding = settings.embedding * embedding_loss(projected, teacher.features[rows].float())
            self._record("embedding", embedding)
            mean = mean + embedding
        return token, mean

    def model_output_loss(self, outputs: dict[str, Any], batch: dict[str, torch.Tensor],
                          examples: list[dict[str, Any]], step: int) -> torch.Tensor:
        """The weighted CWD of the dense neck (summed over its levels) on rows trained through their task's
        `model_outputs` (`batch` and `examples` hold only them); 0 when the run does not distil the neck."""
        student = outputs.get("neck_features")
        if "neck" not in self.projections or student is None:
            return batch["pixel_values"].new_zeros((), dtype=torch.float32)
        teacher = self._teacher_neck(batch, examples)
        loss = sum(self._map_loss(projection(s), t) for projection, s, t in zip(self.projections["neck"], student,
                                                                                  teacher))
        loss = self.settings.feature * feature_weight(step, self.total_steps) * loss
        self._record("neck", loss)
        return loss

    def _teacher_neck(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        """The teacher's neck outputs on the rows' images, routed by its own task vocabulary."""
        vision, pixels = self.teacher.config.vision_config, batch["pixel_values"]
        task_ids = torch.tensor([vision.route_id(e["task"]) for e in examples], device=pixels.device)  # (B,)
        dtype = next(self.teacher.parameters()).dtype
        with torch.no_grad(), torch.autocast(device_type=pixels.device.type, enabled=False):
            return self.teacher.detect_dense(pixels.to(dtype), task_ids).neck_features

    def _map_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """CWD of one (B, C, H, W) level pair over its H x W positions, both normalised per channel."""
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(f"feature layer 'neck': the student's level is {tuple(student.shape[-2:])}, the "
                             f"teacher's {tuple(teacher.shape[-2:])}: distil with the teacher's image_size")
        s = student.flatten(2).transpose(1, 2).float()  # (B, H*W, C)
        t = teacher.flatten(2).transpose(1, 2).float()
        mask = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        s, t = normalize_channels(s, mask), normalize_channels(t, mask)
        return channel_wise_kl(s, t, mask, self.settings.feature_temperature)

    def _feature_loss(self, name: str, student: PassOutputs, teacher: PassOutputs, rows: torch.Tensor) -> torch.Tensor:
        """CWD of one feature layer over the batch rows `rows` (B,) bool, both sides normalised per channel over
        those rows' valid positions; 0 without such rows."""
        s, t = getattr(student, name), getattr(teacher, name)
        if s is None or t is None or not rows.any():
            return student.encoder.new_zeros((), dtype=torch.float32)
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"feature layer {name!r}: the student has {s.shape[1]} positions, the teacher "
                             f"{t.shape[1]}: distil with the teacher's image_size")
        s, t = s[rows], t[rows]  # (R, L, C)
        mask = student.mask[rows, : s.shape[1]]  # (R, L): the image tokens lead the encoder's positions
        s = normalize_channels(self.projections[name](s).float(), mask)
        t = normalize_channels(t.float(), mask)
        return channel_wise_kl(s, t, mask, self.settings.feature_temperature)


def check_pair(teacher, student, tasks: list[str], teacher_path: str = "teacher",
               feature_tasks: list[str] | None = None) -> None:
    """ConfigError when teacher and student disagree on the vocabulary, the teacher lacks one of the run's
    tasks or `feature_tasks` names one the run does not train; a warning when the student is not smaller
    than its teacher."""
    t_vocab = {k: getattr(teacher.config, k) for k in _VOCAB_FIELDS}
    s_vocab = {k: getattr(student.config, k) for k in _VOCAB_FIELDS}
    if t_vocab != s_vocab:
        raise ConfigError(f"distill teacher {teacher_path} has vocabulary {t_vocab}, the student {s_vocab}: "
                          "distil between models of one tokenizer")
    t_tasks = teacher.config.vision_config.task_names
    missing = [task for task in tasks if task not in t_tasks]
    if missing:
        raise ConfigError(f"distill teacher {teacher_path} has tasks {t_tasks}, the student trains {tasks}: "
                          f"the teacher has no {missing}")
    untrained = [task for task in feature_tasks or [] if task not in tasks]
    if untrained:
        raise ConfigError(f"distill 'feature_tasks' names {untrained}, which the run does not train; its tasks: "
                          f"{tasks}")
    t_params, s_params = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    if s_params >= t_params:
        warnings.warn(f"the student ({s_params / 1e6:.1f}M parameters) is not smaller than its teacher "
                      f"{teacher_path} ({t_params / 1e6:.1f}M)", UserWarning, stacklevel=2)


def build_distiller(config, student, device: torch.device | str) -> Distiller | None:
    """The run's distiller (None without a `distill` field): teacher loaded, pair checked, projections on `device`."""
    settings = parse_distill(config.distill)
    if settings is None:
        return None
    teacher = load_teacher(settings.teacher, settings.teacher_dtype, device)
    return Distiller(settings, teacher, student, list(config.tasks), config.max_steps).to(device)


def distiller_state(distiller: Distiller | None) -> dict[str, Any]:
    """The distiller's entry of a checkpoint's trainer state (its projections); {} without one."""
    return {} if distiller is None else {STATE_KEY: distiller.state_dict()}


def load_distiller_state(distiller: Distiller | None, state: dict[str, Any], path: Path) -> None:
    """Restore the projections from checkpoint `path`'s trainer state; ConfigError when the checkpoint was
    trained with distillation and this run is not, or the other way round."""
    if (STATE_KEY in state) != (distiller is not None):
        raise ConfigError(f"checkpoint {path} was trained {'with' if STATE_KEY in state else 'without'} "
                          "distillation: resume with the run's own 'distill' field")
    if distiller is not None:
        distiller.load_state_dict(state[STATE_KEY])
