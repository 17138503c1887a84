"""The end of a run (main process): the final model as a servable `save_pretrained` directory in
`output_dir`, and the report (`metrics.json`, `training.png`, the printed before/after table, and
the model card `README.md` with the run's config and metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.model_card import CARD_NAME, TrainingRecord, card_is_replaceable, write_model_card
from ofa_ufo.tasks.identities import IdentityClassifier, save_identities
from ofa_ufo.tasks.image_gen import VQGAN_SUBDIR
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.config import TrainConfig
from ofa_ufo.training.report import format_metric_table, plot_history, show_real_photos


def export_model(output_dir: Path, model, processor, vqgan, heads: torch.nn.ModuleDict) -> None:
    """Write `model` and `processor`, the VQGAN (<model dir>/vqgan: the pipeline finds it there for
    image generation) and the embedding tasks' closed sets of identities (pipe(..., identify=True)),
    replacing whatever a previous export left, all or nothing, except a README.md the user wrote."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if not card_is_replaceable(output_dir):
            (tmp / CARD_NAME).unlink(missing_ok=True)
        processor.save_pretrained(tmp)
        if vqgan is not None:
            vqgan.save_pretrained(tmp / VQGAN_SUBDIR)
        if len(heads):
            save_identities(tmp, {task: IdentityClassifier.from_head(head) for task, head in heads.items()})

    ckpt.export_into(output_dir, write)


def write_report(output_dir: Path, history: dict[str, Any], steps: int, config: TrainConfig) -> None:
    """metrics.json (first and last evaluation, every evaluation, losses and, under distillation, their parts
    per step, LRs, the precision used), training.png, the printed metric table (with what the trained metrics
    are over: "n scored, k failed" held-out examples) and the exported model's card, which now has both the
    config and the metrics to show; with `show_photos`, the exported model's answers on the bundled real photos."""
    before, after = history["eval"][0]["metrics"], history["eval"][-1]["metrics"]
    examples = history["eval"][-1].get("examples")  # absent in a history saved before failures were counted
    start = "start" if Path(config.model).is_dir() else "untrained"
    if history.get("stem_warmup"):
        start += " (stem warmed up)"
    grown = history.get("grown_from")
    if grown:
        start = f"start (grown {grown['width_factor']}x from {Path(grown['model']).name})"
    blind = history["eval"][-1].get("blind")
    report = {"steps": steps, "metrics_untrained": before, "metrics_trained": after, "examples_trained": examples,
              "metrics_blind": blind, "grown_from": grown,
              "stem_warmup": history.get("stem_warmup"), "precision": history.get("precision"),
              "eval": history["eval"], "losses": history["losses"], "lr": history["lr"]}
    if history.get("distill_losses"):
        report["distill_losses"] = history["distill_losses"]
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    plot_history(history, output_dir / "training.png")
    record = TrainingRecord(config.to_yaml(), steps, before, after)
    write_model_card(output_dir, OFAUFOConfig.from_pretrained(output_dir), record)
    print(format_metric_table(before, after, start, examples, blind))
    signals = [entry.get("image_signal") for entry in (history["eval"][0], history["eval"][-1])]
    if None not in signals:
        print(f"encoder image signal {signals[0]:.3f} -> {signals[1]:.3f} (share of the encoder output at image "
              "positions that differs between images; near 0: answers come from the prompt alone)")
    print(f"model, model card (README.md), metrics.json and training.png written to {output_dir}")
    if config.show_photos:
        show_real_photos(output_dir, list(config.tasks))
