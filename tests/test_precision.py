"""Precision where the hardware is fast at it (issue 34): detection with a forced answer
(`OFA_UFO_CPUINFO` -> tests/fixtures/cpuinfo_*.txt), bf16 training and inference against fp32, and
dynamic int8 deployment of a dense model.

The bf16 tests run bf16 autocast / bf16 weights on any CPU; on one without AMX / AVX512-BF16 bf16 is
emulated (slow), so these runs are a few steps of a d_model-32 model. Speed is measured only by
benchmarks/precision.py, never here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_model
from PIL import Image
from safetensors import safe_open
from test_supernet import supernet_model
from transformers import AutoModelForSeq2SeqLM, pipeline

import ofa_ufo
from ofa_ufo.core.hardware import CPUINFO_ENV, precision_support, resolve_precision
from ofa_ufo.deploy.quantize import OFAUFOInt8ForConditionalGeneration, int8_linear_names, quantize_rows
from ofa_ufo.export import main as export_main
from ofa_ufo.hf.modeling import with_precision
from ofa_ufo.layers.inference_cache import cache_of
from ofa_ufo.layers.packed_linear import PackedLinear, can_pack, pack_linears
from ofa_ufo.training import Trainer
from ofa_ufo.training.config import config_from_dict

FIXTURES = Path(__file__).parent / "fixtures"
AMX, AVX2 = FIXTURES / "cpuinfo_amx.txt", FIXTURES / "cpuinfo_avx2.txt"
# documented in docs/training.md: a bf16-autocast step's loss within 1 % of the fp32 run's
LOSS_TOLERANCE = 0.01
# documented in docs/usage.md: a bf16 beam's mean token log-probability within 0.05 of fp32's
SCORE_TOLERANCE = 0.05


def images(count: int) -> list[Image.Image]:
    rng = np.random.RandomState(7)
    return [Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")) for _ in range(count)]


# ---- detection -------------------------------------------------------------------------------


def test_cpuinfo_override_forces_either_answer(monkeypatch):
    monkeypatch.setenv(CPUINFO_ENV, str(AMX))
    assert precision_support("cpu").bf16_fast
    choice = resolve_precision("auto", "cpu")
    assert (choice.precision, choice.dtype) == ("bf16", torch.bfloat16)
    assert "amx_bf16" in choice.summary and "Xeon" in choice.summary
    monkeypatch.setenv(CPUINFO_ENV, str(AVX2))
    choice = resolve_precision("auto", "cpu")
    assert (choice.precision, choice.dtype) == ("fp32", torch.float32)
    assert "no amx_bf16" in choice.summary and "EPYC" in choice.summary
    monkeypatch.setenv(CPUINFO_ENV, str(FIXTURES / "no_such_cpuinfo.txt"))
    with pytest.raises(FileNotFoundError, match=f"{CPUINFO_ENV}=.*no_such_cpuinfo"):
        precision_support("cpu")


def test_explicit_precision_is_taken_as_asked(monkeypatch):
    monkeypatch.setenv(CPUINFO_ENV, str(AMX))
    assert resolve_precision("fp32").precision == "fp32"
    monkeypatch.setenv(CPUINFO_ENV, str(AVX2))
    forced = resolve_precision("bf16")
    assert forced.precision == "bf16" and "emulated" in forced.summary
    assert forced.record() == {"requested": "bf16", "used": "bf16", "summary": forced.summary}
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16")


# ---- training --------------------------------------------------------------------------------


def run_config(output_dir: Path, **fields):
    """Four steps of a tiny caption run whose losses move (lr 1e-3, no clipping, no warm-up)."""
    base = dict(model_overrides=dict(TINY), tasks={"caption": 1}, batch_size=4, max_steps=4, eval_examples=0,
                demo_train_scenes=32, log_every=1, num_threads=1, lr=1e-3, clip_norm=0.0, warmup_ratio=0.0,
                freeze_batchnorm=True, output_dir=str(output_dir))
    return config_from_dict({**base, **fields}, "test")


@pytest.fixture(scope="module")
def auto_runs(tmp_path_factory):
    """precision auto on the AVX2 fixture (-> fp32) and on the AMX fixture (-> bf16): (trainer, result, stdout
    line) per name."""
    runs = {}
    threads = torch.get_num_threads()
    try:
        for name, cpuinfo in (("avx2", AVX2), ("amx", AMX)):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(CPUINFO_ENV, str(cpuinfo))
                trainer = Trainer(run_config(tmp_path_factory.mktemp(name)), resume="never")
                runs[name] = (trainer, trainer.fit())
    finally:
        torch.set_num_threads(threads)
    return runs


def test_auto_precision_is_chosen_and_saved_with_the_metrics(auto_runs):
    for name, used in (("avx2", "fp32"), ("amx", "bf16")):
        trainer, result = auto_runs[name]
        assert trainer.precision.precision == used
        saved = json.loads((result.output_dir / "metrics.json").read_text())["precision"]
        assert saved["requested"] == "auto" and saved["used"] == used
        assert ("Xeon" if name == "amx" else "EPYC") in saved["summary"]


def test_bf16_training_tracks_fp32_within_the_documented_tolerance(auto_runs):
    fp32, bf16 = auto_runs["avx2"][1].losses, auto_runs["amx"][1].losses
    assert len(fp32) == len(bf16) == 4
    assert fp32 != bf16  # autocast really ran the matmuls in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(a), (fp32, bf16)
    assert bf16[-1] < bf16[0]  # and it still learns


def test_bf16_training_keeps_fp32_master_weights_and_optimizer_state(auto_runs):
    trainer = auto_runs["amx"][0]
    assert {p.dtype for p in trainer.unwrapped.parameters()} == {torch.float32}
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if v.is_floating_point()]
    assert moments and {v.dtype for v in moments} == {torch.float32}


# ---- inference -------------------------------------------------------------------------------


def generate(model, processor, image, dtype, **options):
    inputs = processor(images=image, text=" what does the image describe?", return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                              **options)


def test_bf16_encoder_and_generation_agree_with_fp32(processor):
    fp32 = tiny_model(seed=3)
    bf16 = tiny_model(seed=3).to(torch.bfloat16)
    inputs = processor(images=images(2), text=[" what does the image describe?"] * 2, return_tensors="pt")
    with torch.no_grad():
        a = fp32.get_encoder()(**inputs).last_hidden_state
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        b = bf16.get_encoder()(**inputs).last_hidden_state
    assert b.dtype == torch.bfloat16
    assert ((a - b.float()).norm() / a.norm()) < 0.02  # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding
    agree = {}
    for name, options in (("greedy", dict(num_beams=1)), ("beam-5", dict(num_beams=5))):
        same = 0
        for image in images(6):
            x = generate(fp32, processor, image, torch.float32, **options)
            y = generate(bf16, processor, image, torch.bfloat16, **options)
            if torch.equal(x.sequences, y.sequences):
                same += 1
                if name == "beam-5":
                    assert abs(float(x.sequences_scores[0]) - float(y.sequences_scores[0])) <= SCORE_TOLERANCE
        agree[name] = same / 6
    print(f"bf16 vs fp32 token agreement on 6 images: {agree}")
    assert min(agree.values()) >= 0.5


def test_from_pretrained_and_pipeline_take_a_precision(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(CPUINFO_ENV, str(AMX))
    model = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(tiny_checkpoint, precision="auto")
    assert model.dtype == torch.bfloat16 and model.precision_choice.precision == "bf16"
    pipe = pipeline("ofa-ufo", model=str(tiny_checkpoint), precision="auto")
    assert pipe.model.dtype == torch.bfloat16
    assert isinstance(pipe(images(1)[0], task="caption", max_new_tokens=3)["text"], str)
    monkeypatch.setenv(CPUINFO_ENV, str(AVX2))
    assert AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint, precision="auto").dtype == torch.float32
    assert pipeline("ofa-ufo", model=str(tiny_checkpoint), precision="bf16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="either precision= or dtype="):
        AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint, precision="auto", dtype=torch.float32)


needs_onednn = pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN packed linear kernels")


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    """Equal up to the rounding of a bf16 result (oneDNN's packed kernels may sum in another order)."""
    return bool((a.float() - b.float()).abs().max() <= 0.02 * scale)


@needs_onednn
def test_packed_bf16_linears_give_the_same_outputs_and_follow_weight_changes(processor):
    """`from_pretrained(precision="bf16")` on a CPU packs the Linear weights for oneDNN: logits equal the unpacked
    bf16 model's up to bf16 rounding, the state dict is unchanged, and weights that change (load_state_dict, or a
    training step whose fused AdamW updates them without a version bump) are seen by the next forward instead of
    a stale packed copy."""
    plain = tiny_model(seed=4).to(torch.bfloat16)
    packed = with_precision(tiny_model(seed=4), "bf16")
    assert packed.dtype == torch.bfloat16
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) > 10
    assert packed.state_dict().keys() == plain.state_dict().keys()
    inputs = processor(images=images(2), text=[" what does the image describe?"] * 2, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]])

    def logits(model):
        with torch.no_grad():
            return model(**inputs, labels=labels).logits

    before = logits(packed)
    scale = before.float().abs().max()
    assert _close(before, logits(plain), scale)
    with torch.no_grad():
        tokens = packed.generate(**inputs, num_beams=5, max_new_tokens=6)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 7
    other = tiny_model(seed=5).to(torch.bfloat16)
    packed.load_state_dict(other.state_dict())
    after = logits(packed)
    assert _close(after, logits(other), scale) and not _close(after, before, scale)
    # a training step: the forward with gradients takes the plain Linear path, and the fused AdamW step that
    # follows moves the weights in place without bumping version counters; the next forward must see it
    packed.train()
    packed(**inputs, labels=labels).loss.backward()
    fc1 = packed.model.decoder.layers[0].fc1
    assert isinstance(fc1, PackedLinear) and fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    torch.optim.AdamW(packed.parameters(), lr=5e-2, fused=True).step()
    packed.eval()
    twin = tiny_model(seed=4).to(torch.bfloat16)
    twin.load_state_dict(packed.state_dict())
    stepped = logits(packed)
    assert _close(stepped, logits(twin), scale) and not _close(stepped, after, scale)


@needs_onednn
def test_packed_linear_packs_for_decoding_rows_only():
    """A few rows (decoding) run from the packed weight; a long input (an encoder's image tokens) takes the plain
    kernel and leaves no packed copy behind. Both give the layer's output up to bf16 rounding."""
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    assert pack_linears(layer) == 1 and isinstance(layer, PackedLinear)
    generator = torch.Generator().manual_seed(0)
    long_input = torch.randn(2, 300, 64, generator=generator).to(torch.bfloat16)  # 600 rows
    few_rows = torch.randn(5, 1, 64, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        long_output = layer(long_input)
        assert "packed" not in cache_of(layer)
        few_output = layer(few_rows)
        assert "packed" in cache_of(layer)
    for x, y in ((long_input, long_output), (few_rows, few_output)):
        expected = x.float() @ layer.weight.float().T + layer.bias.float()
        assert _close(y, expected, expected.abs().max())


@needs_onednn
def test_a_served_bf16_model_copies_and_pickles(processor):
    """After inference a bf16 model holds oneDNN-packed weights, folded stem weights and position biases, none
    of which can be deep-copied or pickled (packed tensors have no storage): they live beside the module, so
    `copy.deepcopy` (an EMA copy, a distillation teacher) and `torch.save(model)` work, and the copy computes
    the same logits."""
    import copy
    import io

    model = with_precision(tiny_model(seed=4), "bf16")
    inputs = processor(images=images(2), text=[" what does the image describe?"] * 2, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        model.generate(**inputs, num_beams=2, max_new_tokens=3)
        logits = model(**inputs, decoder_input_ids=torch.tensor([[0, 5]] * 2)).logits
    fc1 = model.model.decoder.layers[0].fc1
    assert "packed" in cache_of(fc1) and cache_of(fc1)["packed"][2].is_mkldnn
    twin = copy.deepcopy(model)
    assert not cache_of(twin.model.decoder.layers[0].fc1)  # the copy starts without caches
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        assert twin(**inputs, decoder_input_ids=torch.tensor([[0, 5]] * 2)).logits.equal(logits)


def test_fp32_models_are_not_packed(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(CPUINFO_ENV, str(AVX2))
    model = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(tiny_checkpoint, precision="auto")
    assert model.dtype == torch.float32 and not any(isinstance(m, PackedLinear) for m in model.modules())


# ---- int8 ------------------------------------------------------------------------------------


def test_quantize_rows_by_hand():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.54, 1.27, 0.01]])
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8
    assert torch.allclose(scale[[0, 2]], torch.tensor([1 / 127, 0.02]))
    assert q[0].tolist() == [127, -64, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [-127, 64, 0]


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, processor):
    model = tiny_model(seed=5)
    directory = tmp_path_factory.mktemp("int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ofa_ufo.quantize_int8_dynamic(model).save_pretrained(directory)
    processor.save_pretrained(directory)
    model.save_pretrained(directory.parent / "fp32")
    return model, directory


def saved_bytes(model) -> int:
    """What storing the Linear layers (not the tied output head) and the token embedding as int8 rows + fp32
    scales saves against fp32: 3 bytes per weight, less 4 bytes per row's scale."""
    matrices = [model.get_submodule(name).weight for name in int8_linear_names(model)]
    matrices.append(model.get_input_embeddings().weight)
    return sum(3 * w.numel() - 4 * w.shape[0] for w in matrices)


def test_int8_directory_stores_int8_and_is_smaller_by_the_expected_bytes(int8_dir):
    model, directory = int8_dir
    fp32_file, int8_file = directory.parent / "fp32" / "model.safetensors", directory / "model.safetensors"
    saved = fp32_file.stat().st_size - int8_file.stat().st_size
    assert abs(saved - saved_bytes(model)) < 64 * 1024  # the headers differ by key names and counts only
    with safe_open(str(int8_file), "pt") as weights:
        for name in int8_linear_names(model):
            assert weights.get_slice(f"{name}.weight").get_dtype() == "I8"
            assert weights.get_slice(f"{name}.weight_scale").get_dtype() == "F32"
        assert weights.get_slice("model.shared.weight").get_dtype() == "I8"
    assert json.loads((directory / "config.json").read_text())["model_type"] == "ofa-ufo-int8"


def test_int8_round_trip_is_exact_and_close_to_fp32(int8_dir, processor):
    model, directory = int8_dir
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert isinstance(loaded, OFAUFOInt8ForConditionalGeneration)
    inputs = processor(images=images(2), text=[" what does the image describe?"] * 2, return_tensors="pt")
    decoder = torch.tensor([[0, 100, 200], [0, 300, 400]])
    with torch.no_grad():
        reference = model(**inputs, decoder_input_ids=decoder).logits
        in_memory = ofa_ufo.quantize_int8_dynamic(model)(**inputs, decoder_input_ids=decoder).logits
        reloaded = loaded(**inputs, decoder_input_ids=decoder).logits
    assert torch.equal(in_memory, reloaded)
    assert (reference - reloaded).abs().max() <= 0.05 * reference.abs().max()
    again = directory.parent / "int8_again"
    loaded.save_pretrained(again)
    first, second = (safe_open(str(d / "model.safetensors"), "pt") for d in (directory, again))
    with first as a, second as b:  # saving a loaded int8 model writes the same tensors
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (again / "README.md").is_file()


def test_int8_output_head_multiplies_the_embeddings_int8_rows(int8_dir):
    """The tied output projection runs in int8 from the stored rows (nothing extra saved); a logits range and
    `head=False` multiply the fp32 rows the lookup uses."""
    model, directory = int8_dir
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert loaded.config.int8_head and loaded.output_int8 is not None
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        assert not any(key.startswith("output_int8") for key in weights.keys())
        q, scale = weights.get_tensor("model.shared.weight"), weights.get_tensor("model.shared.weight_scale")
    states = torch.randn(2, 3, TINY["d_model"], generator=torch.Generator().manual_seed(0))
    rows = q.float() * scale[:, None]  # (V, D): what the int8 rows stand for
    expected = states @ rows.T  # (2, 3, V)
    with torch.no_grad():
        int8_logits = loaded.project(states)
        ranged = loaded.project(states, (10, 20))
        plain = ofa_ufo.quantize_int8_dynamic(model, head=False)
        fp32_head = plain.project(states)
    assert int8_logits.shape == expected.shape and not torch.equal(int8_logits, expected)  # activations quantised
    assert (int8_logits - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.allclose(ranged[..., 10:20], expected[..., 10:20], atol=1e-5)
    assert torch.isinf(ranged[..., :10]).all() and torch.isinf(ranged[..., 20:]).all()
    assert plain.output_int8 is None and not plain.config.int8_head
    assert torch.allclose(fp32_head, expected, atol=1e-5)


def test_int8_model_is_served_by_the_pipeline(int8_dir):
    _, directory = int8_dir
    pipe = pipeline("ofa-ufo", model=str(directory))
    assert isinstance(pipe.model, OFAUFOInt8ForConditionalGeneration)
    result = pipe(images(1)[0], task="caption", max_new_tokens=4)
    assert isinstance(result["text"], str) and 0 <= result["score"] <= 1
    with pytest.raises(ValueError, match="keeps its own precision"):
        pipeline("ofa-ufo", model=str(directory), precision="bf16")


def test_a_routed_supernet_is_quantised_through_its_task_subnet(processor):
    supernet = supernet_model()
    with pytest.raises(ValueError, match="routed UFO supernet.*task="):
        ofa_ufo.quantize_int8_dynamic(supernet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = ofa_ufo.extract_subnet(supernet, "caption")
        int8 = ofa_ufo.quantize_int8_dynamic(supernet, task="caption")
    assert not int8.config.vision_config.supernet_routed
    names = int8.config.int8_linears
    assert "model.encoder.supernet.in_proj" in names  # called as a layer: quantised
    assert not any(".supernet.blocks." in name for name in names)  # sliced by elastic parents: fp32
    inputs = processor(images=images(1), text=[" what does the image describe?"], return_tensors="pt")
    decoder = torch.tensor([[0, 100, 200]])
    with torch.no_grad():  # the UFO blocks (elastic layers, kept fp32) run inside the int8 model
        reference = dense(**inputs, decoder_input_ids=decoder).logits
        quantised = int8(**inputs, decoder_input_ids=decoder).logits
    assert (reference - quantised).abs().max() <= 0.05 * reference.abs().max()


def test_export_cli_writes_an_int8_model(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "int8"
    assert export_main(["--model", str(tiny_checkpoint), "--format", "torch", "--quantize", "int8",
                        "--output", str(output)]) == 0
    assert "int8" in capsys.readouterr().out
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(output), OFAUFOInt8ForConditionalGeneration)
    assert (output / "tokenizer.json").is_file()


@pytest.mark.benchmark
def test_quick_benchmark_prints_the_int8_rows_of_both_runtimes():
    """benchmarks/precision.py --quick --parts int8 --onnx: the ISA line first, then PyTorch's and ONNX Runtime's
    int8 rows with their token agreement."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/precision.py", "--quick", "--parts", "int8", "--onnx"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ISA: ")
    for row in ("(int8, output head included) |", "(ONNX Runtime fp32) |", "(ONNX Runtime int8) |",
                "greedy tokens identical to fp32 (ONNX Runtime int8)"):
        assert row in result.stdout, row


@pytest.mark.benchmark
def test_benchmark_measures_agreement_on_a_saved_model_over_demo_scenes(tmp_path):
    """precision.py --model DIR: the saved model (at its own image size) instead of the random preset, and its
    bf16 agreement rows over generated demo scenes."""
    import os
    import subprocess
    import sys

    import ofa_ufo

    model = ofa_ufo.create_model("ofa_ufo_tiny", image_size=32, d_model=32, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64)
    model.save_pretrained(tmp_path)
    ofa_ufo.create_processor("ofa_ufo_tiny", image_size=32).save_pretrained(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/precision.py", "--model", str(tmp_path), "--parts",
                             "caption", "--force-bf16", "--agreement-images", "2", "--repeats", "1",
                             "--new-tokens", "3", "--threads", "1"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model {tmp_path};" in result.stdout
    assert "beam-5 caption, 32 px, 3 new tokens (bf16)" in result.stdout  # the saved model's own size
    for name in ("greedy", "beam-5"):
        assert f"| {name} tokens identical to fp32 (bf16), 2 images |" in result.stdout, result.stdout
