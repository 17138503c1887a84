"""The task interface: one object per task owns its prompt, decoding, output parsing and example building.

The pipeline only calls these methods; what differs between tasks lives in the subclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ofa_ufo.generation.constraints import BanTokenRangeLogitsProcessor
from ofa_ufo.generation.scoring import Decoded, generate_decoded
from ofa_ufo.generation.settings import check_generation_settings
from ofa_ufo.core.prompts import DEFAULT_STYLE, format_prompt

__all__ = ["AuxiliaryLoss", "Decoded", "Task", "text_only_processor"]


def text_only_processor(config) -> BanTokenRangeLogitsProcessor:
    """Bans every id from the model's first `<code_N>` on (codes, then bins, then any task tokens)."""
    return BanTokenRangeLogitsProcessor(config.code_offset)


@dataclass(frozen=True)
class AuxiliaryLoss:
    """A training-only loss a task adds on the encoder states of its rows (`Task.auxiliary_loss`),
    through a head (`Task.auxiliary_head`) that the trainer optimises with the model and keeps in
    its checkpoints' trainer state, and never exports."""

    name: str  # how messages call it ("box-mask")
    weight_field: str  # the training config field that weights it; 0 turns it off
    state_key: str  # its head's entry in trainer_state.pt


@dataclass
class Task:
    """Base task: text in, text out (`{"text", "score"}`). Subclasses override what differs.

    `options` names the extra keyword arguments the pipeline hands to this task (e.g. `labels`)
    instead of to `generate`.
    """

    name: str
    generation: dict[str, Any] = field(default_factory=dict)
    metric: str = "caption"  # default metric (a name from ofa_ufo.metrics); specs may choose another
    options: tuple[str, ...] = ()
    required: dict[str, str] = field(default_factory=dict)  # option -> example value, for the error
    # canonical fields an example of this task cannot do without (a tuple: one of them); ofa_ufo.data checks them
    example_fields: tuple[str | tuple[str, ...], ...] = ()
    # the value of the metric's result that a training run's before/after table shows ("": the first)
    headline: str = ""
    # the generated data a "demo" training source draws: "scenes" (ofa_ufo.data.demo_scenes, examples
    # by ofa_ufo.data.demo_examples) or "identities" (ofa_ufo.data.demo_identities)
    demo_data: str = "scenes"
    # training config fields that only `training_source` of this task reads: setting one in a run
    # without this task is a config error
    source_options: tuple[str, ...] = ()
    auxiliary: AuxiliaryLoss | None = None  # an extra training loss on the encoder states, off by default
    needs_image: bool = True  # the pipeline refuses a None image (text-only tasks and free prompts set False)
    # the training config field that weights the loss of `model_outputs` ("": the task trains through the
    # decoder's tokens); the trainer runs such a task's rows through `model_outputs` instead of the token loss
    model_loss_weight: str = ""

    def check_options(self, options: dict[str, Any]) -> None:
        """Fail once per call, before any work, when a required option is missing."""
        missing = [f"{name}={example}" for name, example in self.required.items() if options.get(name) is None]
        if missing:
            raise ValueError(f"task {self.name!r} needs {', '.join(missing)}")

    def check_generate_kwargs(self, generate_kwargs: Mapping[str, Any]) -> None:
        """Fail once per call, before any work, on invalid decoding settings (judged with this task's
        defaults merged in, as `run` merges them)."""
        check_generation_settings({**self.generation, **generate_kwargs})

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        return format_prompt(self.name, style, text=self.normalize(text) if text is not None else None)

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        """Prompt for one pipeline item (`meta` holds text, image and input sizes, box codec, options)."""
        return self.prompt(meta["text"], style)

    @staticmethod
    def normalize(text: str) -> str:
        """OFA-style light normalisation: lower case, single spaces."""
        return " ".join(text.lower().split())

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        """Training pair (prompt, target) from an example dict; targets start with a space (OFA)."""
        return self.prompt(example.get("text"), style), " " + self.normalize(example["target"])

    def encoder_image(self, example: dict[str, Any]) -> Any:
        """The image the encoder sees for a training example (text_to_image: none, its image is the target)."""
        return example.get("image")

    def prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder pixels (N, 3, H, W) of this task's rows after the processor (image_infill blanks the
        centre); applied by `build_batch` and by the task's own `run`."""
        return pixel_values

    def code_grid_side(self, meta: dict[str, Any]) -> int:
        """Side of the VQGAN code grid this task's targets are (0: a text target); see `OFADecoder.forward`."""
        return 0

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        """Pipeline keyword arguments (besides the image) that ask this task about a canonical example."""
        return {"text": example["text"]} if example.get("text") else {}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        """(prediction, reference) in the form the task's metric takes (see `ofa_ufo.metrics`)."""
        return result.get("text", ""), example.get("references") or [example["target"]]

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        """Decoding settings for `model.generate` (callers may override any of them); a text answer
        never holds an image code or a location bin, whatever the weights (`text_only_processor`)."""
        return {**self.generation, "logits_processor": [text_only_processor(config)]}

    def run(self, model, inputs: dict, tokenizer, options: dict[str, Any], generate_kwargs: dict[str, Any]) -> list:
        """Model outputs for a batch, one entry per input (here: its list of scored answers). A caller's
        `logits_processor` list runs after the task's constraints instead of replacing them."""
        task_kwargs = self.generate_kwargs(model.config, tokenizer, options)
        ours, theirs = task_kwargs.get("logits_processor") or [], generate_kwargs.get("logits_processor") or []
        kwargs = {**task_kwargs, **generate_kwargs}
        if ours or theirs:
            kwargs["logits_processor"] = [*ours, *theirs]
        return generate_decoded(model, inputs, tokenizer.eos_token_id, tokenizer.pad_token_id, **kwargs)

    def postprocess(self, raw: list[Decoded], tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        """One input's answers -> its JSON-ready result (several sequences -> `candidates`)."""
        results = [self.answer(decoded, tokenizer, meta) for decoded in raw]
        return results[0] if len(results) == 1 else {"candidates": results}

    def answer(self, decoded: Decoded, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        text = tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
        return {"text": text, "score": decoded.probability}

    # ---- training hooks (ofa_ufo.training); a task overrides those it needs ------------------

    def training_source(self, source, seed: int, options: Mapping[str, Any]):
        """The source the trainer draws this task's examples from (a task may reorder it, e.g. P x K,
        or alter draws); `options` holds the run's values of `source_options`."""
        return source

    def training_head(self, examples, dim: int):
        """A trainable head on the embedding read-out of this task's rows (`head_loss`), or None: the
        task learns from its token targets only."""
        return None

    def head_loss(self, head, features, examples):
        """Mean loss of this task's rows: `features` (B, D) raw read-outs, `examples` their dicts."""
        raise NotImplementedError(f"task {self.name!r} has no feature head")

    def model_head(self, class_names: Sequence[str] | None, options: Mapping[str, Any]) -> dict[str, Any]:
        """Model config overrides (e.g. a detection head over `class_names`, the labels of this task's
        training data; None when its source cannot list them ahead) that a run training this task needs;
        `options` holds the run's `source_options`."""
        return {}

    def model_outputs(self, model, batch: dict[str, torch.Tensor],
                      examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The model's training outputs on this task's rows (`batch` and `examples` hold only them) through its
        own forward (the DDP-wrapped one in training), for a task with `model_loss_weight`: "loss" (their
        mean loss) and what distillation may read (e.g. the dense head's "neck_features")."""
        raise NotImplementedError(f"task {self.name!r} trains through its token targets")

    def auxiliary_head(self, dim: int) -> torch.nn.Module:
        """The training-only head of this task's `auxiliary` loss over d_model-`dim` encoder states."""
        raise NotImplementedError(f"task {self.name!r} has no auxiliary loss")

    def auxiliary_loss(self, head: torch.nn.Module, encoder_states: torch.Tensor, pixel_values: torch.Tensor | None,
                       examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The unweighted `auxiliary` loss summed over this task's rows of a batch (0 without any), so
        that the trainer normalises it by the step's target tokens like the token loss; encoder_states
        (B, L, D), `examples` the whole batch's dicts with their original `image_size`."""
        raise NotImplementedError(f"task {self.name!r} has no auxiliary loss")
