"""OFA's length-limit rule (`fairseq_max_len_eos`): at the last position only EOS is allowed and its
log-probability counts in the beam score, as in fairseq's SequenceGenerator.

Expected scores are recomputed by hand: the returned sequences are teacher-forced through the model
and their per-step log-probabilities summed (beam scores divide by the generated length, EOS included).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, pipeline

import ofa_ufo
from ofa_ufo.converters.hf_port import TIED_TARGETS, save_converted
from ofa_ufo.generation.fairseq_rules import FairseqMaxLenEOS
from ofa_ufo.generation.settings import check_generation_settings
from ofa_ufo.hf.tokenization import DEFAULT_VOCAB_DIR

from conftest import tiny_model

EOS = 2
MAX_NEW = 5
PROMPTS = [" what does the image describe?", " what is in the image?"]


def shift_eos(model: ofa_ufo.OFAUFOForConditionalGeneration, amount: float) -> None:
    """Add `amount` to the EOS logit at every decoder position.

    The decoder's final LayerNorm output is w * n + b with n of zero mean over features; with w all
    ones and b all ones, every output state sums to D, so adding amount / D to each entry of EOS's
    row of the tied table adds exactly `amount` to its logit."""
    norm = model.model.decoder.layer_norm
    with torch.no_grad():
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        norm.bias.fill_(1.0)
        model.model.shared.weight[EOS] += amount / norm.bias.numel()


@pytest.fixture(scope="module")
def inputs(processor) -> dict[str, torch.Tensor]:
    images = [(np.random.RandomState(k).rand(40, 50, 3) * 255).astype(np.uint8) for k in range(len(PROMPTS))]
    batch = processor(images=images, text=PROMPTS, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}


@pytest.fixture(scope="module")
def no_eos_model() -> ofa_ufo.OFAUFOForConditionalGeneration:
    """A tiny model whose EOS is 30 nats less likely than usual: no beam stops before the limit on its own."""
    model = tiny_model(seed=3)
    shift_eos(model, -30.0)
    return model


def step_logprobs(model, inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """(rows, new_tokens) log p(token | prefix) of each sequence (rows grouped per input, in order)."""
    repeat = sequences.shape[0] // inputs["input_ids"].shape[0]
    rows = {k: v.repeat_interleave(repeat, 0) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**rows, decoder_input_ids=sequences[:, :-1], use_cache=False).logits
    return logits.float().log_softmax(-1).gather(-1, sequences[:, 1:, None])[..., 0]


def beam_search(model, inputs, **kwargs):
    settings = dict(num_beams=3, num_return_sequences=3, max_new_tokens=MAX_NEW, length_penalty=1.0)
    return model.generate(**inputs, **{**settings, **kwargs}, output_scores=True, return_dict_in_generate=True)


def test_processor_forces_eos_at_the_last_position_keeping_its_score():
    scores = torch.randn(4, 11)
    rule = FairseqMaxLenEOS(max_length=6, eos_token_id=EOS)
    assert torch.equal(rule(torch.zeros(4, 4, dtype=torch.long), scores), scores)  # not the last position
    last = rule(torch.zeros(4, 5, dtype=torch.long), scores)
    assert torch.equal(last[:, EOS], scores[:, EOS])
    others = torch.ones(11, dtype=torch.bool)
    others[EOS] = False
    assert torch.isneginf(last[:, others]).all()
    with pytest.raises(ValueError, match="eos_token_id"):
        FairseqMaxLenEOS(6, [])


def test_beams_at_the_limit_end_in_eos_and_count_its_logprob(no_eos_model, inputs):
    out = beam_search(no_eos_model, inputs, fairseq_max_len_eos=True)
    sequences = out.sequences
    assert sequences.shape == (6, 1 + MAX_NEW)
    assert sequences[:, -1].eq(EOS).all() and not sequences[:, :-1].eq(EOS).any()
    logprobs = step_logprobs(no_eos_model, inputs, sequences)
    assert (logprobs[:, -1] < -25).all()  # EOS's own log-probability is in the score: fairseq's rule
    expected = logprobs.sum(-1) / MAX_NEW  # length_penalty 1: divided by the generated length, EOS included
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=0)
    # transformers' forced EOS picks the same tokens at the limit but scores EOS as log-probability 0
    forced = beam_search(no_eos_model, inputs, forced_eos_token_id=EOS)
    forced_logprobs = step_logprobs(no_eos_model, inputs, forced.sequences)
    torch.testing.assert_close(forced.sequences_scores, forced_logprobs[:, :-1].sum(-1) / MAX_NEW, atol=1e-4, rtol=0)
    # the rule supersedes forced_eos_token_id when both are given
    both = beam_search(no_eos_model, inputs, fairseq_max_len_eos=True, forced_eos_token_id=EOS)
    assert torch.equal(both.sequences, sequences) and torch.equal(both.sequences_scores, out.sequences_scores)


def test_option_off_is_plain_generate(no_eos_model, inputs):
    plain = beam_search(no_eos_model, inputs)
    off = beam_search(no_eos_model, inputs, fairseq_max_len_eos=False)
    assert torch.equal(plain.sequences, off.sequences) and torch.equal(plain.sequences_scores, off.sequences_scores)
    assert not plain.sequences.eq(EOS).any()  # without the rule the beams just stop at the limit
    expected = step_logprobs(no_eos_model, inputs, plain.sequences).sum(-1) / MAX_NEW
    torch.testing.assert_close(plain.sequences_scores, expected, atol=1e-4, rtol=0)
    greedy_on = no_eos_model.generate(**inputs, max_new_tokens=MAX_NEW, fairseq_max_len_eos=True)
    greedy_off = no_eos_model.generate(**inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(greedy_on[:, :-1], greedy_off[:, :-1])  # only the last position changes
    assert greedy_on[:, -1].eq(EOS).all() and not greedy_off.eq(EOS).any()


def test_rule_does_nothing_when_beams_stop_early(inputs):
    model = tiny_model(seed=3)
    shift_eos(model, 30.0)
    kwargs = dict(min_new_tokens=2, max_new_tokens=8, early_stopping=True)
    on, off = (beam_search(model, inputs, fairseq_max_len_eos=flag, **kwargs) for flag in (True, False))
    assert on.sequences.shape[1] < 1 + 8  # every beam stopped before the limit
    assert torch.equal(on.sequences, off.sequences) and torch.equal(on.sequences_scores, off.sequences_scores)


def test_bad_option_values_are_named(no_eos_model, inputs):
    with pytest.raises(TypeError, match="fairseq_max_len_eos must be True or False"):
        check_generation_settings({"fairseq_max_len_eos": "yes"})
    with pytest.raises(TypeError, match="fairseq_max_len_eos must be True or False"):
        no_eos_model.generate(**inputs, max_new_tokens=2, fairseq_max_len_eos=1)


def test_converted_checkpoint_decodes_with_the_rule(no_eos_model, tmp_path, monkeypatch):
    """The converters' save step turns the rule on in generation_config.json; from_pretrained and the
    pipeline then apply it without being asked, and a call can still turn it off."""
    converted = {k: v for k, v in no_eos_model.state_dict().items() if k not in TIED_TARGETS}
    save_converted(no_eos_model.config, converted, DEFAULT_VOCAB_DIR / "vocab.json", DEFAULT_VOCAB_DIR / "merges.txt",
                   tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["fairseq_max_len_eos"] is True
    assert GenerationConfig.from_pretrained(tmp_path).fairseq_max_len_eos is True
    pipe = pipeline("ofa-ufo", model=str(tmp_path))
    assert pipe.model.generation_config.fairseq_max_len_eos is True
    calls = []
    generate = pipe.model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(pipe.model, "generate", spy)
    image = (np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)
    result = pipe(image, task="caption", max_new_tokens=4)
    kwargs, out = calls[-1]
    best = out.sequences[:1]
    assert best.shape[1] == 1 + 4 and best[0, -1] == EOS and not best[0, :-1].eq(EOS).any()
    model_inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    total = step_logprobs(pipe.model, model_inputs, best).sum().item()  # the 3 tokens and the forced EOS
    assert total < -25 and math.isclose(result["score"], math.exp(total), rel_tol=1e-3)
    pipe(image, task="caption", max_new_tokens=4, fairseq_max_len_eos=False)
    assert not calls[-1][1].sequences.eq(EOS).any()
