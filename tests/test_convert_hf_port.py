"""The HF-port / ModelScope converter on the official key layout and on synthetic port-layout state dicts
(no oracle needed).

tests/fixtures/ofa_base_hf_port_keys.json lists every key and shape of the port's OFA-Base `OFAModel`,
written by tests/fixtures/make_ofa_key_fixtures.py from the port's module definitions (not from our code).
Numerical parity with ModelScope itself is in test_parity_modelscope.py (oracle marker).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import ofa_ufo
from ofa_ufo.converters.hf_port import config_from_hf_port, convert_hf_port_state_dict, load_converted_state_dict
from ofa_ufo.hf.tokenization import DEFAULT_VOCAB_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))  # the official layouts' generator
import make_ofa_key_fixtures as official  # noqa: E402

PORT_CONFIG = dict(
    vocab_size=59457, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_type="resnet50",
    dropout=0.1, attn_scale_factor=2.0, token_bucket_size=256, image_bucket_size=42, normformer=True,
    encoder_normalize_before=True, decoder_normalize_before=True, add_type_embedding=True,
    architectures=["OFAModel"], model_type="ofa",
)


# The released Base shape in the port's config names (reference/ofa.md 12.2).
BASE_PORT_CONFIG = {**PORT_CONFIG, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
                    "encoder_attention_heads": 12, "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
                    "decoder_ffn_dim": 3072, "resnet_type": "resnet101"}
# Official keys the converters drop on purpose (reference/ofa.md 12.3): the index tables we rebuild
# (fairseq's image_position_idx even differs in length from the port's), and the two aliases of the
# shared token table, which must equal it and become ties of model.shared.weight.
DROPPED = {"encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket", "decoder.image_rp_bucket",
           "decoder.image_position_idx", "decoder.embed_tokens.weight", "decoder.output_projection.weight"}


def port_target(key: str) -> str | None:
    """Where the reference puts a port key in our model: under `model.`, the shared table as `model.shared`."""
    if key in DROPPED:
        return None
    return "model.shared.weight" if key == "encoder.embed_tokens.weight" else f"model.{key}"


def our_layout(config) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys and shapes for `config` (built on the meta device), leaving out the names
    that are ties of `model.shared.weight` (found by identity, as the model builds them)."""
    with torch.device("meta"):
        model = ofa_ufo.OFAUFOForConditionalGeneration(config)
    shared = model.model.shared.weight
    state = model.state_dict(keep_vars=True)
    return {key: tuple(value.shape) for key, value in state.items()
            if key == "model.shared.weight" or value is not shared}


def assert_converted_exactly(
    converted: dict[str, torch.Tensor], source: dict[str, torch.Tensor], config, target_of
) -> None:
    """`converted` has exactly our model's keys and shapes, and each tensor is the one of the official key
    that `target_of` (the reference's mapping) sends there; only keys mapped to None are absent.

    `source` comes from `official.constant_state_dict`: one distinct value per key, read back at [0, ..., 0]."""
    first = lambda tensor: tensor[(0,) * tensor.dim()].item()  # noqa: E731
    assert {key: tuple(value.shape) for key, value in converted.items()} == our_layout(config)
    landed = {}
    for key, tensor in source.items():
        target = target_of(key)
        if target is None:
            continue
        assert target in converted, f"{key}: expected at {target}"
        assert first(converted[target]) == first(tensor), f"{key} did not land at {target}"
        landed[target] = key
    assert set(landed) == set(converted), sorted(set(converted) - set(landed))


def test_fixtures_are_what_their_generator_writes():
    """The checked-in layouts equal the generator's rules, whose key counts match the published ones."""
    counts = {name: len(official.hf_port_keys(size)) for name, size in official.SIZES.items()}
    assert counts == official.PUBLISHED_HF_PORT_KEY_COUNTS
    base = official.SIZES["base"]
    for name, rules in (("fairseq", official.fairseq_keys), ("hf_port", official.hf_port_keys)):
        assert official.load_layout(name) == {key: tuple(shape) for key, shape in rules(base).items()}, name


def test_official_base_layout_converts_exactly():
    """Every key of the port's OFA-Base state dict (965, buffers included) lands where the reference says,
    or is one of the documented drops; the result is exactly our Base model's state dict."""
    layout = official.load_layout("hf_port")
    assert len(layout) == official.PUBLISHED_HF_PORT_KEY_COUNTS["base"]
    source = official.constant_state_dict(layout)
    config = config_from_hf_port(BASE_PORT_CONFIG)
    converted = convert_hf_port_state_dict(source, config)
    assert_converted_exactly(converted, source, config, port_target)
    assert converted["model.encoder.layers.0.self_attn_mid_layer_norm.weight"] is source[
        "encoder.layers.0.self_attn_mid_layer_norm.weight"]
    assert converted["model.shared.weight"] is source["encoder.embed_tokens.weight"]


def port_state_dict(model: ofa_ufo.OFAUFOForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Our weights in the port's layout: no `model.` prefix, the table under three names, index buffers."""
    ours = model.state_dict()
    shared = ours["model.shared.weight"]
    state = {k.removeprefix("model."): v for k, v in ours.items() if k.startswith("model.") and k != "model.shared.weight"}
    state["decoder.output_projection.weight"] = shared
    for side in ("encoder", "decoder"):
        state[f"{side}.token_rp_bucket"] = torch.zeros(4, 4, dtype=torch.long)
        state[f"{side}.image_rp_bucket"] = torch.zeros(4, 4, dtype=torch.long)
    state["decoder.image_position_idx"] = torch.zeros(5, dtype=torch.long)
    return state


@pytest.fixture(scope="module")
def port():
    config = config_from_hf_port(PORT_CONFIG, image_size=64)
    torch.manual_seed(0)
    model = ofa_ufo.OFAUFOForConditionalGeneration(config).eval()
    return config, model, port_state_dict(model)


def test_config_mapping(port):
    config = port[0]
    assert (config.d_model, config.encoder_layers, config.decoder_attention_heads) == (32, 2, 4)
    assert config.vision_config.resnet_type == "resnet50"
    assert (config.vocab_size, config.code_offset, config.bin_offset) == (59457, 50265, 58457)
    assert config.box_mode == "ofa" and config.image_size == 64


def test_config_rejects_unsupported_switches():
    with pytest.raises(ValueError, match="entangle_position_embedding"):
        config_from_hf_port({**PORT_CONFIG, "entangle_position_embedding": True})
    with pytest.raises(ValueError, match="resnet_type"):
        config_from_hf_port({**PORT_CONFIG, "resnet_type": "vit"})
    with pytest.warns(UserWarning, match="brand_new_field"):
        config_from_hf_port({**PORT_CONFIG, "brand_new_field": 1})


def test_round_trip_is_exact(port):
    config, model, state = port
    converted = convert_hf_port_state_dict(state, config)
    assert "model.shared.weight" in converted and not any("rp_bucket" in k for k in converted)
    fresh = ofa_ufo.OFAUFOForConditionalGeneration(config).eval()
    load_converted_state_dict(fresh, converted)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.lm_head.weight.data_ptr() == fresh.model.shared.weight.data_ptr()


def test_missing_unexpected_and_untied_keys_are_named(port):
    config, _, state = port
    broken = dict(state)
    del broken["encoder.layers.1.fc1.bias"]
    broken["decoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        convert_hf_port_state_dict(broken, config)
    assert "model.encoder.layers.1.fc1.bias" in str(info.value) and "model.decoder.layers.0.extra.weight" in str(info.value)
    untied = {**state, "decoder.output_projection.weight": state["encoder.embed_tokens.weight"] + 1}
    with pytest.raises(ValueError, match="output_projection"):
        convert_hf_port_state_dict(untied, config)
    with pytest.raises(ValueError, match="outside encoder"):
        convert_hf_port_state_dict({**state, "temp": torch.ones(())}, config)


def test_command_writes_loadable_checkpoint(port, tmp_path):
    _, model, state = port
    source, target = tmp_path / "port", tmp_path / "ours"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(PORT_CONFIG))
    torch.save(state, source / "pytorch_model.bin")
    # The packaged default BPE is smaller than BART's, so pad the port config to its layout.
    tokenizer_size = len(ofa_ufo.build_tokenizer(DEFAULT_VOCAB_DIR / "vocab.json", DEFAULT_VOCAB_DIR / "merges.txt"))
    if tokenizer_size != PORT_CONFIG["vocab_size"]:
        config = config_from_hf_port({**PORT_CONFIG, "vocab_size": tokenizer_size}, image_size=64)
        torch.manual_seed(0)
        model = ofa_ufo.OFAUFOForConditionalGeneration(config).eval()
        state = port_state_dict(model)
        (source / "config.json").write_text(json.dumps({**PORT_CONFIG, "vocab_size": tokenizer_size}))
        torch.save(state, source / "pytorch_model.bin")
    for name in ("vocab.json", "merges.txt"):
        (source / name).write_bytes((DEFAULT_VOCAB_DIR / name).read_bytes())
    from ofa_ufo.converters.hf_port import main

    main(["--input", str(source), "--output", str(target), "--image-size", "64"])
    loaded = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(target).eval()
    processor = ofa_ufo.OFAUFOProcessor.from_pretrained(target)
    assert processor.box_mode == "ofa" and processor.image_processor.size == 64
    assert loaded.generation_config.fairseq_max_len_eos is True  # OFA's decoding rule (test_fairseq_decoding.py)
    ids = torch.tensor([[0, 10, 11, 2]])
    with torch.no_grad():
        a = model(input_ids=ids, decoder_input_ids=ids[:, :2], use_cache=False).logits
        b = loaded(input_ids=ids, decoder_input_ids=ids[:, :2], use_cache=False).logits
    assert torch.equal(a, b)
