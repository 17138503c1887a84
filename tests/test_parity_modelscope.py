"""Numerical parity with ModelScope's OFA (the HF port's layout) on random weights.

Run with the oracle environment (bash run_scripts/install_oracles.sh):

    .venv-oracle/bin/python -m pytest -m oracle tests/test_parity_modelscope.py -s

For the real Tiny and Base shapes, a seeded ModelScope `OFAModel` gets every parameter and BN
statistic perturbed (so LayerNorms, head scales, relative-bias tables and BN stats are not at
their trivial init values), is converted with `ofa_ufo.converters.hf_port`, loaded strictly into
ours, and both run in eval mode (dropout inactive) on the same inputs.

Generation compares ModelScope's own fairseq-style `SequenceGenerator` (what `OfaForAllTasks`
decodes with) against our `model.generate`; ModelScope's HF-`generate` path targets the
transformers 4 API and is not used. Settings are matched as follows:

=====================  =======================================  ===========================================
setting                ModelScope SequenceGenerator             ours (HF generate)
=====================  =======================================  ===========================================
beams                  beam_size=1 / 5                          num_beams=1 / 5 (no sampling)
length                 max_len_a=0, max_len_b=N: at step N all  max_new_tokens=N+1 and the library option
                       tokens but EOS get -inf; EOS keeps its   fairseq_max_len_eos=True (ofa_ufo.generation.
                       log-prob (it counts in the score)        fairseq_rules): the same masking at the last
                                                                position. (HF's forced_eos_token_id would set
                                                                EOS's log-prob to 0 and rank beams differently)
min length             min_len=0                                min_new_tokens=0
score normalisation    score / len (len_penalty=1, len incl.    length_penalty=1.0 (same length count)
                       EOS)
stopping               a sentence stops once beam_size          early_stopping=True
                       hypotheses have finished
pad                    never selected (-inf)                    suppress_tokens=[pad]
repeats                no_repeat_ngram_size=3                   no_repeat_ngram_size=3
=====================  =======================================  ===========================================

The <s> row of each hypothesis is dropped from ours; fairseq's best hypothesis (finalized[i][0])
is compared token for token, EOS included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.oracle
pytest.importorskip("modelscope")
pytest.importorskip("fairseq")

import ofa_ufo  # noqa: E402
import oracle_shims  # noqa: E402  (tests/ is on sys.path under pytest's default rootdir import mode)
from ofa_ufo.converters.hf_port import (  # noqa: E402
    config_from_hf_port,
    convert_hf_port_state_dict,
    load_converted_state_dict,
)

OFA_VOCAB = 59457
PAD, EOS = 1, 2
TOL = 1e-4
MAX_LEN = 12  # N: at most N tokens before the (forced) EOS
NUM_INPUTS = 10
# Added to the EOS logit so that some random-weight generations stop before MAX_LEN (see _boost_eos).
EOS_BOOST = {"tiny": 2.5, "base": 2.5}

# The released shapes (reference/ofa.md 2.1) in the port's config names; the rest are OFAConfig defaults
# (pre-LN, NormFormer, type embedding, tied output, buckets 256/42, attn_scale_factor 2).
SHAPES = {
    "tiny": dict(d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, resnet_type="resnet50"),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, resnet_type="resnet101"),
}
IMAGE_SIZE = {"tiny": 256, "base": 384}
PROMPTS = [
    " what does the image describe?",
    " what is in the image?",
    " which region does the text \" a cat on the left \" describe?",
    " what color is the largest object?",
    " how many people are there?",
    " does the image describe \" two dogs playing in the snow \"?",
    " what is the man holding in his right hand?",
    " where is this?",
    " what does the region describe? region:",
    " is there a red car?",
]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every float parameter/buffer off its init value (seeded), keeping ties and pad row."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied tables are listed once
            noise = torch.randn(param.shape, generator=gen)
            scale = 0.5 if "rel_pos_table" in name else 0.05
            param.add_(noise * scale)
            if name.endswith("embed_tokens.weight"):
                param[PAD] = 0.0
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))


def _boost_eos(model: torch.nn.Module, amount: float) -> None:
    """Raise the EOS logit by about `amount` at every decoder position, so that random-weight
    generations also end early (and the finished-hypothesis bookkeeping of both searches is compared).

    The decoder's final LayerNorm bias b is added to every output state; moving the EOS row of the
    (tied) table by amount * b / |b|^2 adds `amount` to its logit through that term."""
    with torch.no_grad():
        bias = model.decoder.layer_norm.bias
        model.encoder.embed_tokens.weight[EOS] += amount * bias / bias.dot(bias)


def _images(size: int, count: int) -> torch.Tensor:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
    images = []
    for k in range(count):
        array = getattr(data, names[k % len(names)])()
        if array.ndim == 2:
            array = np.stack([array] * 3, -1)
        if k >= len(names):  # different pixels for the repeated photos
            array = np.ascontiguousarray(array[::-1])
        images.append(array)
    return ofa_ufo.OFAUFOImageProcessor(size=size)(images, return_tensors="pt")["pixel_values"]


def _prompts(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids (<s> ... </s>) of different lengths and their attention mask."""
    tokenizer = ofa_ufo.build_tokenizer()
    rows = [tokenizer(PROMPTS[k % len(PROMPTS)])["input_ids"] for k in range(count)]
    length = max(map(len, rows))
    ids = torch.full((count, length), PAD, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row)
    assert ids.eq(PAD).any(), "the batch must mix prompt lengths"
    assert ids.max() < OFA_VOCAB
    return ids, ids.ne(PAD).long()


class _Vocab:
    """What ModelScope's SequenceGenerator reads from a tokenizer: special ids and the vocabulary size."""

    pad_token_id, unk_token_id, bos_token_id, eos_token_id = PAD, 3, 0, EOS

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(OFA_VOCAB)}

    def get_added_vocab(self) -> dict[str, int]:
        return {}


@pytest.fixture(scope="module", params=["tiny", "base"])
def pair(request):
    """(size name, ModelScope OFAModel, our converted model), both eval and same weights."""
    OFAConfig, OFAModel = oracle_shims.modelscope_ofa()
    name = request.param
    torch.manual_seed(0)
    ms_config = OFAConfig(vocab_size=OFA_VOCAB, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          **SHAPES[name])
    reference = OFAModel(ms_config).eval()
    _perturb(reference, seed=1)
    _boost_eos(reference, EOS_BOOST[name])
    config_dict = ms_config.to_dict()
    ours_config = config_from_hf_port(config_dict, image_size=IMAGE_SIZE[name])
    converted = convert_hf_port_state_dict(reference.state_dict(), ours_config)
    ours = ofa_ufo.OFAUFOForConditionalGeneration(ours_config).eval()
    load_converted_state_dict(ours, converted)
    return name, reference, ours


def _report(name: str, what: str, value: float) -> None:
    print(f"[parity {name}] {what}: {value:.3g}")


@torch.no_grad()
def test_encoder_and_logits_match(pair):
    name, reference, ours = pair
    batch = 3
    pixels = _images(IMAGE_SIZE[name], batch)
    ids, mask = _prompts(batch)
    image_mask = torch.ones(batch, dtype=torch.bool)
    grid = (IMAGE_SIZE[name] // 16) ** 2

    ref_enc = reference.encoder(input_ids=ids, patch_images=pixels, patch_masks=image_mask)
    our_enc = ours.get_encoder()(ids, mask, pixels, image_mask)
    assert ref_enc.last_hidden_state.shape == our_enc.last_hidden_state.shape == (batch, grid + ids.shape[1], ours.config.d_model)
    # Both put the image tokens first: the padding masks line up position by position.
    assert torch.equal(ref_enc.padding_mask, our_enc.padding_mask)
    assert not our_enc.padding_mask[:, :grid].any() and our_enc.padding_mask[:, grid:].eq(ids.eq(PAD)).all()
    valid = ~our_enc.padding_mask
    enc_diff = (ref_enc.last_hidden_state - our_enc.last_hidden_state).abs()
    _report(name, "encoder max |diff| (non-pad positions)", enc_diff[valid].max().item())
    _report(name, "encoder max |diff| (all positions)", enc_diff.max().item())
    assert enc_diff[valid].max() < TOL
    pos_diff = (ref_enc.position_embedding - our_enc.position_embeddings).abs().max()
    assert pos_diff < TOL

    gen = torch.Generator().manual_seed(5)
    decoder_ids = torch.randint(4, 50000, (batch, 9), generator=gen)
    decoder_ids[:, 0] = 0
    ref_logits = reference(input_ids=ids, patch_images=pixels, patch_masks=image_mask,
                           decoder_input_ids=decoder_ids).logits
    our_logits = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                      decoder_input_ids=decoder_ids, use_cache=False).logits
    logit_diff = (ref_logits - our_logits).abs().max().item()
    _report(name, "decoder logits max |diff|", logit_diff)
    _report(name, "logit scale (max |logit|)", ref_logits.abs().max().item())
    assert logit_diff < TOL

    # Incremental decoding with our cache reproduces the full forward's logits.
    out = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
               decoder_input_ids=decoder_ids[:, :5], use_cache=True)
    step = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                decoder_input_ids=decoder_ids[:, 5:6], cache=out.cache, use_cache=True).logits
    step_diff = (step[:, -1] - ref_logits[:, 5]).abs().max().item()
    _report(name, "cached step logits max |diff|", step_diff)
    assert step_diff < TOL



@torch.no_grad()
def test_code_target_logits_match(pair):
    """Rows whose target is a VQGAN code grid (the port's `code_masks`: image positions, 2-D relative
    bias, code LayerNorm) match ours with `code_grid` = the port's window (code_image_size / 8), in a
    batch mixing code and text rows, in one pass and step by step with our cache."""
    name, reference, ours = pair
    batch = 3
    pixels, (ids, mask) = _images(IMAGE_SIZE[name], batch), _prompts(batch)
    image_mask = torch.ones(batch, dtype=torch.bool)
    side = reference.config.code_image_size // 8
    decoder_ids = torch.randint(50265, 58457, (batch, 11), generator=torch.Generator().manual_seed(7))
    decoder_ids[:, 0] = 0
    code_masks = torch.tensor([True, False, True])
    ref_logits = reference(input_ids=ids, patch_images=pixels, patch_masks=image_mask, decoder_input_ids=decoder_ids,
                           code_masks=code_masks).logits
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask)
    grid = torch.where(code_masks, side, 0)
    our_logits = ours(**inputs, decoder_input_ids=decoder_ids, code_grid=grid, use_cache=False).logits
    diff = (ref_logits - our_logits).abs().max().item()
    _report(name, "code-target logits max |diff|", diff)
    assert diff < TOL
    cache, steps = None, []
    for t in range(decoder_ids.shape[1]):
        out = ours(**inputs, decoder_input_ids=decoder_ids[:, t : t + 1], cache=cache, use_cache=True, code_grid=grid)
        cache = out.cache
        steps.append(out.logits)
    step_diff = (torch.cat(steps, 1) - ref_logits).abs().max().item()
    _report(name, "code-target cached steps max |diff|", step_diff)
    assert step_diff < TOL

def _fairseq_generate(reference, ids, pixels, image_mask, beams: int) -> list[list[int]]:
    SequenceGenerator = oracle_shims.modelscope_sequence_generator()
    generator = SequenceGenerator(
        tokenizer=_Vocab(), beam_size=beams, max_len_a=0, max_len_b=MAX_LEN, min_len=0,
        len_penalty=1.0, no_repeat_ngram_size=3,
    )
    sample = {"net_input": {"input_ids": ids, "patch_images": pixels, "patch_masks": image_mask}}
    finalized = generator.generate([reference], sample)
    return [hypos[0]["tokens"].tolist() for hypos in finalized]


def _our_generate(ours, ids, mask, pixels, image_mask, beams: int) -> list[list[int]]:
    out = ours.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
        num_beams=beams, do_sample=False, max_new_tokens=MAX_LEN + 1, min_new_tokens=0,
        fairseq_max_len_eos=True, length_penalty=1.0, early_stopping=True, no_repeat_ngram_size=3,
        suppress_tokens=[PAD], num_return_sequences=1,
    )
    results = []
    for row in out.tolist():
        assert row[0] == 0  # decoding starts from <s>
        row = row[1:]
        if EOS in row:
            row = row[: row.index(EOS) + 1]
        results.append(row)
    return results


@pytest.mark.parametrize("beams", [1, 5])
@torch.no_grad()
def test_generation_matches(pair, beams):
    name, reference, ours = pair
    pixels = _images(IMAGE_SIZE[name], NUM_INPUTS)
    ids, mask = _prompts(NUM_INPUTS)
    image_mask = torch.ones(NUM_INPUTS, dtype=torch.bool)
    expected = _fairseq_generate(reference, ids, pixels, image_mask, beams)
    got = _our_generate(ours, ids, mask, pixels, image_mask, beams)
    agree = sum(e == g for e, g in zip(expected, got))
    early = sum(len(e) <= MAX_LEN for e in expected)
    print(f"[parity {name}] beams={beams}: {agree}/{NUM_INPUTS} identical ({early} stopped before the length limit)")
    for k, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            print(f"  input {k}: modelscope {e}\n  input {k}: ofa_ufo    {g}")
    assert agree == NUM_INPUTS
