"""Model behaviour on tiny random weights: shapes, loss, caching, batching, checkpoints, key layout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import ofa_ufo
from ofa_ufo.generation import TokenRangeLogitsProcessor, Trie, TrieLogitsProcessor
from ofa_ufo.layers.inference_cache import cache_of

from conftest import tiny_model

PROMPTS = [" what does the image describe?", " what color is the large square on the left side?", " is it?"]


def encode(processor, prompts, images=None):
    batch = processor(images=images, text=prompts, return_tensors="pt")
    keys = ["input_ids", "attention_mask"] + (["pixel_values", "image_mask"] if images is not None else [])
    return {k: batch[k] for k in keys}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [(torch.rand(64 + 16 * i, 48 + 8 * i, 3) * 255).to(torch.uint8).numpy() for i in range(3)]


def test_forward_shapes_and_loss(model, processor, images):
    inputs = encode(processor, PROMPTS, images)
    labels = processor(text=PROMPTS, text_target=[" a", " b c", " d e f"], return_tensors="pt")["labels"]
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, labels.shape[1], model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    smoothed = model(**inputs, labels=labels, label_smoothing=0.1).loss
    assert not torch.isclose(smoothed, out.loss)
    out.loss.backward()
    assert model.model.shared.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_logits_mask_gives_the_same_logits_loss_and_gradient(model, processor, images):
    inputs = encode(processor, PROMPTS, images)
    labels = processor(text=PROMPTS, text_target=[" a", " b c", " d e f"], return_tensors="pt")["labels"]
    mask = labels != -100
    assert not mask.all()  # the short targets leave padding behind them
    full = model(**inputs, labels=labels, label_smoothing=0.1)
    full.loss.backward()
    full_grad = model.model.shared.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    masked = model(**inputs, labels=labels, label_smoothing=0.1, logits_mask=mask)
    masked.loss.backward()
    assert masked.logits.shape == (int(mask.sum()), model.config.vocab_size)
    torch.testing.assert_close(masked.logits, full.logits[mask])
    torch.testing.assert_close(masked.loss, full.loss)
    torch.testing.assert_close(model.model.shared.weight.grad, full_grad)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="logits_mask must have the decoder's"):
        model(**inputs, labels=labels, logits_mask=mask[:, :-1])


def test_tied_embeddings(model):
    assert model.lm_head.weight is model.model.shared.weight
    assert model.model.encoder.embed_tokens is model.model.shared
    assert model.model.decoder.embed_tokens is model.model.shared


@pytest.mark.parametrize("in_place", [False, True])
def test_training_gradient_of_tied_embedding_is_dense_and_exact(processor, images, in_place):
    """Training lookups send their row gradients into the output projection's dense one (sparse
    rows through autograd by default, in place with `tied_gradients_in_place`); the result must
    equal plain dense accumulation, also over two accumulated backwards, stay dense for the
    optimizers, and also be dense when a loss never touches the logits."""
    model = tiny_model().train()
    model.tied_gradients_in_place = in_place
    inputs = encode(processor, PROMPTS, images)
    labels = processor(text=PROMPTS, text_target=[" a", " b c", " d e f"], return_tensors="pt")["labels"]
    assert (inputs["input_ids"] == model.config.pad_token_id).any()  # the padding row gets no gradient
    model(**inputs, labels=labels).loss.backward()
    fast = model.model.shared.weight.grad.clone()
    model(**inputs, labels=labels).loss.backward()  # accumulates (micro-batches)
    twice = model.model.shared.weight.grad.clone()
    assert not model.model.shared.weight.grad.is_sparse and not model.model.shared.sparse
    assert "forward" not in vars(model.model.shared)  # the in-place lookup is undone after the forward
    model.zero_grad(set_to_none=True)
    reference = tiny_model().train()  # the inner model's forward: plain dense lookups
    config = reference.config
    decoder_input_ids = ofa_ufo.hf.modeling.shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    out = reference.model(**inputs, decoder_input_ids=decoder_input_ids)
    logits = torch.nn.functional.linear(out.last_hidden_state, reference.lm_head.weight)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      label_smoothing=reference.config.label_smoothing).backward()
    torch.testing.assert_close(fast, reference.model.shared.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(twice, 2 * reference.model.shared.weight.grad, rtol=0, atol=2e-6)
    model(**inputs, labels=labels).decoder_last_hidden_state.sum().backward()  # the logits unused
    assert model.model.shared.weight.grad is not None and not model.model.shared.weight.grad.is_sparse
    assert model.model.shared.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.model.shared.weight.requires_grad_(False)  # frozen embeddings (freeze_embeddings): no gradient at all
    model(**inputs, labels=labels).loss.backward()
    assert model.model.shared.weight.grad is None and model.model.encoder.layers[0].fc1.weight.grad is not None


def test_resnet_blocks_start_as_the_identity():
    """From-scratch init zeroes the scale of each bottleneck's last BN (the block starts as its shortcut);
    every other BN starts at scale 1."""
    from ofa_ufo.models.resnet import Bottleneck

    stem = tiny_model().model.encoder.embed_images
    blocks = [m for m in stem.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(float(b.bn3.weight.detach().abs().max()) == 0.0 for b in blocks)
    others = [m for m in stem.modules() if isinstance(m, torch.nn.BatchNorm2d) and not getattr(m, "zero_init", False)]
    assert others and all(bool((m.weight == 1).all()) for m in others)


def _stem_with_running_statistics(seed: int = 0):
    """The tiny stem in eval mode with BatchNorm statistics and affine weights far from their init."""
    stem = tiny_model(seed=seed).model.encoder.embed_images
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in stem.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for tensor, low, high in ((bn.weight, 0.5, 1.5), (bn.bias, -0.5, 0.5), (bn.running_mean, -0.5, 0.5),
                                      (bn.running_var, 0.5, 2.0)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return stem.eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_inference_stem_folds_batchnorm_into_its_convolutions(dtype, tolerance, monkeypatch):
    """Without gradients in eval mode each conv and its BatchNorm run as one conv (ReLU and residual add fused):
    the same features as conv -> BN -> ReLU (run here with gradients), and BatchNorm statistics that a train-mode
    forward updated in place (no version bump) are seen by the next forward."""
    from ofa_ufo.models import resnet

    stem = _stem_with_running_statistics().to(dtype)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = stem(pixels).detach()  # gradients on: the module-by-module path
    calls, original = [], resnet.folded_conv
    monkeypatch.setattr(resnet, "folded_conv", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        folded = stem(pixels)
        assert len(calls) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())  # every conv folded
        scale = expected.float().abs().max()
        assert (folded.float() - expected.float()).abs().max() <= tolerance * scale
        stem.train()(pixels * 3)  # BatchNorm updates its running statistics in place, no version bump
        changed = stem.eval()(pixels)
    assert (changed.float() - stem(pixels).detach().float()).abs().max() <= tolerance * scale
    assert (changed.float() - folded.float()).abs().max() > tolerance * scale
    bn = stem.layer1[0].bn1
    bn.train()  # one BatchNorm on batch statistics (momentum 0 keeps its running ones): it must not be folded
    bn.momentum = 0.0
    with torch.no_grad():
        batch_stats = stem(pixels)
    assert (batch_stats.float() - stem(pixels).detach().float()).abs().max() <= tolerance * scale
    assert (batch_stats.float() - changed.float()).abs().max() > tolerance * scale


def test_inference_stem_keeps_its_folds_until_the_weights_change(monkeypatch):
    """The folded weights are computed once and reused by the next forwards without gradients; what changes the
    weights or statistics in place without a version bump (a training step with fused AdamW, a BatchNorm on batch
    statistics) is followed by a fold of the new values, and load_state_dict (a version bump) is seen."""
    from ofa_ufo.models import resnet

    stem = _stem_with_running_statistics()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    convs = sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
    folds, original = [], resnet.fold_bn
    monkeypatch.setattr(resnet, "fold_bn", lambda *a, **k: folds.append(1) or original(*a, **k))

    def matches_modules(folded: torch.Tensor) -> bool:
        expected = stem(pixels).detach()  # gradients on: module by module, nothing folded
        return bool((folded - expected).abs().max() <= 1e-5 * expected.abs().max())

    with torch.no_grad():
        first = stem(pixels)
        assert len(folds) == convs
        assert torch.equal(stem(pixels), first) and len(folds) == convs  # reused, not recomputed
        larger = torch.randn(3, 3, 96, 80, generator=torch.Generator().manual_seed(2))
        other_shape = stem(larger)  # the kept (on a CPU, blocked) weights serve another batch and image size
    expected = stem(larger).detach()
    assert len(folds) == convs and (other_shape - expected).abs().max() <= 1e-5 * expected.abs().max()
    optimizer = torch.optim.AdamW(stem.parameters(), lr=1e-2, fused=True)
    stem.train()
    stem(pixels).square().mean().backward()  # batch statistics and gradients: running stats move in place
    optimizer.step()  # fused AdamW: weights move in place without a version bump
    stem.eval()
    with torch.no_grad():
        stepped = stem(pixels)
    assert matches_modules(stepped) and (stepped - first).abs().max() > 1e-3 * first.abs().max()
    with torch.no_grad():
        stem(pixels)  # the folds are kept again (the check above ran with gradients)
    bn = stem.layer2[0].bn2
    bn.train()  # one BatchNorm on batch statistics, without gradients: only its running statistics change
    bn.momentum = 0.5
    with torch.no_grad():
        stem(pixels * 3)
    bn.eval()
    with torch.no_grad():
        recalibrated = stem(pixels)
    assert matches_modules(recalibrated) and (recalibrated - stepped).abs().max() > 1e-3 * stepped.abs().max()
    other = _stem_with_running_statistics(seed=3)
    stem.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded, expected = stem(pixels), other(pixels)
    assert (loaded - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_frozen_stem_keeps_no_graph_in_training(monkeypatch):
    """A frozen stem (weights without gradients, BatchNorm on running statistics, as `freeze` leaves it) in a
    training forward under bf16 autocast runs its folded inference path in bf16, folding once for all steps: the
    same features as autocast's conv -> BN -> ReLU, nothing recorded for backward. Unfrozen, or with a BatchNorm
    on batch statistics, it runs module by module."""
    from ofa_ufo.models import resnet

    stem = _stem_with_running_statistics().train()
    for bn in (m for m in stem.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folds, original = [], resnet.fold_bn
    monkeypatch.setattr(resnet, "fold_bn", lambda *a, **k: folds.append(1) or original(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stem(pixels)  # weights still train: autocast's module-by-module path
        assert expected.requires_grad and expected.dtype == torch.bfloat16 and not folds
        stem.requires_grad_(False)
        frozen = stem(pixels)
        convs = sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
        assert len(folds) == convs  # every conv folded
        assert torch.equal(stem(pixels), frozen) and len(folds) == convs  # the next step reuses the folds
    assert frozen.dtype == torch.bfloat16 and not frozen.requires_grad and frozen.grad_fn is None
    scale = expected.float().abs().max()
    assert (frozen.float() - expected.detach().float()).abs().max() <= 3e-2 * scale
    folds.clear()
    stem.layer1[0].bn1.train()  # batch statistics: the forward updates state, so it must run as modules
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stem(pixels)
    assert not folds


@pytest.mark.parametrize("resnet_type, blocks", [("resnet14", (1, 1, 1)), ("resnet26", (2, 2, 2))])
def test_small_student_stems(resnet_type, blocks):
    """The students' stems keep OFA's stages 1-3 (output stride 16, 1024 channels) with fewer blocks."""
    from ofa_ufo.models.resnet import Bottleneck

    stem = tiny_model(vision_config={"resnet_type": resnet_type}).model.encoder.embed_images
    stages = [stem.layer1, stem.layer2, stem.layer3]
    assert tuple(sum(isinstance(m, Bottleneck) for m in stage.modules()) for stage in stages) == blocks
    with torch.no_grad():
        features = stem(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, 1024, 4, 4)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_cached_generation_equals_uncached(model, processor, images, num_beams):
    inputs = encode(processor, PROMPTS, images)
    kwargs = dict(max_new_tokens=12, num_beams=num_beams, do_sample=False)
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one(model, processor, images, num_beams):
    kwargs = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    batched = model.generate(**encode(processor, PROMPTS, images), **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate(**encode(processor, [prompt], [images[i]]), **kwargs)[0]
        row = batched[i][: alone.shape[0]]
        assert torch.equal(row, alone), (i, row, alone)
        assert (batched[i][alone.shape[0] :] == model.config.pad_token_id).all()


def test_sample_without_image_matches_text_only(model, processor, images):
    text_only = encode(processor, PROMPTS[:1])
    masked = encode(processor, PROMPTS[:1], images[:1])
    masked["image_mask"] = torch.zeros(1, dtype=torch.bool)
    a = model.generate(**text_only, max_new_tokens=8)
    b = model.generate(**masked, max_new_tokens=8)
    assert torch.equal(a, b)
    enc_a = model.get_encoder()(**text_only).last_hidden_state
    enc_b = model.get_encoder()(**masked).last_hidden_state
    torch.testing.assert_close(enc_b[:, -enc_a.shape[1] :], enc_a, atol=1e-5, rtol=1e-5)


def test_generation_modes(model, processor, images):
    inputs = encode(processor, PROMPTS[:2], images[:2])
    out = model.generate(
        **inputs, num_beams=3, num_return_sequences=2, max_new_tokens=6, output_scores=True, return_dict_in_generate=True
    )
    assert out.sequences.shape[0] == 4 and out.sequences_scores.shape == (4,)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=6)
    assert sampled.shape[0] == 2 and (sampled[:, 0] == model.config.decoder_start_token_id).all()


def test_bin_range_constraint(model, processor, images):
    cfg = model.config
    bins = TokenRangeLogitsProcessor(cfg.bin_offset, cfg.bin_offset + cfg.num_bins)
    out = model.generate(**encode(processor, PROMPTS, images), logits_processor=[bins], min_new_tokens=4, max_new_tokens=4, num_beams=2)
    new = out[:, 1:]
    assert new.shape[1] == 4
    assert ((new >= cfg.bin_offset) & (new < cfg.bin_offset + cfg.num_bins)).all()


def test_trie_constraint(model, processor, images):
    answers = [" red", " blue square", " dark green circle"]
    trie = Trie.from_strings(processor.tokenizer, answers)
    processor_fn = TrieLogitsProcessor(trie, processor.tokenizer.eos_token_id)
    out = model.generate(**encode(processor, PROMPTS, images), logits_processor=[processor_fn], max_new_tokens=10, num_beams=3)
    texts = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert all(text in answers for text in texts), texts


def test_trie_next_tokens():
    trie = Trie([[5, 6, 2], [5, 7, 2], [8, 2]])
    assert sorted(trie.next_tokens([])) == [5, 8]
    assert sorted(trie.next_tokens([5])) == [6, 7]
    assert trie.next_tokens([9]) == [] and trie.next_tokens([5, 6, 2]) == []


def test_save_and_reload_bit_for_bit(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "generation_config.json" in files
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is ofa_ufo.OFAUFOForConditionalGeneration
    inputs = encode(processor, PROMPTS, images)
    labels = processor(text=PROMPTS, text_target=[" a b"] * 3, return_tensors="pt")["labels"]
    assert torch.equal(model(**inputs, labels=labels).logits, reloaded(**inputs, labels=labels).logits)
    assert torch.equal(model.generate(**inputs, num_beams=2, max_new_tokens=6), reloaded.generate(**inputs, num_beams=2, max_new_tokens=6))


def test_state_dict_follows_ofa_port_layout(model):
    keys = set(model.state_dict())
    expected = [
        "model.encoder.embed_images.conv1.weight",
        "model.encoder.embed_images.layer1.0.downsample.0.weight",
        "model.encoder.embed_images.layer3.0.bn3.running_var",
        "model.encoder.image_proj.weight",
        "model.encoder.patch_layernorm_embedding.weight",
        "model.encoder.type_embedding.weight",
        "model.encoder.embed_positions.weight",
        "model.encoder.embed_image_positions.weight",
        "model.encoder.pos_q_linear.weight",
        "model.encoder.layers.0.self_attn.c_attn",
        "model.encoder.layers.0.self_attn_mid_layer_norm.weight",
        "model.encoder.layers.0.ffn_layer_norm.weight",
        "model.encoder.token_rel_pos_table_list.1.weight",
        "model.encoder.image_rel_pos_table_list.1.weight",
        "model.decoder.self_pos_q_linear.weight",
        "model.decoder.cross_pos_k_linear.bias",
        "model.decoder.layers.1.cross_attn.k_proj.weight",
        "model.decoder.layers.1.cross_attn_mid_layer_norm.weight",
        "model.decoder.code_layernorm_embedding.weight",
    ]
    assert not [k for k in expected if k not in keys]
    assert not [k for k in keys if "rp_bucket" in k or "position_idx" in k], "index tables must not be persisted"
    cfg = model.config
    tables = model.model.encoder.image_rel_pos_table_list[0].weight.shape
    assert tables == ((2 * cfg.image_bucket_size - 1) ** 2 + 3, cfg.encoder_attention_heads)


@pytest.mark.parametrize(
    "name, reference_millions",
    [("ofa_ufo_tiny", 33.5), ("ofa_ufo_medium", 92.9), ("ofa_ufo_base", 182.2), ("ofa_ufo_large", 473.0), ("ofa_ufo_huge", 929.5)],
)
def test_preset_sizes_match_ofa(name, reference_millions):
    """With OFA's 59,457-token vocabulary the presets have OFA's instantiated parameter counts."""
    ofa_vocab = dict(vocab_size=59457, code_offset=50265, bin_offset=58457)
    with torch.device("meta"):
        model = ofa_ufo.create_model(name, **ofa_vocab)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - reference_millions) < 0.15, count


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown model 'ofa_ufo_giant'.*ofa_ufo_tiny"):
        ofa_ufo.create_model("ofa_ufo_giant")
    with pytest.raises(ValueError, match="unknown field"):
        ofa_ufo.OFAUFOConfig(hidden_dim=3)
    with pytest.raises(ValueError, match="not divisible"):
        ofa_ufo.OFAUFOConfig(d_model=30, encoder_attention_heads=4)
    with pytest.raises(ValueError, match="grid"):
        ofa_ufo.OFAUFOConfig(image_size=800)
    with pytest.raises(ValueError, match="resnet_type"):
        ofa_ufo.OFAUFOConfig(vision_config={"resnet_type": "resnet34"})
    with pytest.raises(ValueError, match=r"supernet_elastic_heads=\[9\]: every value must lie in \[1, 4\]"):
        ofa_ufo.OFAUFOConfig(vision_config={"supernet_layers": 2, "supernet_heads": 4, "supernet_elastic_heads": [9]})


def test_too_long_sequence_is_rejected_by_model():
    model = tiny_model(max_position_embeddings=16)
    ids = torch.full((1, 20), 5)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(input_ids=ids, decoder_input_ids=ids[:, :2])


def test_generate_uses_beam_shared_cross_cache(model, processor, images):
    seen = []
    original = ofa_ufo.layers.kv_cache.OFAUFOCache.reorder_cache

    def spy(self, beam_idx):
        seen.append(type(self))
        return original(self, beam_idx)

    ofa_ufo.layers.kv_cache.OFAUFOCache.reorder_cache = spy
    try:
        model.generate(**encode(processor, PROMPTS, images), num_beams=3, max_new_tokens=4)
    finally:
        ofa_ufo.layers.kv_cache.OFAUFOCache.reorder_cache = original
    assert seen and all(t is ofa_ufo.layers.kv_cache.OFAUFOCache for t in seen)


def test_cross_attention_shares_source_rows_across_beams():
    """k query rows per source row give the same result as copying the source k times."""
    from ofa_ufo.layers.attention import OFAAttention

    torch.manual_seed(0)
    attn = OFAAttention(32, 4).eval()
    queries, memory = torch.randn(6, 3, 32), torch.randn(2, 7, 32)  # 2 inputs x 3 beams
    bias = torch.randn(2, 4, 3, 7)
    shared = attn(queries, bias, key_value_states=memory)
    copied = attn(queries, bias.repeat_interleave(3, 0), key_value_states=memory.repeat_interleave(3, 0))
    torch.testing.assert_close(shared, copied, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot share"):
        attn(torch.randn(5, 3, 32), None, key_value_states=memory)


def test_generate_keeps_one_encoder_row_per_input(model, processor, images):
    rows = []
    decoder = model.get_decoder()
    hook = decoder.register_forward_hook(lambda mod, args, out: rows.append(args[1].last_hidden_state.shape[0]))
    try:
        model.generate(**encode(processor, PROMPTS, images), num_beams=4, max_new_tokens=3)
    finally:
        hook.remove()
    assert rows and set(rows) == {len(PROMPTS)}


ROUTED = dict(supernet_layers=1, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0)


@pytest.fixture(scope="module")
def routed_supernet():
    return tiny_model(vision_config=ROUTED)


def _processor_inputs(processor, images, kind: str) -> dict:
    """The processor's output, untouched, for prompts with images, a mix of None and images, or prompts only."""
    chosen = {"images": images, "mixed": [None, images[1], None], "prompts only": None}[kind]
    return processor(images=chosen, text=PROMPTS, return_tensors="pt")


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["images", "mixed", "prompts only"])
def test_generate_takes_the_processor_output_as_is(model, processor, images, kind, num_beams):
    inputs = _processor_inputs(processor, images, kind)
    out = model.generate(**inputs, num_beams=num_beams, max_new_tokens=5)
    assert out.shape[0] == len(PROMPTS) and (out[:, 0] == model.config.decoder_start_token_id).all()
    by_hand = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    assert torch.equal(out, model.generate(**by_hand, num_beams=num_beams, max_new_tokens=5))


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["images", "mixed", "prompts only"])
def test_routed_supernet_generates_from_the_processor_output_with_task_ids(routed_supernet, processor, images, kind,
                                                                           num_beams):
    inputs = _processor_inputs(processor, images, kind)
    vision = routed_supernet.config.vision_config
    task_ids = torch.tensor([vision.route_id(task) for task in ("caption", "vqa", "grounding")])
    out = routed_supernet.generate(**inputs, task_ids=task_ids, num_beams=num_beams, max_new_tokens=5)
    assert out.shape[0] == len(PROMPTS)
    alone = routed_supernet.generate(**{k: v[1:2] for k, v in inputs.items()}, task_ids=task_ids[1:2],
                                     num_beams=num_beams, max_new_tokens=5)[0]
    assert torch.equal(out[1, : alone.shape[0]], alone)  # task_ids stay with their rows through beam expansion


def test_routed_supernet_without_task_ids_says_to_pass_them(routed_supernet, processor, images):
    """No silent default route: a grounding prompt routed as a caption would answer plausibly but wrongly."""
    with pytest.raises(ValueError, match=r"task-routed supernet: pass task_ids \(vision_config.route_id"):
        routed_supernet.generate(**_processor_inputs(processor, images, "images"), max_new_tokens=3)


def test_inference_reuses_position_biases_until_the_weights_or_layout_change(processor, images):
    """Without gradients the encoder keeps its per-layer position biases for the next forward with the same
    layout; an in-place weight update, another prompt length or a forward with gradients must not read them."""
    encoder = tiny_model().get_encoder()
    short = processor(images=images[:1], text=["what is it?"], return_tensors="pt")
    longer = processor(images=images[:1], text=["what is the colour of the object on the left?"], return_tensors="pt")
    with torch.no_grad():
        first = encoder(**short).last_hidden_state
        biases = cache_of(encoder)["position_biases"][1]
        assert encoder(**short).last_hidden_state.equal(first)
        assert cache_of(encoder)["position_biases"][1] is biases  # reused, not rebuilt
        encoder(**longer)
        assert cache_of(encoder)["position_biases"][1] is not biases  # another layout: rebuilt
        encoder(**short)
    # a fused AdamW step updates the tables in place without bumping their version counters
    table = encoder.image_rel_pos_table_list[0].weight
    table.grad = torch.randn_like(table)
    torch.optim.AdamW([table], lr=0.5, fused=True).step()
    with torch.no_grad():
        moved = encoder(**short).last_hidden_state
    fresh = encoder(**short).last_hidden_state  # with gradients: built from the weights, never cached
    assert not moved.equal(first)
    torch.testing.assert_close(moved, fresh.detach(), rtol=0, atol=1e-5)  # the stem folds its BatchNorm here
