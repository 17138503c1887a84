"""Subnet search (GP-NAS-style predictor, Pareto front, budgets), device profiles and the search command."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from test_supernet import SUPERNET, supernet_model
from transformers import pipeline

from ofa_ufo.core.hardware import precision_support
from ofa_ufo.deploy.nas import (
    ArchPredictor, arch_to_dict, candidate_archs, cross_validated_tau, encode_arch, kendall_tau, parse_budget,
    pareto_front, random_archs, search, space_size, subnet_flops, subnet_params, zero_shot_score,
)
from ofa_ufo.hf.presets import create_config
from ofa_ufo.deploy.profiles import LatencyRecord, ProfileStore, check_target, measure_latency, target_device
from ofa_ufo.deploy.subnets import extract_subnet, largest_arch, smallest_arch
from ofa_ufo.models.ufo import SupernetArch
from ofa_ufo.search import main as search_main


@pytest.fixture(scope="module")
def supernet():
    return supernet_model()


@pytest.fixture(scope="module")
def config(supernet):
    return supernet.config


def test_space_enumeration_and_random_draws(config):
    # SUPERNET: depths {1, 2}, heads {2, 3, 4}, hidden {32, 48, 64}: 9 + 81 archs
    assert space_size(config) == 9 + 81
    every = candidate_archs(config)
    assert len(every) == len(set(every)) == 90
    assert SupernetArch(1, (3,), (48,)) in every and SupernetArch(2, (4, 2), (64, 32)) in every
    drawn = random_archs(config, 30, seed=1)
    assert len(set(drawn)) == 30 and set(drawn) <= set(every)
    assert drawn == random_archs(config, 30, seed=1) and drawn != random_archs(config, 30, seed=2)
    assert largest_arch(config) not in random_archs(config, 89, seed=0, exclude=[largest_arch(config)])
    with pytest.raises(ValueError, match="space holds 90"):
        random_archs(config, 91)


def test_arch_encoding_by_hand(config):
    # largest: depth 2, heads (4, 4), hidden (64, 64)
    assert encode_arch(config, SupernetArch(1, (2,), (48,))).tolist() == [0.5, 0.5, 0.75, 0.0, 0.0]
    assert encode_arch(config, SupernetArch(2, (4, 3), (32, 64))).tolist() == [1.0, 1.0, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("arch", [SupernetArch(1, (2,), (32,)), SupernetArch(2, (3, 4), (48, 64)),
                                  SupernetArch(2, (4, 2), (64, 32))])
def test_analytic_params_match_the_extracted_subnet(supernet, config, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = extract_subnet(supernet, "caption", largest_arch(config))
        dense = extract_subnet(supernet, "caption", arch)
    fixed = sum(p.numel() for p in full.parameters()) - subnet_params(config, largest_arch(config))
    assert subnet_params(config, arch, fixed) == sum(p.numel() for p in dense.parameters())


def test_analytic_flops_match_torch_flop_counter(supernet, config):
    from torch.utils.flop_counter import FlopCounterMode

    arch = SupernetArch(2, (3, 2), (48, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = extract_subnet(supernet, "caption", arch).get_encoder().supernet.blocks  # the deployed blocks
    tokens = 5
    x, task_ids = torch.randn(1, tokens, SUPERNET["supernet_dim"]), torch.tensor([0])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for block in blocks:
            x = block(x, task_ids, None, None)
    # torch's counter skips CPU scaled_dot_product_attention: add QK^T and AV by hand, 2 * 2 * N^2 * width
    attention = 4 * tokens**2 * (3 * 8 + 2 * 8)
    assert subnet_flops(config, arch, tokens) == counter.get_total_flops() + attention


def test_pareto_front_by_hand():
    points = [(3.0, 0.5), (1.0, 0.2), (2.0, 0.6), (2.5, 0.55), (4.0, 0.9), (1.0, 0.1)]
    assert pareto_front(points) == [1, 2, 4]


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one discordant pair of six: (6 - 1 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)


def _synthetic_metric(arch: SupernetArch) -> float:
    """A smooth made-up accuracy: more depth, heads and width help, with diminishing returns."""
    return sum(math.log(h) + 0.5 * math.log(w) for h, w in zip(arch.heads[: arch.depth], arch.hidden[: arch.depth]))


def test_predictor_ranks_archs_it_was_not_fitted_on(config):
    fit = random_archs(config, 20, seed=3)
    held_out = random_archs(config, 30, seed=4, exclude=fit)
    predictor = ArchPredictor(config).fit(fit, [_synthetic_metric(a) for a in fit])
    tau = kendall_tau(predictor.predict(held_out), [_synthetic_metric(a) for a in held_out])
    assert tau >= 0.8, tau


def test_cross_validated_tau_tells_signal_from_noise(config):
    archs = random_archs(config, 24, seed=5)
    assert cross_validated_tau(config, archs, [_synthetic_metric(a) for a in archs]) >= 0.8
    # values that owe nothing to the arch: a GP fits them too (its noise term does not notice), but the
    # archs it did not see are ranked no better than chance
    noise = np.random.default_rng(0).normal(size=len(archs)).tolist()
    assert abs(cross_validated_tau(config, archs, noise)) < 0.4
    assert cross_validated_tau(config, archs, [0.5] * len(archs)) == 0.0  # every arch alike: nothing to rank
    with pytest.raises(ValueError, match="24 archs but 3 values"):
        cross_validated_tau(config, archs, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 3 archs to fit per fold"):
        cross_validated_tau(config, archs[:3], [1.0, 2.0, 3.0])


def test_search_picks_the_best_arch_inside_the_budget(config):
    cost = lambda arch: float(subnet_params(config, arch))  # noqa: E731
    limit = float(np.median([cost(a) for a in candidate_archs(config)]))
    calls = []

    def evaluate(arch):
        calls.append(arch)
        return _synthetic_metric(arch)

    result = search(config, evaluate, cost, ("params", limit), samples=12, predict_cost=False, progress=False)
    inside = [a for a in candidate_archs(config) if cost(a) <= limit]
    best = max(_synthetic_metric(a) for a in inside)
    assert result.pick.cost <= limit and result.pick.metric == _synthetic_metric(result.pick.arch)
    assert result.pick.metric >= max(s.metric for s in result.samples if s.cost <= limit)
    assert result.pick.metric >= best - 0.25 * (best - min(_synthetic_metric(a) for a in inside))
    assert len(calls) <= 12 + 3  # the samples and at most `tries` picks: never the whole space
    assert [f.predicted_cost for f in result.front] == sorted(f.predicted_cost for f in result.front)
    assert set(result.predictor_fit) == {"metric_cv_tau"}  # analytic costs: no cost predictor
    assert result.predictor_fit["metric_cv_tau"] >= 0.5
    assert json.loads(json.dumps(result.to_dict()))["pick"]["arch"]["depth"] == result.pick.arch.depth


def test_budget_nothing_meets_names_the_smallest_cost(config):
    cost = lambda arch: float(subnet_params(config, arch))  # noqa: E731
    smallest = cost(smallest_arch(config))
    with pytest.raises(ValueError, match=f"smallest arch needs {smallest:.4g}"):
        search(config, _synthetic_metric, cost, ("params", smallest / 2), samples=4, predict_cost=False, progress=False)


def test_parse_budget():
    assert parse_budget("latency_ms=12.5") == ("latency_ms", 12.5)
    assert parse_budget("params=3e6") == ("params", 3e6)
    for bad in ("latency=3", "params", "flops=abc", "params=-1"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_zero_shot_score_prefers_capacity_and_is_reproducible(supernet, config):
    small, large = smallest_arch(config), largest_arch(config)
    assert zero_shot_score(supernet, large) > zero_shot_score(supernet, small)
    assert zero_shot_score(supernet, large, seed=3) == zero_shot_score(supernet, large, seed=3)


def test_precision_support_reads_the_cpu_flags(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile avx512_bf16\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n")
    fast, slow = precision_support("cpu", amx), precision_support("cpu", avx2)
    assert fast.bf16_fast and fast.dtype == torch.bfloat16 and "amx_bf16, avx512_bf16" in fast.summary
    assert "Xeon" in fast.summary
    assert not slow.bf16_fast and slow.dtype == torch.float32 and slow.precision == "fp32"


def test_unknown_or_unavailable_targets():
    with pytest.raises(ValueError, match="unknown target 'tpu'.*cpu-fp32"):
        check_target("tpu")
    if not precision_support("cpu").bf16_fast:
        with pytest.raises(ValueError, match="cpu-bf16 needs a CPU that is fast at bf16"):
            check_target("cpu-bf16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            check_target("cuda")


def test_latency_of_an_extracted_subnet(supernet, processor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = extract_subnet(supernet, "caption", smallest_arch(supernet.config))
    record = measure_latency(dense, processor, "cpu-fp32", repeats=2, warmup=1, new_tokens=3,
                             arch=smallest_arch(supernet.config))
    assert record.ms > 0 and record.repeats == 2 and record.new_tokens == 3 and record.device.startswith("CPU: ")
    assert record.arch == {"depth": 1, "heads": [2], "hidden": [32]}
    with pytest.raises(ValueError, match="extract_subnet"):
        measure_latency(supernet, processor, "cpu-fp32", repeats=1)


def test_a_timed_request_decodes_new_tokens_steps_with_the_end_token_banned(supernet, processor, monkeypatch):
    """The end token is the first choice at every step here, so only a ban keeps the request at its length;
    `min_new_tokens` would do that too, with vocabulary-wide passes that no real request makes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = extract_subnet(supernet, "caption", smallest_arch(supernet.config))
    eos = dense.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    forward, generate, calls = dense.forward, dense.generate, []

    def ends_first(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., eos] = out.logits.max() + 10.0
        return out

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out.shape[1] - 1))  # new tokens after the decoder's start token
        return out

    monkeypatch.setattr(dense, "forward", ends_first)
    monkeypatch.setattr(dense, "generate", spy)
    measure_latency(dense, processor, "cpu-fp32", repeats=1, warmup=1, new_tokens=3)
    assert [steps for _, steps in calls] == [3, 3]
    assert all("min_new_tokens" not in kwargs for kwargs, _ in calls)


def test_latencies_of_several_subnets_are_timed_in_interleaved_rounds(supernet, processor, monkeypatch):
    from ofa_ufo.deploy import profiles

    archs = [smallest_arch(supernet.config), largest_arch(supernet.config)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = {arch: extract_subnet(supernet, "caption", arch) for arch in archs}
    calls = []
    real = profiles.interleaved_times

    def spy(fns, rounds, warmup):
        calls.append((list(fns), rounds, warmup))
        return real(fns, rounds, warmup)

    monkeypatch.setattr(profiles, "interleaved_times", spy)
    records = profiles.measure_latencies(dense, processor, "cpu-fp32", rounds=2, warmup=1, new_tokens=2)
    assert calls == [(archs, 2, 1)]  # one interleaved timing for both, not one after the other
    assert list(records) == archs
    assert all(r.ms > 0 and r.repeats == 2 and r.new_tokens == 2 and r.target == "cpu-fp32" for r in records.values())
    assert records[archs[1]].arch == {"depth": 2, "heads": [4, 4], "hidden": [64, 64]}
    with pytest.raises(ValueError, match="extracted subnets"):
        profiles.measure_latencies({archs[0]: supernet}, processor, "cpu-fp32", rounds=1)


def test_the_loss_metric_is_minus_the_models_own_heldout_loss(supernet, processor, tmp_path):
    """`metric="loss"` against the model's own cross-entropy (label smoothing 0) on the same batch, and the
    interleaved latencies it prefetches land in the profile store."""
    from ofa_ufo.search import ArchEvaluator
    from ofa_ufo.training.mixture import build_batch

    evaluator = ArchEvaluator(supernet, processor, "classification", None, 6, 8, "cpu-fp32", 1, tmp_path, "loss")
    arch = smallest_arch(supernet.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = extract_subnet(supernet, "classification", arch).eval()
    assert dense.config.label_smoothing == 0.0
    with torch.no_grad():
        expected = float(dense(**build_batch(processor, evaluator.examples, dense.config)).loss)
    assert evaluator.metric(arch) == pytest.approx(-expected, rel=1e-4)
    assert evaluator.metric_name == "neg_loss"
    import ofa_ufo.search as search_module

    groups = []
    real = search_module.measure_latencies

    def spy(models, *args, **kwargs):
        groups.append(list(models))
        return real(models, *args, **kwargs)

    archs = [arch, largest_arch(supernet.config), SupernetArch(2, (3, 4), (48, 64))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search_module, "measure_latencies", spy)
        evaluator.prefetch_latencies(archs, rounds=1, memory_bytes=1)  # room for the minimum group of two
        evaluator.prefetch_latencies(archs, rounds=1)  # all on record: nothing timed again
    assert groups == [archs[:2], [archs[0], archs[2]]]  # the first arch is every group's reference
    assert ProfileStore(tmp_path / "cpu-fp32.json", "cpu-fp32").lookup(arch) == evaluator.latency_ms(arch) > 0
    with pytest.raises(ValueError, match="metric must be one of"):
        ArchEvaluator(supernet, processor, "classification", None, 2, 8, "cpu-fp32", 1, None, "accuracy")
    # demo_classification's validation split holds 200 scenes (tasks/demo_classification.yaml): asking for more
    # is said, not silently cut
    with pytest.warns(UserWarning, match="holds 200 held-out examples, fewer than the 1000 asked for"):
        short = ArchEvaluator(supernet, processor, "classification", None, 1000, 8, "cpu-fp32", 1, None)
    assert len(short.examples) == 200


def test_latency_groups_are_scaled_by_their_reference_arch(supernet, processor, monkeypatch):
    """Drift between groups taken out by hand: the reference (first arch) takes 10 ms in group one and 20 ms
    in group two (the machine ran at half speed), so its overall median is 15; an arch of 20 ms in group
    one and one of 40 ms in group two are both 30 ms at that speed."""
    import ofa_ufo.search as search_module
    from ofa_ufo.search import ArchEvaluator

    archs = [smallest_arch(supernet.config), largest_arch(supernet.config), SupernetArch(2, (3, 4), (48, 64))]
    raw = iter([{archs[0]: 10.0, archs[1]: 20.0}, {archs[0]: 20.0, archs[2]: 40.0}])

    def fake(models, *args, **kwargs):
        times = next(raw)
        assert list(models) == list(times)
        return {a: LatencyRecord("cpu-fp32", ms, 1, 8, "CPU: test", None) for a, ms in times.items()}

    monkeypatch.setattr(search_module, "measure_latencies", fake)
    evaluator = ArchEvaluator(supernet, processor, "classification", None, 2, 8, "cpu-fp32", 1, None)
    evaluator.prefetch_latencies(archs, rounds=1, memory_bytes=1)
    assert [evaluator.latency_ms(a) for a in archs] == [15.0, 30.0, 30.0]


def test_an_arch_timed_late_is_scaled_to_the_first_timing(supernet, processor, monkeypatch, tmp_path):
    """The search's pick is timed minutes after the samples. By hand: the first call times A at 10 ms and
    B at 20 ms; later the machine runs faster, and A takes 8 ms beside the pick C's 12 ms in the same rounds:
    C is 1.5x A, so 15 ms on the first timing's scale (not its raw 12 ms), and A keeps its 10 ms. A later run
    reading A and B from the profile store times D beside A (D at 2x A's 5 ms there: 20 ms)."""
    import ofa_ufo.search as search_module
    from ofa_ufo.search import ArchEvaluator

    a, b, c = smallest_arch(supernet.config), largest_arch(supernet.config), SupernetArch(2, (3, 4), (48, 64))
    d = SupernetArch(2, (4, 3), (64, 48))
    raw = iter([{a: 10.0, b: 20.0}, {a: 8.0, c: 12.0}, {a: 5.0, d: 10.0}])
    calls = []

    def fake(models, *args, **kwargs):
        times = next(raw)
        calls.append(list(models))
        return {arch: LatencyRecord("cpu-fp32", ms, 1, 8, target_device("cpu-fp32"), arch_to_dict(arch))
                for arch, ms in times.items()}

    monkeypatch.setattr(search_module, "measure_latencies", fake)
    evaluator = ArchEvaluator(supernet, processor, "classification", None, 2, 8, "cpu-fp32", 1, tmp_path)
    evaluator.prefetch_latencies([a, b], rounds=1)
    assert evaluator.latency_ms(c) == 15.0
    assert calls == [[a, b], [a, c]]  # the late arch went beside the first-timed one
    assert [evaluator.latency_ms(x) for x in (a, b)] == [10.0, 20.0]
    assert evaluator.latency_ms(c) == 15.0 and len(calls) == 2  # on record now: not timed again
    later = ArchEvaluator(supernet, processor, "classification", None, 2, 8, "cpu-fp32", 1, tmp_path)
    assert [later.latency_ms(x) for x in (a, b, c)] == [10.0, 20.0, 15.0] and len(calls) == 2
    assert later.latency_ms(d) == 20.0 and calls[-1] == [a, d]


def test_flops_budget_counts_the_image_tokens_the_blocks_see(supernet, processor):
    """The FLOPs cost uses the token count of the model's own image size (seen here by a hook on the first
    block), not the largest grid the position table could hold."""
    from ofa_ufo.deploy.profiles import request_inputs
    from ofa_ufo.search import ArchEvaluator

    evaluator = ArchEvaluator(supernet, processor, "classification", None, 2, 8, "cpu-fp32", 1, None)
    arch = largest_arch(supernet.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = extract_subnet(supernet, "classification", arch).eval()
    seen = []
    hook = dense.get_encoder().supernet.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    with torch.no_grad():
        dense.get_encoder()(**request_inputs(processor, "classification", supernet.config.image_size))
    hook.remove()
    assert evaluator.cost("flops")(arch) == subnet_flops(supernet.config, arch, seen[0][1])
    assert seen[0][1] < dense.get_encoder().supernet.pos_embed.num_embeddings - 1  # the table holds more


def test_profile_store_round_trip_and_other_machines(tmp_path):
    path = tmp_path / "cpu-fp32.json"
    store = ProfileStore(path, "cpu-fp32")
    arch = SupernetArch(1, (2,), (32,))
    store.add(LatencyRecord("cpu-fp32", 4.5, 3, 8, store.device, {"depth": 1, "heads": [2], "hidden": [32]}))
    again = ProfileStore(path, "cpu-fp32")
    assert again.lookup(arch) == 4.5 and again.lookup(SupernetArch(1, (3,), (32,))) is None
    assert again.archs() == [(arch, 4.5)]
    data = json.loads(path.read_text())
    for field, other in (("device", "CPU: some other machine"), ("workload", None)):  # None: a file of before
        path.write_text(json.dumps({**data, field: other}))
        with pytest.warns(UserWarning, match="not used"):
            assert ProfileStore(path, "cpu-fp32").records == []
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cpu-fp32.json: not a latency profile"):
        ProfileStore(path, "cpu-fp32")


def test_search_command_writes_a_servable_pick(supernet, processor, tmp_path, capsys):
    model_dir, out = tmp_path / "supernet", tmp_path / "pick"
    supernet.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    full = subnet_params(supernet.config, largest_arch(supernet.config))
    small = subnet_params(supernet.config, smallest_arch(supernet.config))
    budget = (full + small) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            fixed = sum(p.numel() for p in extract_subnet(supernet, "classification").parameters()) - full
    code = search_main(["--model", str(model_dir), "--task", "classification", "--budget", f"params={budget + fixed}",
                        "--output", str(out), "--samples", "5", "--examples", "4", "--zero-shot", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "search.json").read_text())
    assert report["task"] == "classification" and report["metric"] == "top1" and report["examples"] == 4
    assert report["pick"]["cost"] <= budget + fixed and len(report["samples"]) == 5
    assert len(report["zero_shot"]["scores"]) == 5
    assert (out / "search.png").stat().st_size > 1000
    assert set(report["predictor_fit"]) == {"metric_cv_tau"}
    printed = capsys.readouterr()
    assert "| pick | top1 | params |" in printed.out
    cv_tau = report["predictor_fit"]["metric_cv_tau"]
    assert f"cross-validated Kendall tau on the samples: metric {cv_tau:.3f}" in printed.out
    assert ("warning: the top1 of the samples barely ranks" in printed.err) == (cv_tau < 0.3)
    result = pipeline("ofa-ufo", model=str(out))(np.zeros((64, 64, 3), dtype=np.uint8), task="classification",
                                                  labels=["circle", "square"])
    assert result["label"] in {"circle", "square"}


def test_search_command_bad_input(supernet, processor, tmp_path, capsys):
    model_dir = tmp_path / "supernet"
    supernet.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--output", str(tmp_path / "out"), "--samples", "3", "--examples", "2"]
    assert search_main([*common, "--task", "classification", "--budget", "params=10", "--target", "tpu"]) == 1
    assert "unknown target 'tpu'" in capsys.readouterr().err
    assert search_main([*common, "--task", "classification", "--budget", "params=10"]) == 1
    assert "no arch meets params <= 10" in capsys.readouterr().err


def test_deployment_guide_commands(tmp_path, capsys):
    """docs/deployment.md's four commands, on a tiny supernet: train with arch sampling, search under a
    latency budget, export int8, predict with ONNX Runtime."""
    from PIL import Image

    from ofa_ufo.cli.main import main as cli

    supernet, chip, shipped = (tmp_path / n for n in ("supernet", "chip", "int8"))  # train exports into its output_dir
    vision = {**SUPERNET, "supernet_sample_arch": True, "supernet_sandwich": True}
    overrides = ("model_overrides={d_model: 32, encoder_layers: 1, decoder_layers: 1, encoder_attention_heads: 4, "
                 "decoder_attention_heads: 4, encoder_ffn_dim: 64, decoder_ffn_dim: 64, image_size: 64, dropout: 0.0, "
                 f"vision_config: {json.dumps(vision)}}}")
    assert cli(["train", "--config", "pretrain_demo_chips", overrides, "max_steps=2", "batch_size=3", "stem_warmup_images=32",
                "eval_examples=2", "num_threads=1", "show_photos=false", f"output_dir={supernet}"]) == 0
    assert cli(["search", "--model", str(supernet), "--task", "vqa", "--target", "cpu-fp32", "--budget",
                "latency_ms=100000", "--output", str(chip), "--samples", "3", "--examples", "3", "--repeats", "1",
                "--threads", "1"]) == 0
    assert json.loads((chip / "search.json").read_text())["task"] == "vqa"
    assert "too few samples to cross-validate the predictors" in capsys.readouterr().out
    assert len(ProfileStore(supernet / "profiles" / "cpu-fp32.json", "cpu-fp32").records) >= 3
    assert cli(["export", "--model", str(chip), "--format", "onnx", "--quantize", "int8", "--output", str(shipped)]) == 0
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert cli(["predict", "--model", str(shipped), "--task", "vqa", "--text", "what color is the circle?",
                str(photo)]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(answer["text"], str) and answer["text"].strip() and 0 < answer["score"] <= 1


@pytest.mark.benchmark
def test_chips_benchmark_latency_only_on_a_random_preset(tmp_path):
    """benchmarks/chips_search.py --preset P --latency-only: the latency predictor's table without training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "benchmarks/chips_search.py", "--preset", "ofa_ufo_tiny_ufo", "--latency-only",
               "--fit", "4", "--held-out", "3", "--repeats", "1", "--threads", "1", "--examples", "2",
               "--profiles", str(tmp_path)]
    result = subprocess.run(command + ["--retime"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("| archs timed to fit / held out | 4 / 3 |", "| Kendall tau, latency GP on held-out archs |",
                "| Kendall tau, analytic FLOPs on held-out archs |",
                "| Kendall tau, second timing vs first on held-out archs (the ceiling) |"):
        assert row in result.stdout, row
    # (its device: 1 thread); the second timing keeps its own records
    assert len(json.loads((tmp_path / "cpu-fp32.json").read_text())["records"]) == 7
    # --refit: the predictors fitted again on a saved run's rows, by hand: a metric that follows the arch
    config = create_config("ofa_ufo_tiny_ufo")
    config.save_pretrained(tmp_path / "supernet")
    archs = random_archs(config, 30, seed=7)
    rows = [{"arch": arch_to_dict(a), "metric": _synthetic_metric(a), "latency_ms": 1.0 + i % 3, "fit": i < 20}
            for i, a in enumerate(archs)]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"task": "vqa", "metric": "vqa_accuracy", "device": "CPU: test", "rows": rows}))
    held = archs[20:]
    gp = ArchPredictor(config).fit(archs[:20], [_synthetic_metric(a) for a in archs[:20]])
    expected = kendall_tau(gp.predict(held), [_synthetic_metric(a) for a in held])
    refit = subprocess.run(command[:2] + ["--model", str(tmp_path / "supernet"), "--refit", str(saved)], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=600)
    assert refit.returncode == 0, refit.stderr[-3000:]
    assert "20 fitted / 10 held-out archs" in refit.stdout
    assert f"| Kendall tau, GP on held-out archs | {expected:.3f} |" in refit.stdout and expected >= 0.8
    assert "| cross-validated tau on the fitted archs alone |" in refit.stdout
    refused = subprocess.run(command[:4] + ["--fit", "4"], cwd=repo, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "add --latency-only" in refused.stderr
    refused = subprocess.run(command[:2] + ["--model", "x", "--retime"], cwd=repo, env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "--retime goes with --latency-only" in refused.stderr
