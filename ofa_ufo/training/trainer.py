"""The trainer: one loop for every task mixture, on accelerate.

    from ofa_ufo.training import load_config, train
    result = train(load_config("pretrain_ofa_tiny", ["max_steps=200"]))

Each optimizer step builds its global batch from the mixture (every task, fixed quotas),
keeps this process's slice, and divides the summed token loss by the token count of the
whole step (all micro-batches, all processes): gradient accumulation and data-parallel runs
give the update of one big batch. Tasks add their own training losses through hooks: feature
heads (embedding tasks' CosFace + triplet, `task_heads.build_heads`) and auxiliary losses on the
encoder states (grounding's box mask, `box_mask_weight`); their heads are optimised with the
model and kept in the checkpoint's trainer state. A task with a head inside the model
(`Task.model_outputs`, the dense detector, `dense_loss_weight`) has its rows of a pass run apart: a
second forward and backward of the (DDP-wrapped) model, weighted like the feature-head losses.
A `distill` field runs a frozen teacher beside the model and adds its losses (`distillation`).
Batches are built in the training process or ahead of it by DataLoader workers (`data_workers`,
`step_batches`). Around it: AdamW with warmup + linear decay (OFA), gradient clipping, optional
EMA (`optimization`), bf16 autocast on a GPU, supernet arch sampling when the config asks for it,
atomic resumable checkpoints, evaluation before/after, TensorBoard (`run_log`), a loss plot and a
metric table (`outputs`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from ofa_ufo.core.images import blind_examples
from ofa_ufo.deploy.subnets import largest_arch, sample_arch, set_arch, smallest_arch
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training import objectives
from ofa_ufo.training.config import ConfigError, TrainConfig
from ofa_ufo.training.distillation import build_distiller, distiller_state, load_distiller_state
from ofa_ufo.training.mixture import Mixture, build_sources, check_identity_quotas, eval_examples, task_quotas
from ofa_ufo.training.model_setup import (
    build_model, choose_precision, freeze, grow_from_small, grow_heads, load_vqgan, make_accelerator, set_task_experts,
    set_train_mode, task_experts_step,
)
from ofa_ufo.training.optimization import (
    base_lr, build_ema, build_optimizer, check_saved_groups, clip_gradients, optimizer_step,
)
from ofa_ufo.training.outputs import export_model, write_report
from ofa_ufo.training.report import encoder_image_signal, evaluate_model
from ofa_ufo.training.run_log import RunLog
from ofa_ufo.training.stem_warmup import warm_up_run_stem
from ofa_ufo.training.step_batches import Batch, MicroBatches, StepBatches, TrainingError, loadable
from ofa_ufo.training.task_heads import (
    add_auxiliary_losses, auxiliary_head_states, batch_rows, build_auxiliary_heads, build_heads, load_head_states,
    model_head_overrides, model_losses, split_rows, sync_head_gradients,
)


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float]
    metrics_before: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_after: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def step_archs(config, step: int) -> list:
    """The supernet archs one step trains: [None] (the model as is) unless the config asks for
    elastic sampling (`sample_arch(config, step)`, plus largest and smallest with the sandwich rule)."""
    vision = config.vision_config
    if not (vision.supernet_layers and vision.supernet_routed and vision.supernet_sample_arch):
        return [None]
    archs = [sample_arch(config, step)]
    return archs + ([largest_arch(config), smallest_arch(config)] if vision.supernet_sandwich else [])


class Trainer:
    """Holds the run's parts; `fit()` is the loop."""

    def __init__(self, config: TrainConfig, resume: str | None = "auto", model=None, processor=None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config, self.output_dir = config, Path(config.output_dir)
        self.precision = choose_precision(config)  # auto: bf16 where the hardware is fast at it (core.hardware)
        self.accelerator = acc = make_accelerator(config, self.precision)
        sources = build_sources(config, acc.process_index, acc.num_processes)
        if model is None:
            model, processor = build_model(config, model_head_overrides(config, sources))
        # checked before anything is written; "auto" skips a newest checkpoint with a broken file (warning)
        self.resume_from, resume_state = ckpt.load_resumable(config.output_dir, resume, model.config,
                                                             ema=bool(config.ema_decay))
        self.saved: tuple[int, str] | None = None  # (step, history) of this run's newest checkpoint
        if config.batch_size < acc.num_processes or config.batch_size % acc.num_processes:
            raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {acc.num_processes} processes")
        self.processor = processor
        self.vqgan = load_vqgan(config.vqgan)  # encodes image-generation targets in build_batch
        self.mixture = Mixture(sources, task_quotas(config.tasks, config.batch_size), acc.process_index,
                               acc.num_processes)
        check_identity_quotas(self.mixture.sources, self.mixture.quotas)
        batches = StepBatches(self.mixture, processor, model.config, self.vqgan, config.grad_accum,
                              acc.process_index, acc.num_processes, config.max_steps)
        self.batches = MicroBatches(batches, config.data_workers, acc.device)
        self.heads = build_heads(self.mixture.sources, model.config.d_model).to(acc.device)
        self.auxiliary_heads = build_auxiliary_heads(config, model.config.d_model).to(acc.device)
        self.distiller = build_distiller(config, model, acc.device)  # None without a `distill` field
        grown = None
        if config.grow_from and self.resume_from is None:  # a resumed run's weights are in its checkpoint
            grown, small_state = grow_from_small(model, config, train)
            grown["heads"] = grow_heads(self.auxiliary_heads, small_state, config.seed)
        warmup = None
        if config.stem_warmup_images and self.resume_from is None:  # a resumed run's stem is in its checkpoint
            teacher = self.distiller.teacher if self.distiller is not None and self.distiller.settings.stem else None
            warmup = warm_up_run_stem(model, processor, config, acc.device, acc.is_main_process, self.precision.dtype,
                                      teacher)
        freeze(model, config)
        self.experts_step = task_experts_step(model, config)  # 0: the task experts train from step 0
        if self.experts_step and self.resume_from is None:  # a resumed run's routers are in its checkpoint
            set_task_experts(model, start=False)
        self.optimizer, self.scheduler = build_optimizer(model, config, self._head_parameters())
        self.ema = build_ema(model, config.ema_decay)
        self.step = 0
        self.history: dict[str, Any] = {"losses": [], "lr": [], "eval": [], "stem_warmup": warmup,
                                        "grown_from": grown, "distill_losses": []}
        if self.resume_from is not None:
            self._restore(model, self.resume_from, resume_state)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        if acc.num_processes == 1 and hasattr(self.unwrapped, "tied_gradients_in_place"):
            self.unwrapped.tied_gradients_in_place = True  # no gradient hooks to miss (modeling.py)

    # ---- state ----------------------------------------------------------------------------

    def _restore(self, model, path: Path, state: dict[str, Any]) -> None:
        """Load checkpoint `path` (its trainer state already read by `ckpt.load_resumable`)."""
        ckpt.load_weights(model, path / ckpt.WEIGHTS_FILE)
        load_head_states(self.heads, self.auxiliary_heads, state, path, list(self.config.tasks))
        load_distiller_state(self.distiller, state, path)
        check_saved_groups(state["optimizer"], self.optimizer, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            ckpt.load_weights(self.ema, path / ckpt.EMA_FILE)
        ckpt.restore_rng_states(state["rng"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.history["losses"] = self.history["losses"][: self.step]
        self.history["lr"] = self.history["lr"][: self.step]
        self.history["distill_losses"] = self.history.get("distill_losses", [])[: self.step]
        self._restore_streams(state.get("streams"), path)
        if path.resolve().parent == ckpt.checkpoint_dir(self.output_dir).resolve():
            self.saved = (self.step, json.dumps(self.history))
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.step}")

    def _restore_streams(self, streams: list[dict[str, Any]] | None, path: Path) -> None:
        """Streamed tasks continue where this process's stream stood at the checkpoint (one entry per process)."""
        if not self.mixture.streamed:
            return
        world = self.accelerator.num_processes
        if streams is None or len(streams) != world:
            raise ConfigError(f"checkpoint {path} holds stream positions of {len(streams or [])} processes, this run "
                              f"has {world}: a streamed run resumes with the number of processes it was saved with")
        self.mixture.restore_streams(streams[self.accelerator.process_index], self.step, self.config.grad_accum)

    def save(self) -> Path | None:
        """Write a resumable checkpoint of the current step (main process; others wait). Nothing is written
        when this run's newest checkpoint already holds this step and history (a run resumed at its last
        step): rewriting it would move that checkpoint aside for a moment."""
        history = json.dumps(self.history)
        if self.saved == (self.step, history):
            return ckpt.checkpoint_dir(self.output_dir) / f"{ckpt.PREFIX}{self.step:07d}"
        path = None
        # collective: every process's stream position (streamed tasks), in process order
        streams = gather_object([self.mixture.stream_state(self.step, self.config.grad_accum)])
        weights = self.accelerator.get_state_dict(self.model)  # collective: gathers FSDP shards
        if self.accelerator.is_main_process:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "heads": self.heads.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_states(),
                     "history": history, "streams": streams, **auxiliary_head_states(self.auxiliary_heads),
                     **distiller_state(self.distiller)}
            path = ckpt.save_checkpoint(self.output_dir, self.step, self.unwrapped, self.processor, state,
                                        self.config.to_yaml(), self.ema, self.config.keep_last, weights)
        self.saved = (self.step, history)
        self.accelerator.wait_for_everyone()
        return path

    def _head_parameters(self) -> list[torch.nn.Parameter]:
        """The training-only heads' parameters (feature heads, then auxiliary heads), optimised with the model."""
        distiller = self.distiller.parameters() if self.distiller is not None else []
        return [*self.heads.parameters(), *self.auxiliary_heads.parameters(), *distiller]

    def _final_model(self):
        """The model that is evaluated and exported: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def _train_mode(self) -> None:
        set_train_mode(self.model, self.config.freeze_batchnorm)

    # ---- one step -------------------------------------------------------------------------

    def _micro_batches(self) -> list[Batch]:
        """This step's micro-batches on the device."""
        return self.batches.for_step(self.step)

    def _loss(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]],
              samples: objectives.ScstSamples | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss plus the tasks' auxiliary losses, summed per-task mean feature-head losses)
        of one micro-batch; with SCST, the summed loss of its sampled captions (`samples`)."""
        config = self.config
        if samples is not None:
            loss = objectives.scst_loss(self.model, batch, samples)
            return loss, torch.zeros((), device=loss.device)
        distilled = 0.0  # the distillation losses that are means, weighted like the feature-head losses
        if self.distiller is not None:
            loss, distilled, features, encoder_states = self.distiller.student_losses(
                self.model, batch, examples, config.label_smoothing, self.step)
        else:
            loss, _, features, encoder_states = objectives.cross_entropy_and_features(self.model, batch,
                                                                                      config.label_smoothing)
        loss = add_auxiliary_losses(loss, self.auxiliary_heads, config, encoder_states, batch.get("pixel_values"),
                                    examples)
        return loss, objectives.head_losses(self.heads, features, examples) + distilled

    def _global_tokens(self, passes: list[tuple[dict[str, torch.Tensor], Any, Any]],
                       samples: list[objectives.ScstSamples | None]) -> float:
        """The step's normaliser, known before any backward: target tokens in the whole global step
        (every pass, every process); with SCST, its sampled tokens (OFA's per-token mean)."""
        acc = self.accelerator
        if self.config.objective == "scst":
            local = sum(s.tokens for s in samples)
        else:
            local = sum(int((b["labels"] != -100).sum()) for b, _, _ in passes)
        tokens = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum").item()
        return max(tokens, 1.0)  # a mixture of embedding tasks only has no target tokens

    def _scst_samples(self, passes: list[tuple[dict[str, torch.Tensor], Any, Any]]
                      ) -> list[objectives.ScstSamples | None]:
        """Every pass's sampled captions (SCST), drawn before any backward so that their token count
        over the whole step can normalise the loss; [None] per pass for the other objectives."""
        if self.config.objective != "scst":
            return [None] * len(passes)
        samples = []
        for batch, examples, arch in passes:
            if arch is not None:
                set_arch(self.unwrapped, arch)
            with self.accelerator.autocast():
                samples.append(objectives.scst_sample(self.model, batch, examples, self.processor.tokenizer,
                                                      self.config.scst_beams, self.config.scst_max_new_tokens))
        return samples

    @staticmethod
    def _pass_parts(batch: dict[str, torch.Tensor], examples: list[dict[str, Any]], scst: bool
                    ) -> tuple[tuple | None, tuple | None]:
        """A pass split into (batch, examples) of the rows trained through the decoder and of those trained
        through their task's `model_outputs` (e.g. the dense head); None for a side without rows. A batch
        without the latter (and every SCST batch) stays whole."""
        token_rows, model_rows = split_rows(examples)
        if not model_rows or scst:
            return (batch, examples), None
        model_part = (batch_rows(batch, model_rows), [examples[i] for i in model_rows])
        if not token_rows:
            return None, model_part
        return (batch_rows(batch, token_rows), [examples[i] for i in token_rows]), model_part

    def train_step(self) -> float:
        """Forward/backward over the step's micro-batches and archs, then one optimizer update."""
        acc, head_weight = self.accelerator, self.config.head_loss_weight
        archs = step_archs(self.unwrapped.config, self.step)
        passes = [(b, e, arch) for b, e in self._micro_batches() for arch in archs]
        samples = self._scst_samples(passes)
        tokens = self._global_tokens(passes, samples)
        total, head_total = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        model_total = torch.zeros((), device=acc.device)
        for i, ((batch, examples, arch), sampled) in enumerate(zip(passes, samples)):
            if arch is not None:
                set_arch(self.unwrapped, arch)
            token_part, model_part = self._pass_parts(batch, examples, sampled is not None)
            if token_part is not None:
                sync = nullcontext() if i == len(passes) - 1 and model_part is None else acc.no_sync(self.model)
                with sync, acc.autocast():
                    loss_sum, head_loss = self._loss(*token_part, sampled)
                    # token losses: mean over the step's tokens; feature-head losses: mean over passes and processes
                    acc.backward(loss_sum * acc.num_processes / tokens + head_loss * head_weight / len(passes))
                total += loss_sum.detach()
                head_total += head_loss.detach()
            if model_part is not None:  # a second forward and backward: DDP allows one forward per backward
                sync = nullcontext() if i == len(passes) - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    model_loss = model_losses(self.model, self.config, *model_part, self.distiller,
                                              self.step)  # weighted per-task means
                    acc.backward(model_loss / len(passes))
                model_total += model_loss.detach()
        if archs != [None]:
            set_arch(self.unwrapped, None)
        sync_head_gradients(acc, self._head_parameters())
        loss = (acc.reduce(total, reduction="sum").item() / tokens
                + acc.reduce(head_total, reduction="mean").item() * head_weight / len(passes)
                + acc.reduce(model_total, reduction="mean").item() / len(passes))
        if self.distiller is not None:
            self.history["distill_losses"].append(self._distill_parts(tokens, len(passes)))
        self._update(loss)
        return loss

    def _distill_parts(self, tokens: float, passes: int) -> dict[str, float]:
        """This step's loss parts under distillation (`Distiller.take_sums`) on the logged loss's scale, so
        that they show which part moves it: the token parts per target token of the step, the mean parts
        per pass (x head_loss_weight for those that join the feature-head losses)."""
        acc, sums = self.accelerator, self.distiller.take_sums()
        values = acc.reduce(torch.tensor(list(sums.values()), device=acc.device), reduction="sum").tolist()
        per_pass = 1.0 / (passes * acc.num_processes)
        head = per_pass * self.config.head_loss_weight
        scale = {"student_ce": 1.0 / tokens, "token_kl": 1.0 / tokens, "neck": per_pass, "feature": head,
                 "embedding": head}
        return {name: value * scale[name] for name, value in zip(sums, values)}

    def _update(self, loss: float) -> None:
        """One optimizer step (and EMA update) on the accumulated gradients, refused for a non-finite loss."""
        if not math.isfinite(loss):
            last = ckpt.list_checkpoints(self.output_dir)
            raise TrainingError(f"loss is {loss} at step {self.step}; stopped without updating. Last good "
                                f"checkpoint: {last[-1] if last else 'none written yet'} (lower lr or check the data)")
        if self.config.clip_norm:
            clip_gradients(self.accelerator, self.model, self._head_parameters(), self.config.clip_norm,
                           self.optimizer)
        optimizer_step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped)

    # ---- evaluation -----------------------------------------------------------------------

    def evaluate(self, blind: bool = False) -> dict[str, dict[str, float]]:
        """Metrics per task on held-out examples (main process); the model it scores is the EMA when set.
        What each metric is over goes to `eval_counts` (task -> scored, failed, first errors): an example that
        fails (an unreadable image) is counted, not scored, and a task whose every held-out example fails
        raises a TrainingError (`evaluate_model`) instead of logging a zero. `blind`: every image replaced by
        a constant grey one (the prompt-only baseline); counts and image signal are left as they were."""
        results: dict[str, dict[str, float]] = {}
        if not blind:
            self.image_signal, self.eval_counts = None, {}
        if self.config.eval_examples and self.accelerator.is_main_process:
            model = self._final_model()
            was_training = model.training
            model.eval()
            for task in self.config.tasks:
                examples, spec = eval_examples(self.config, task)
                if examples and blind:
                    results[task] = evaluate_model(model, self.processor, spec, blind_examples(examples),
                                                   self.config.eval_batch_size).values
                elif examples:
                    scored = evaluate_model(model, self.processor, spec, examples, self.config.eval_batch_size)
                    results[task], self.eval_counts[task] = scored.values, scored.record()
                    if scored.failed:
                        print(f"held-out {task} at step {self.step}: {scored.counts()} (the failed are not in its "
                              f"metric); first: {scored.error_lines()[0]}")
                    if self.image_signal is None:
                        self.image_signal = encoder_image_signal(model, self.processor, loadable(examples[:32]))
            if was_training:
                self._train_mode()
        self.accelerator.wait_for_everyone()
        return results

    def _record_eval(self, log: RunLog | None) -> None:
        metrics = self.evaluate()
        self.history["eval"].append({"step": self.step, "metrics": metrics, "examples": self.eval_counts,
                                     "image_signal": self.image_signal})
        if log is not None:
            log.evaluation(self.step, metrics, self.image_signal)

    # ---- the loop -------------------------------------------------------------------------

    def _start_task_experts(self, main: bool) -> None:
        """Each task's expert starts as a copy of the shared FFN trained so far (EMA copy too)."""
        set_task_experts(self.unwrapped, start=True)
        if self.ema is not None:
            set_task_experts(self.ema.module, start=True)
        if main:
            print(f"step {self.step}: task experts start as copies of the shared FFN (task_experts_from "
                  f"{self.config.task_experts_from})")

    def fit(self) -> TrainResult:
        """Train from the current step to `max_steps`: evaluate, checkpoint and log on the config's
        cadence, then save the last step, export the final model and write the report."""
        config, main, start = self.config, self.accelerator.is_main_process, time.perf_counter()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / ckpt.CONFIG_FILE).write_text(config.to_yaml())
        if not self.history["eval"]:
            self._record_eval(None)
        log = RunLog(self.output_dir, config, main)
        log.header(self.precision.summary)
        self.history["precision"] = self.precision.record()  # this run's choice, also after a resume
        self._train_mode()
        for _ in log.progress(self.step):
            if self.experts_step and self.step == self.experts_step:
                self._start_task_experts(main)
            lr = base_lr(self.optimizer)
            loss = self.train_step()
            self.step += 1
            self.history["losses"].append(loss)
            self.history["lr"].append(lr)
            parts = self.history["distill_losses"][-1] if self.distiller is not None else None
            log.step(self.step, loss, lr, self.unwrapped, parts)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                self._record_eval(log)
                self._train_mode()
            if config.save_every and self.step % config.save_every == 0:
                self.save()
        log.end_progress()
        self.batches.stop()  # ends the data workers
        if self.history["eval"][-1]["step"] != self.step:
            self._record_eval(log)
        if config.eval_blind and "blind" not in self.history["eval"][-1]:
            self.history["eval"][-1]["blind"] = self.evaluate(blind=True)
        if not (config.save_every and self.step % config.save_every == 0):
            self.save()
        if main:
            export_model(self.output_dir, self._final_model(), self.processor, self.vqgan, self.heads)
            write_report(self.output_dir, self.history, self.step, config)
        log.close()
        evals = self.history["eval"]
        return TrainResult(self.output_dir, list(self.history["losses"]), evals[0]["metrics"], evals[-1]["metrics"],
                           time.perf_counter() - start)


def train(config: TrainConfig, resume: str | None = "auto") -> TrainResult:
    """Train `config` (resuming from its newest checkpoint unless `resume="never"` or a path)."""
    return Trainer(config, resume=resume).fit()
