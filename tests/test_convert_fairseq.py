"""fairseq OFA checkpoints: the official key layout converts exactly, weights land where the reference
says, and unsafe / truncated / mismatched files are refused.

tests/fixtures/ofa_base_fairseq_keys.json lists every key and shape of the released OFA-Base checkpoint's
"model" dict, written by tests/fixtures/make_ofa_key_fixtures.py from OFA's fairseq module definitions
(not from our converter); the smaller layouts below come from the same rules.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import ofa_ufo
from ofa_ufo.converters.fairseq import convert_fairseq_checkpoint, load_fairseq_checkpoint, read_checkpoint
from ofa_ufo.converters.hf_port import load_converted_state_dict
from ofa_ufo.hf.tokenization import DEFAULT_VOCAB_DIR
from ofa_ufo.layers.attention import OFAAttention

from conftest import RunsCode, TINY
from test_convert_hf_port import DROPPED, assert_converted_exactly

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))  # the official layouts' generator
import make_ofa_key_fixtures as official  # noqa: E402

# reference/ofa.md 12.3, "Fairseq -> HF renames": fairseq module name -> port module name (whole dotted parts).
REFERENCE_RENAMES = {
    "attn_ln": "self_attn_mid_layer_norm",  # encoder layers
    "self_attn_ln": "self_attn_mid_layer_norm",  # decoder layers
    "cross_attn_ln": "cross_attn_mid_layer_norm",
    "encoder_attn": "cross_attn",
    "encoder_attn_layer_norm": "cross_attn_layer_norm",
    "ffn_layernorm": "ffn_layer_norm",
}
VERSIONS = {"encoder.version", "decoder.version"}  # fairseq's format markers, dropped
# The released Base settings as the checkpoint's `args` hold them (ofa.py ofa_base_architecture + run scripts).
BASE_ARGS = dict(
    arch="ofa_base", encoder_embed_dim=768, decoder_embed_dim=768, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_embed_dim=3072, decoder_ffn_embed_dim=3072,
    resnet_type="resnet101", token_bucket_size=256, image_bucket_size=42, attn_scale_factor=2.0,
    max_source_positions=1024, max_target_positions=1024, code_image_size=128, encoder_normalize_before=True,
    decoder_normalize_before=True, layernorm_embedding=True, patch_layernorm_embedding=True,
    code_layernorm_embedding=True, add_type_embedding=True, share_decoder_input_output_embed=True,
    share_all_embeddings=True, entangle_position_embedding=False, no_scale_embedding=True, scale_attn=True,
    scale_fc=True, scale_heads=True, scale_resids=False, activation_fn="gelu", dropout=0.1,
)
TINY_ARGS = {**BASE_ARGS, "arch": "ofa_tiny", "encoder_embed_dim": 32, "decoder_embed_dim": 32, "encoder_layers": 2,
             "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "encoder_ffn_embed_dim": 64, "decoder_ffn_embed_dim": 64, "resnet_type": "resnet50"}


def port_name(key: str) -> str:
    return ".".join(REFERENCE_RENAMES.get(part, part) for part in key.split("."))


def fairseq_target(key: str) -> str | None:
    """Where the reference puts a fairseq key in our model (None: dropped on purpose)."""
    if key in VERSIONS or port_name(key) in DROPPED:
        return None
    return "model.shared.weight" if key == "encoder.embed_tokens.weight" else f"model.{port_name(key)}"


def test_official_fairseq_layout_is_the_port_layout_renamed():
    """The two fixtures agree through the reference's renames, but for the versions and one buffer length."""
    fairseq, port = official.load_layout("fairseq"), official.load_layout("hf_port")
    renamed = {port_name(key): shape for key, shape in fairseq.items() if key not in VERSIONS}
    assert set(renamed) == set(port)
    assert {key for key in port if renamed[key] != port[key]} == {"decoder.image_position_idx"}
    assert (fairseq["decoder.image_position_idx"], port["decoder.image_position_idx"]) == ((1026,), (1025,))


def test_official_base_checkpoint_converts_exactly(tmp_path):
    """A `.pt` with every key and shape of the released OFA-Base "model" dict (zero-stride tensors: a tiny
    file) converts to exactly our Base model's state dict, each tensor where the reference puts it."""
    layout = official.load_layout("fairseq")
    source = official.constant_state_dict(layout)
    path = tmp_path / "ofa_base.pt"
    torch.save({"args": argparse.Namespace(**BASE_ARGS), "model": source}, path)
    config, converted = load_fairseq_checkpoint(path, image_size=480)
    shape = (config.d_model, config.encoder_layers, config.decoder_attention_heads, config.vocab_size)
    assert shape == (768, 6, 12, 59457)
    assert config.vision_config.resnet_type == "resnet101" and config.image_size == 480
    assert_converted_exactly(converted, source, config, fairseq_target)


def test_unsupported_fairseq_settings_are_named(tmp_path):
    path = tmp_path / "no_heads.pt"
    state = official.constant_state_dict(official.fairseq_keys(SHRUNK))
    torch.save({"args": argparse.Namespace(**{**TINY_ARGS, "scale_heads": False}), "model": state}, path)
    with pytest.raises(ValueError, match="--scale-heads"):
        load_fairseq_checkpoint(path)
    torch.save({"args": argparse.Namespace(**{**TINY_ARGS, "entangle_position_embedding": True}), "model": state}, path)
    with pytest.raises(ValueError, match="entangle_position_embedding"):
        load_fairseq_checkpoint(path)


# A small variant of the released layout (same rules and names) over the packaged tokenizer's vocabulary.
SHRUNK = official.Size(32, 2, 2, 4, (3, 4, 6), vocab=17192, ffn_dim=64)


def fairseq_state_dict(model) -> dict[str, torch.Tensor]:
    """Our tiny model's weights in the official fairseq layout: the keys come from the fixture rules and each
    takes the weight of the key the reference maps it to; versions and index tables as fairseq stores them."""
    ours = model.state_dict()
    state = {}
    for key, shape in official.fairseq_keys(SHRUNK).items():
        shape, target = tuple(shape), fairseq_target(key)
        if key in official.TIED:
            value = ours["model.shared.weight"]
        elif target is None:
            value = torch.zeros((), dtype=torch.long).expand(shape) if key not in VERSIONS else torch.tensor([3.0])
        else:
            value = ours[target]
        assert tuple(value.shape) == shape, key
        state[key] = value
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as a fairseq `.pt` with `args`, using the default vocabulary's size."""
    torch.manual_seed(0)
    tokenizer = ofa_ufo.build_tokenizer()
    model = ofa_ufo.create_model("ofa_ufo_tiny", **{**TINY, "image_size": 64}).eval()
    with torch.no_grad():  # off the init values, so that two LayerNorms swapped by a converter differ
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    assert len(tokenizer) == model.config.vocab_size == SHRUNK.vocab
    path = tmp_path_factory.mktemp("fairseq") / "checkpoint.pt"
    torch.save({"args": argparse.Namespace(**TINY_ARGS), "model": fairseq_state_dict(model)}, path)
    return path, model


def test_fairseq_layout_round_trip(checkpoint, tmp_path):
    path, model = checkpoint
    converted, processor = convert_fairseq_checkpoint(
        path, DEFAULT_VOCAB_DIR / "vocab.json", DEFAULT_VOCAB_DIR / "merges.txt", tmp_path, image_size=64
    )
    assert converted.config.box_mode == "ofa" and converted.config.d_model == 32
    inputs = processor(images=[(torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()],
                       text=[" what does the image describe?"], return_tensors="pt")
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    decoder = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(**inputs, decoder_input_ids=decoder).logits,
                           converted(**inputs, decoder_input_ids=decoder).logits)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "generation_config.json").read_text())["fairseq_max_len_eos"] is True


class Calls:
    """Forward hooks on a layer's direct children: each child's positional inputs and output, by child."""

    def __init__(self, layer: torch.nn.Module):
        self.inputs: dict[torch.nn.Module, tuple] = {}
        self.outputs: dict[torch.nn.Module, torch.Tensor] = {}
        for child in layer.children():
            child.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self.inputs[module], self.outputs[module] = args, output

    def producing(self, value: float) -> torch.nn.Module:
        """The one child whose output is `value` everywhere."""
        found = [m for m, out in self.outputs.items() if torch.is_tensor(out) and out.eq(value).all()]
        assert len(found) == 1, f"{len(found)} modules output {value}"
        return found[0]


def test_normformer_weights_land_in_the_reference_places(checkpoint, tmp_path):
    """fairseq's NormFormer LayerNorms, marked by weight 0 and a distinct bias (their output is then that
    constant), end in the modules the reference gives them, found by what they compute, not by name:
    attn_ln / self_attn_ln normalise the self-attention output, cross_attn_ln the output of the attention
    over the encoder states, ffn_layernorm the FFN hidden layer that fc2 reads."""
    path, model = checkpoint
    state = fairseq_state_dict(model)
    marks = {"encoder.layers.0.attn_ln": 3.0, "encoder.layers.0.ffn_layernorm": 4.0,
             "decoder.layers.1.self_attn_ln": 5.0, "decoder.layers.1.cross_attn_ln": 6.0,
             "decoder.layers.1.ffn_layernorm": 7.0}
    for prefix, value in marks.items():
        state[f"{prefix}.weight"] = torch.zeros_like(state[f"{prefix}.weight"])
        state[f"{prefix}.bias"] = torch.full_like(state[f"{prefix}.bias"], value)
    marked = tmp_path / "marked.pt"
    torch.save({"args": argparse.Namespace(**TINY_ARGS), "model": state}, marked)
    config, converted = load_fairseq_checkpoint(marked, image_size=64)
    ours = ofa_ufo.OFAUFOForConditionalGeneration(config).eval()
    load_converted_state_dict(ours, converted)
    encoder_layer, decoder_layer = ours.model.encoder.layers[0], ours.model.decoder.layers[1]
    enc, dec = Calls(encoder_layer), Calls(decoder_layer)
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    with torch.no_grad():
        out = ours(input_ids=ids, pixel_values=torch.zeros(1, 3, 64, 64), decoder_input_ids=ids[:, :3], use_cache=False)
    source_length = out.encoder_last_hidden_state.shape[1]

    def attention(calls: Calls, over_encoder: bool) -> torch.nn.Module:
        found = [m for m, args in calls.inputs.items() if isinstance(m, OFAAttention)
                 and (len(args) > 2 and args[2] is not None and args[2].shape[1] == source_length) == over_encoder]
        assert len(found) == 1
        return found[0]

    def fc2(calls: Calls) -> torch.nn.Module:
        return next(m for m in calls.inputs if isinstance(m, torch.nn.Linear) and m.out_features == config.d_model)

    assert enc.inputs[enc.producing(3.0)][0] is enc.outputs[attention(enc, over_encoder=False)]
    assert enc.inputs[fc2(enc)][0] is enc.outputs[enc.producing(4.0)]
    assert dec.inputs[dec.producing(5.0)][0] is dec.outputs[attention(dec, over_encoder=False)]
    assert dec.inputs[dec.producing(6.0)][0] is dec.outputs[attention(dec, over_encoder=True)]
    assert dec.inputs[fc2(dec)][0] is dec.outputs[dec.producing(7.0)]


PWNED = "/tmp/ofa_ufo_pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": RunsCode(PWNED)}, path)
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_checkpoint(path)
    assert not os.path.exists(PWNED)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": RunsCode(PWNED)}))
    with pytest.raises(ValueError, match="refused to unpickle|not a readable checkpoint"):
        read_checkpoint(raw)


def test_truncated_checkpoint_is_named(checkpoint, tmp_path):
    path, _ = checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable checkpoint"):
        read_checkpoint(cut)


def test_vocabulary_size_mismatch_names_both_sizes(checkpoint, tmp_path):
    path, model = checkpoint
    vocab = tmp_path / "vocab.json"
    vocab.write_text('{"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=f"vocabulary of {7 + 1 + 9192} tokens vs {model.config.vocab_size} embedding rows"):
        convert_fairseq_checkpoint(path, vocab, tmp_path / "merges.txt", tmp_path / "out")
