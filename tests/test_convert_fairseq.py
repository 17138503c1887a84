"""fairseq OFA checkpoints: a layout round trip, and unsafe / truncated / mismatched files refused."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

import ofa_ufo
from ofa_ufo.converters.fairseq import RENAMES, convert_fairseq_checkpoint, read_checkpoint
from ofa_ufo.hf.tokenization import DEFAULT_VOCAB_DIR

from conftest import RunsCode, TINY


def fairseq_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights written in fairseq's key layout (the inverse of the converter's renames)."""
    ours = model.state_dict()
    shared = ours["model.shared.weight"]
    state = {k.removeprefix("model."): v for k, v in ours.items() if k.startswith("model.") and k != "model.shared.weight"}
    state.update({"encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
                  "decoder.output_projection.weight": shared, "encoder.version": torch.tensor([3.0])})
    inverse = {new: old for old, new in RENAMES if old != ".self_attn_ln."}  # encoder names
    renamed = {}
    for key, value in state.items():
        decoder = key.startswith("decoder.")
        for new, old in inverse.items():
            key = key.replace(new, ".self_attn_ln." if decoder and new == ".self_attn_mid_layer_norm." else old)
        renamed[key] = value
    return renamed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as a fairseq `.pt` with `args`, using the default vocabulary's size."""
    torch.manual_seed(0)
    tokenizer = ofa_ufo.build_tokenizer()
    model = ofa_ufo.create_model("ofa_ufo_tiny", **{**TINY, "image_size": 64}).eval()
    args = argparse.Namespace(encoder_embed_dim=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64,
                              resnet_type="resnet50", token_bucket_size=256, image_bucket_size=42,
                              attn_scale_factor=2.0, max_source_positions=1024, arch="ofa_tiny")
    path = tmp_path_factory.mktemp("fairseq") / "checkpoint.pt"
    torch.save({"args": args, "model": fairseq_state_dict(model)}, path)
    assert len(tokenizer) == model.config.vocab_size
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
