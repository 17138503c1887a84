"""One for All Chips, measured in one run on a trained supernet: how well the GP-NAS predictors rank
archs they were not fitted on, how the searched pick compares with random in-budget archs, and how
the zero-shot score ranks.

    .venv/bin/python benchmarks/chips_search.py --model checkpoints/ofa_ufo_tiny_ufo.pretrain_demo_chips \
        --task classification --target cpu-fp32 --fit 24 --held-out 16 --examples 200 [--metric loss] \
        [--profiles DIR]
    .venv/bin/python benchmarks/chips_search.py --model DIR --latency-only --retime [--profiles DIR]

Steps: evaluate `--fit` archs (largest, smallest, random) and `--held-out` other random archs
(metric on the spec's held-out data: the headline metric, or with `--metric loss` minus the held-out
cross-entropy; latency on the target, all of them timed side by side in `--repeats` interleaved
rounds, kept in `--profiles`, default <model>/profiles, whose earlier records are reused); fit the
metric and latency GPs on the first set and report Kendall's tau on the second; search under a
latency budget (the median of the evaluated latencies unless `--budget-ms`) with the same `--fit`
samples; evaluate the best of `--fit` random archs measured inside the budget; print the table and
write JSON next to the model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import ofa_ufo
from ofa_ufo.core.timing import device_name
from ofa_ufo.deploy.nas import (
    ArchPredictor, arch_from_dict, arch_to_dict, cross_validated_tau, kendall_tau, random_archs, sample_archs, search,
    zero_shot_score,
)
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.search import METRICS, ArchEvaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a trained routed supernet directory")
    source.add_argument("--preset", help="a randomly initialised routed supernet preset, with --latency-only")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the latency predictor: fit on --fit archs, Kendall tau on --held-out (weights do "
                        "not change latency, so a random supernet whose blocks dominate a request will do)")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--target", default="cpu-fp32")
    parser.add_argument("--fit", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--spec", help="the task spec scoring the archs (default demo_<task>; a path for more "
                        "held-out scenes, e.g. a copy of tasks/demo_classification.yaml with val_scenes: 1000)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-ms", type=float)
    parser.add_argument("--metric", choices=METRICS, default="headline")
    parser.add_argument("--profiles", help="latency records folder (default <model>/profiles)")
    parser.add_argument("--retime", action="store_true",
                        help="with --latency-only: time the held-out archs again (fresh records) and report the "
                        "tau between the two timings, the ceiling any latency predictor can reach here")
    parser.add_argument("--refit", help="a JSON this script wrote: fit the predictors again on its measured rows "
                        "(no evaluation, no timing) and print the taus, cross-validated ones included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.retime and not args.latency_only:
        parser.error("--retime goes with --latency-only")
    if args.preset and not args.latency_only:
        parser.error("--preset (random weights) measures latency only: add --latency-only")
    if args.refit:
        return refit(args)
    if args.preset:
        torch.manual_seed(args.seed)
        model, processor = ofa_ufo.create_model(args.preset).eval(), ofa_ufo.create_processor(args.preset)
    else:
        model = OFAUFOForConditionalGeneration.from_pretrained(args.model).eval()
        processor = OFAUFOProcessor.from_pretrained(args.model)
    config = model.config
    profiles = Path(args.profiles) if args.profiles else Path(args.model or ".") / "profiles"
    evaluator = ArchEvaluator(model, processor, args.task, args.spec, args.examples, 50, args.target, args.repeats,
                              profiles, args.metric)
    print(f"measured on {device_name()}; task {args.task}, target {args.target}, {len(evaluator.examples)} held-out "
          f"examples of spec {evaluator.spec.name}")
    if args.latency_only:
        with tempfile.TemporaryDirectory(prefix="retime_") as retimed:  # the second timing's own records
            again = (ArchEvaluator(model, processor, args.task, args.spec, args.examples, 50, args.target, args.repeats,
                                   Path(retimed), args.metric) if args.retime else None)
            return latency_only(args, config, evaluator, start, again)

    fit = sample_archs(config, args.fit, args.seed)  # the archs search() fits on with the same seed
    held = random_archs(config, args.held_out, args.seed + 1000, exclude=fit)
    random_pool = random_archs(config, args.fit, args.seed + 2000)
    evaluator.prefetch_latencies(fit + held + random_pool, args.repeats)
    rows = {}
    for arch in tqdm(fit + held, desc=f"{evaluator.metric_kind} of the archs", unit="arch"):
        rows[arch] = (evaluator.metric(arch), evaluator.latency_ms(arch))
    metric_gp = ArchPredictor(config, args.seed).fit(fit, [rows[a][0] for a in fit])
    latency_gp = ArchPredictor(config, args.seed).fit(fit, [rows[a][1] for a in fit])
    tau_metric = kendall_tau(metric_gp.predict(held), [rows[a][0] for a in held])
    tau_latency = kendall_tau(latency_gp.predict(held), [rows[a][1] for a in held])
    cv_metric = cross_validated_tau(config, fit, [rows[a][0] for a in fit], seed=args.seed)
    cv_latency = cross_validated_tau(config, fit, [rows[a][1] for a in fit], seed=args.seed)
    every = fit + held
    zero_shot = [zero_shot_score(model, a) for a in every]
    tau_zero_shot = kendall_tau(zero_shot, [rows[a][0] for a in every])
    tau_size = kendall_tau([sum(a.hidden[: a.depth]) + 64 * sum(a.heads[: a.depth]) for a in every],
                           [rows[a][0] for a in every])

    budget = args.budget_ms or float(np.median([rows[a][1] for a in every]))
    result = search(config, evaluator.metric, evaluator.latency_ms, ("latency_ms", budget), samples=args.fit,
                    seed=args.seed)
    # the baseline: as many random archs as the search evaluated, kept only when measured inside the budget
    random_in = [(evaluator.metric(a), evaluator.latency_ms(a), a) for a in random_pool]
    random_in = [r for r in random_in if r[1] <= budget]
    best_random = max(random_in, key=lambda r: (r[0], -r[1])) if random_in else None

    print("\n| figure | value |\n|---|---|")
    print(f"| archs evaluated to fit / held out | {len(fit)} / {len(held)} |")
    print(f"| metric ({evaluator.metric_name}) range over evaluated archs | "
          f"{min(r[0] for r in rows.values()):.4f} - {max(r[0] for r in rows.values()):.4f} |")
    print(f"| latency range (ms) | {min(r[1] for r in rows.values()):.2f} - {max(r[1] for r in rows.values()):.2f} |")
    print(f"| Kendall tau, metric GP on held-out archs | {tau_metric:.3f} |")
    print(f"| cross-validated tau on the fitted archs alone (metric / latency) | {cv_metric:.3f} / {cv_latency:.3f} |")
    print(f"| Kendall tau, latency GP on held-out archs | {tau_latency:.3f} |")
    print(f"| Kendall tau, zero-shot score vs metric (all {len(every)}) | {tau_zero_shot:.3f} |")
    print(f"| Kendall tau, plain size (width sum) vs metric | {tau_size:.3f} |")
    print(f"| budget latency_ms | {budget:.2f} |")
    print(f"| searched pick: metric / latency ms | {result.pick.metric:.4f} / {result.pick.cost:.2f} |")
    if best_random:
        print(f"| best of {len(random_pool)} random archs ({len(random_in)} in budget): metric / latency ms | "
              f"{best_random[0]:.4f} / {best_random[1]:.2f} |")
    else:
        print(f"| best of {len(random_pool)} random archs | none measured inside the budget |")
    print(f"| wall time (s) | {time.perf_counter() - start:.0f} |")
    out = Path(args.model) / f"chips_search_{args.task}_{args.target}.json"
    out.write_text(json.dumps({
        "device": device_name(), "task": args.task, "target": args.target, "metric": evaluator.metric_name,
        "rows": [{"arch": arch_to_dict(a), "metric": m, "latency_ms": ms, "fit": a in fit}
                 for a, (m, ms) in rows.items()],
        "tau": {"metric": tau_metric, "latency": tau_latency, "zero_shot": tau_zero_shot, "size": tau_size,
                "metric_cv": cv_metric, "latency_cv": cv_latency},
        "budget_ms": budget, "search": result.to_dict(),
        "best_random": None if best_random is None else {"metric": best_random[0], "latency_ms": best_random[1],
                                                         "arch": arch_to_dict(best_random[2])},
    }, indent=1))
    print(f"written {out}")


def refit(args: argparse.Namespace) -> None:
    """The predictors of a saved run fitted again on its rows: the same taus (the GPs are seeded), plus the
    cross-validated taus for runs written before they were reported."""
    if not args.model:
        raise SystemExit("--refit needs --model (the supernet whose arch space encodes the rows)")
    config = OFAUFOForConditionalGeneration.config_class.from_pretrained(args.model)
    saved = json.loads(Path(args.refit).read_text(encoding="utf-8"))
    rows = [(arch_from_dict(r["arch"]), r["metric"], r["latency_ms"], r["fit"]) for r in saved["rows"]]
    fit, held = [r for r in rows if r[3]], [r for r in rows if not r[3]]
    print(f"{args.refit}: {saved['task']}, metric {saved['metric']}, {len(fit)} fitted / {len(held)} held-out archs, "
          f"measured on {saved['device']}")
    print("\n| figure | metric | latency |\n|---|---|---|")
    taus = []
    for column in (1, 2):
        gp = ArchPredictor(config, args.seed).fit([r[0] for r in fit], [r[column] for r in fit])
        taus.append((kendall_tau(gp.predict([r[0] for r in held]), [r[column] for r in held]),
                     cross_validated_tau(config, [r[0] for r in fit], [r[column] for r in fit], seed=args.seed)))
    print(f"| Kendall tau, GP on held-out archs | {taus[0][0]:.3f} | {taus[1][0]:.3f} |")
    print(f"| cross-validated tau on the fitted archs alone | {taus[0][1]:.3f} | {taus[1][1]:.3f} |")


def latency_only(args: argparse.Namespace, config, evaluator: ArchEvaluator, start: float,
                 again: ArchEvaluator | None = None) -> None:
    """The latency GP's Kendall tau on held-out archs, beside the analytic FLOPs' tau (a predictor that
    needs no measurement at all), and with `again` (an evaluator with empty records) the tau between a second
    timing of the held-out archs and the first: how well the measurement ranks itself on this machine."""
    fit = sample_archs(config, args.fit, args.seed)
    held = random_archs(config, args.held_out, args.seed + 1000, exclude=fit)
    evaluator.prefetch_latencies(fit + held, args.repeats)
    measured = {arch: evaluator.latency_ms(arch) for arch in fit + held}
    latency_gp = ArchPredictor(config, args.seed).fit(fit, [measured[a] for a in fit])
    tau_gp = kendall_tau(latency_gp.predict(held), [measured[a] for a in held])
    flops = evaluator.cost("flops")
    tau_flops = kendall_tau([flops(a) for a in held], [measured[a] for a in held])
    print("\n| figure | value |\n|---|---|")
    print(f"| model | {args.preset or args.model} ({config.image_size} px) |")
    print(f"| archs timed to fit / held out | {len(fit)} / {len(held)} |")
    print(f"| latency range (ms) | {min(measured.values()):.1f} - {max(measured.values()):.1f} |")
    print(f"| Kendall tau, latency GP on held-out archs | {tau_gp:.3f} |")
    print(f"| Kendall tau, analytic FLOPs on held-out archs | {tau_flops:.3f} |")
    if again is not None:
        again.prefetch_latencies(held, args.repeats)
        tau_again = kendall_tau([again.latency_ms(a) for a in held], [measured[a] for a in held])
        print(f"| Kendall tau, second timing vs first on held-out archs (the ceiling) | {tau_again:.3f} |")
    print(f"| wall time (s) | {time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
