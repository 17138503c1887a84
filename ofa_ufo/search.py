"""Search a trained supernet for the task subnet that fits a device budget, then extract and save it.

    python -m ofa_ufo.search --model DIR --task classification --target cpu-fp32 --budget latency_ms=40 \
        --output chips/classification_40ms
    python -m ofa_ufo.search --model DIR --task vqa --budget params=3e6 --samples 16

It evaluates `--samples` archs (largest, smallest and random ones) on the task's held-out data (the
spec `demo_<task>` unless `--spec` names another) and on the budget's cost, fits Gaussian processes to
both (`ofa_ufo.deploy.nas`), evaluates the best predicted arch inside the budget, and writes to
`--output`: the extracted subnet (`save_pretrained`), `search.json` (budget, samples, predicted front,
pick, device) and `search.png` (evaluated and predicted points, the front, the pick, the budget).
Latencies are kept per target in `<model>/profiles/<target>.json` and reused by later searches on
the same machine. The report holds the predictors' cross-validated Kendall tau on the samples (each
sample predicted by a GP fitted without it): how far the metric ranks archs beyond the noise of the
held-out examples; below 0.3 the command warns. `--zero-shot` also reports how well the data-free
MAE-NAS-style score ranks the evaluated archs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from ofa_ufo.core.timing import device_name
from ofa_ufo.data.sources import open_examples
from ofa_ufo.data.specs import load_spec
from ofa_ufo.deploy.nas import (
    SearchResult, kendall_tau, parse_budget, sample_archs, search, subnet_flops, subnet_params, zero_shot_score,
)
from ofa_ufo.deploy.profiles import TARGETS, ProfileStore, check_target, measure_latencies
from ofa_ufo.deploy.subnets import extract_subnet, largest_arch
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.models.ufo import SupernetArch
from ofa_ufo.tasks import get_task
from ofa_ufo.training.mixture import build_batch
from ofa_ufo.training.report import evaluate_model


METRICS = ("headline", "loss")
WEAK_TAU = 0.3  # a metric predictor's cross-validated tau below which the search warns that it ranks noise


class ArchEvaluator:
    """Metric and cost of archs of one routed supernet for one task, with the costs' fixed parts
    (everything outside the supernet blocks) counted once on a real extracted model.

    `metric="headline"` scores each arch by the task's headline metric (top-1, VQA accuracy, ...) on
    the held-out examples; `metric="loss"` by minus the mean per-token cross-entropy of their targets
    (teacher-forced, one forward pass per batch): a continuous score whose differences between
    subnets are not buried under the sampling noise of a few hundred right-or-wrong answers."""

    def __init__(self, model, processor, task: str, spec_name: str | None, examples: int, batch_size: int,
                 target: str, repeats: int, profile_dir: Path | None, metric: str = "headline"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric_kind = metric
        supernet = model.get_encoder().supernet
        if supernet is None or not supernet.routed:
            raise ValueError("search needs a routed UFO supernet (vision_config.supernet_layers > 0, not extracted)")
        self.model, self.processor, self.task, self.batch_size = model, processor, task, batch_size
        model.config.vision_config.route_id(task)  # an unknown task fails here, naming the model's tasks
        self.spec = load_spec(spec_name or f"demo_{task}")
        if self.spec.task != task:
            raise ValueError(f"spec {self.spec.name!r} is for task {self.spec.task!r}, not {task!r}")
        self.examples = list(islice(open_examples(self.spec.data, task), examples))
        if not self.examples:
            raise ValueError(f"spec {self.spec.name!r} gave no held-out examples")
        if len(self.examples) < examples:
            warnings.warn(f"spec {self.spec.name!r} holds {len(self.examples)} held-out examples, fewer than the "
                          f"{examples} asked for: each arch is scored on {len(self.examples)} (a spec whose data "
                          "has a larger validation split gives more)", stacklevel=2)
        self.headline, self.metrics, self.latencies = get_task(task).headline, {}, {}
        self.target, self.repeats = target, repeats
        self.store = ProfileStore(profile_dir / f"{target}.json", target) if profile_dir is not None else None
        full = largest_arch(model.config)
        dense = self.extract(full)
        self.fixed_params = sum(p.numel() for p in dense.parameters()) - subnet_params(model.config, full)
        self.tokens = (model.config.image_size // 16) ** 2  # the blocks' image tokens: the stem's stride-16 grid

    def extract(self, arch: SupernetArch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained route is reported once by the supernet's own checks
            return extract_subnet(self.model, self.task, arch).eval()

    def metric(self, arch: SupernetArch) -> float:
        """The metric of `arch`'s subnet on the held-out examples (each arch scored once; higher is better)."""
        if arch not in self.metrics:
            if self.metric_kind == "loss":
                self.metric_name = "neg_loss"
                self.metrics[arch] = -self.heldout_loss(self.extract(arch))
            else:
                scores = evaluate_model(self.extract(arch), self.processor, self.spec, self.examples, self.batch_size,
                                        max_failures=0.0).values  # a failed example would bias the arch's metric
                self.metric_name = self.headline if self.headline in scores else next(iter(scores))
                self.metrics[arch] = float(scores[self.metric_name])
        return self.metrics[arch]

    def heldout_loss(self, model) -> float:
        """Mean cross-entropy per target token of the held-out examples under `model` (no label smoothing)."""
        total, tokens = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(self.examples), self.batch_size):
                batch = build_batch(self.processor, self.examples[start : start + self.batch_size], model.config,
                                    self.spec.prompt_style)
                labels = batch.pop("labels")  # (B, T), -100 where ignored
                logits = model(**batch, decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels)).logits
                kept = labels.ne(-100) & labels.ne(model.config.pad_token_id)
                total += float(torch.nn.functional.cross_entropy(logits[kept].float(), labels[kept], reduction="sum"))
                tokens += int(kept.sum())
        return total / max(tokens, 1)

    def prefetch_latencies(self, archs: Sequence[SupernetArch], rounds: int, memory_bytes: float = 4 * 2**30) -> None:
        """Measure, side by side in interleaved rounds, the latencies of those `archs` not yet on record,
        so that `latency_ms` ranks them by cost rather than by when each was timed. The subnets live in
        memory together, so they are measured in groups of at most `memory_bytes` of fp32 weights; the
        first arch is timed in every group as a reference, and each group's figures are scaled by the
        reference's overall median over its median in that group, which takes out the machine's drift
        between groups. Once this evaluator has timed an arch or read one from the store, that arch is the
        reference of every later call and keeps its figure: an arch timed late (the search's pick, minutes
        of evaluation later) is on the same scale as those timed first."""
        todo = [a for a in dict.fromkeys(archs) if self._known_latency(a) is None]
        if not todo:
            return
        largest = 4 * subnet_params(self.model.config, largest_arch(self.model.config), self.fixed_params)
        group = max(2, int(memory_bytes // largest))
        timed = next(iter(self.latencies), None)
        reference, rest = (timed, todo) if timed is not None else (todo[0], todo[1:])
        chunks = [rest[start : start + group - 1] for start in range(0, len(rest), group - 1)] or [[]]
        measured = []
        for chunk in chunks:
            measured.append(measure_latencies({a: self.extract(a) for a in [reference, *chunk]}, self.processor,
                                              self.target, self.task, rounds))
        overall = (self.latencies[timed] if timed is not None
                   else float(np.median([records[reference].ms for records in measured])))
        for records in measured:
            scale = overall / records[reference].ms
            for arch, record in records.items():
                if arch not in self.latencies:
                    self.latencies[arch] = record.ms * scale
                    if self.store is not None:
                        self.store.add(dataclasses.replace(record, ms=record.ms * scale))

    def _known_latency(self, arch: SupernetArch) -> float | None:
        """The arch's figure, from this run or the store (then kept here too: a reference for later timings)."""
        if arch not in self.latencies and self.store is not None and (stored := self.store.lookup(arch)) is not None:
            self.latencies[arch] = stored
        return self.latencies.get(arch)

    def latency_ms(self, arch: SupernetArch) -> float:
        """The arch's latency on record, or timed now beside an arch timed earlier (`prefetch_latencies`)."""
        known = self._known_latency(arch)
        if known is not None:
            return known
        self.prefetch_latencies([arch], self.repeats)
        return self.latencies[arch]

    def cost(self, kind: str):
        if kind == "latency_ms":
            return self.latency_ms
        if kind == "params":
            return lambda arch: float(subnet_params(self.model.config, arch, self.fixed_params))
        return lambda arch: subnet_flops(self.model.config, arch, self.tokens)


def plot_front(result: SearchResult, path: Path, kind: str, metric_name: str) -> None:
    """Evaluated samples, the predicted front, the evaluated pick and the budget line, in one PNG."""
    import matplotlib  # optional at import time: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after selecting the headless backend

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([s.cost for s in result.samples], [s.metric for s in result.samples], c="tab:blue", label="evaluated")
    ax.plot([f.predicted_cost for f in result.front], [f.predicted_metric for f in result.front], "o--", c="tab:orange",
            ms=3, label="predicted front")
    ax.scatter([result.pick.cost], [result.pick.metric], c="tab:red", marker="*", s=160, label="pick (evaluated)")
    ax.axvline(result.budget[1], c="gray", ls=":", label="budget")
    ax.set_xlabel(kind)
    ax.set_ylabel(metric_name)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_search(args: argparse.Namespace) -> dict:
    """The command's work: search, extract the pick, write the report; returns the report."""
    kind, limit = parse_budget(args.budget)
    check_target(args.target)
    model = OFAUFOForConditionalGeneration.from_pretrained(args.model).eval()
    processor = OFAUFOProcessor.from_pretrained(args.model)
    profiles = Path(args.profiles) if args.profiles else Path(args.model) / "profiles"
    evaluator = ArchEvaluator(model, processor, args.task, args.spec, args.examples, args.batch_size, args.target,
                              args.repeats, profiles, args.metric)
    if kind == "latency_ms":
        evaluator.prefetch_latencies(sample_archs(model.config, args.samples, args.seed), args.repeats)
    result = search(model.config, evaluator.metric, evaluator.cost(kind), (kind, limit), samples=args.samples,
                    predict_cost=kind == "latency_ms", seed=args.seed)
    report = {"task": args.task, "target": args.target, "device": device_name(), "metric": evaluator.metric_name,
              "spec": evaluator.spec.name, "examples": len(evaluator.examples), **result.to_dict()}
    if args.zero_shot:
        scores = [zero_shot_score(model, s.arch) for s in result.samples]
        report["zero_shot"] = {"scores": scores, "kendall_tau_vs_metric": kendall_tau(scores, [s.metric for s in result.samples])}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    evaluator.extract(result.pick.arch).save_pretrained(output)
    processor.save_pretrained(output)
    (output / "search.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_front(result, output / "search.png", kind, evaluator.metric_name)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.search", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a save_pretrained directory with a routed UFO supernet")
    parser.add_argument("--task", required=True, help="the task whose subnet to search")
    parser.add_argument("--budget", required=True, help="latency_ms=N, params=N or flops=N")
    parser.add_argument("--target", default="cpu-fp32", help=f"latency target: {', '.join(TARGETS)}")
    parser.add_argument("--output", required=True, help="directory for the extracted pick and its report")
    parser.add_argument("--spec", help="held-out data spec (default demo_<task>)")
    parser.add_argument("--examples", type=int, default=100, help="held-out examples per evaluated arch")
    parser.add_argument("--samples", type=int, default=24, help="archs evaluated to fit the predictors")
    parser.add_argument("--metric", choices=METRICS, default="headline",
                        help="headline: the task's metric (top1, ...); loss: minus the held-out cross-entropy, "
                        "a smoother score for ranking close subnets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per latency (median; the sampled archs are timed in interleaved rounds)")
    parser.add_argument("--profiles", help="folder of per-target latency records (default <model>/profiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-shot", action="store_true", help="also rank the samples by the zero-shot score")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_search(args)
    except (ValueError, OSError) as error:
        print(f"search: {error}", file=sys.stderr)
        return 1
    pick = report["pick"]
    print(f"searched on {report['device']}")
    print(f"| pick | {report['metric']} | {next(iter(report['budget']))} | predicted metric | predicted cost |")
    print("|---|---|---|---|---|")
    print(f"| {arch_text(pick['arch'])} | {pick['metric']:.4f} | {pick['cost']:.4g} | "
          f"{pick['predicted_metric']:.4f} | {pick['predicted_cost']:.4g} |")
    fit = report["predictor_fit"]
    if not fit:
        print("too few samples to cross-validate the predictors (4 or more needed)")
    else:
        print(f"predictors' cross-validated Kendall tau on the samples: metric {fit['metric_cv_tau']:.3f}"
              + (f", cost {fit['cost_cv_tau']:.3f}" if "cost_cv_tau" in fit else ""))
    if fit and fit["metric_cv_tau"] < WEAK_TAU:
        print(f"warning: the {report['metric']} of the samples barely ranks archs the predictor was not fitted on "
              f"(tau {fit['metric_cv_tau']:.2f} < {WEAK_TAU}): the archs differ little beyond the noise of "
              f"{report['examples']} held-out examples, so the pick rests mostly on its cost. More --examples, "
              "or --metric loss, separate them better.", file=sys.stderr)
    print(f"subnet and report written to {args.output}")
    return 0


def arch_text(arch: dict) -> str:
    return f"depth {arch['depth']}, heads {arch['heads']}, hidden {arch['hidden']}"


if __name__ == "__main__":
    raise SystemExit(main())
