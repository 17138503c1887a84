"""Convert OFA's fairseq checkpoints (`.pt`: weights under "model", settings under "args" or "cfg").

The file is read with `torch.load(weights_only=True)` and an explicit allow-list (argparse's
Namespace, and omegaconf's containers when omegaconf is installed): a pickle that would run
code is refused, never executed. Weights are renamed to the HF-port layout (the renames of
reference/ofa.md 12.3; `encoder.version` / `decoder.version` dropped) and then converted like an
HF-port checkpoint; tests/test_convert_fairseq.py pins this on the released OFA-Base key list.

    python -m ofa_ufo.converters.fairseq --input ofa_base.pt --vocab vocab.json --merges merges.txt --output DIR
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ofa_ufo.converters.hf_port import config_from_hf_port, convert_hf_port_state_dict, save_converted
from ofa_ufo.hf.configuration import OFAUFOConfig

# fairseq name piece -> HF-port name piece; order matters (the longer encoder_attn name first).
RENAMES = (
    (".attn_ln.", ".self_attn_mid_layer_norm."),
    (".self_attn_ln.", ".self_attn_mid_layer_norm."),
    (".cross_attn_ln.", ".cross_attn_mid_layer_norm."),
    (".encoder_attn_layer_norm.", ".cross_attn_layer_norm."),
    (".encoder_attn.", ".cross_attn."),
    (".ffn_layernorm.", ".ffn_layer_norm."),
)
DROPPED = ("encoder.version", "decoder.version")
# fairseq argument -> HF-port config field
ARG_FIELDS = {
    "encoder_embed_dim": "d_model", "encoder_layers": "encoder_layers", "decoder_layers": "decoder_layers",
    "encoder_attention_heads": "encoder_attention_heads", "decoder_attention_heads": "decoder_attention_heads",
    "encoder_ffn_embed_dim": "encoder_ffn_dim", "decoder_ffn_embed_dim": "decoder_ffn_dim",
    "resnet_type": "resnet_type", "token_bucket_size": "token_bucket_size",
    "image_bucket_size": "image_bucket_size", "attn_scale_factor": "attn_scale_factor",
    "max_source_positions": "max_position_embeddings", "code_image_size": "code_image_size",
    # architecture switches with the same name in the port's config (config_from_hf_port refuses other values)
    **{name: name for name in (
        "encoder_normalize_before", "decoder_normalize_before", "layernorm_embedding", "patch_layernorm_embedding",
        "code_layernorm_embedding", "add_type_embedding", "share_decoder_input_output_embed",
        "entangle_position_embedding")},
}
# fairseq flags of OFA's released NormFormer setting (every run script passes them): without them the
# checkpoint lacks the mid/FFN LayerNorms or the head scales that our layers always have.
REQUIRED_FLAGS = ("scale_attn", "scale_fc", "scale_heads")


def allowed_globals() -> list:
    allowed: list = [argparse.Namespace]
    try:
        from omegaconf import DictConfig, ListConfig, nodes  # fairseq's config types, only present with fairseq
        from omegaconf.base import ContainerMetadata, Metadata
    except ImportError:
        return allowed
    node_types = [getattr(nodes, name) for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")]
    return allowed + [DictConfig, ListConfig, ContainerMetadata, Metadata, Any, dict, list, int] + node_types


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a fairseq checkpoint safely; refuse code-running pickles, name truncated files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: refused to unpickle (only tensors and plain settings are allowed): {error}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError(f"{path}: expected a fairseq checkpoint dict with the weights under 'model'")
    return dict(checkpoint)


def fairseq_to_hf_port(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename fairseq OFA keys to the HF-port layout."""
    renamed = {}
    for key, value in state_dict.items():
        if key in DROPPED:
            continue
        for old, new in RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model settings as a dict, from fairseq's `args` (Namespace) or `cfg.model`."""
    if checkpoint.get("args") is not None:
        return dict(vars(checkpoint["args"]))
    cfg = checkpoint.get("cfg")
    model = cfg.get("model") if cfg is not None else None
    if model is None:
        raise ValueError("fairseq checkpoint has neither 'args' nor 'cfg.model' settings")
    return {key: model[key] for key in model}


def config_dict(args: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """HF-port style config fields from fairseq arguments (OFA's released NormFormer setting)."""
    off = [f"--{flag.replace('_', '-')}" for flag in REQUIRED_FLAGS if args.get(flag) is False]
    if off:
        raise ValueError(f"fairseq checkpoint trained without {', '.join(off)} (args.{'/'.join(REQUIRED_FLAGS)} "
                         "must be True, OFA's released NormFormer setting): not supported")
    fields = {field: args[arg] for arg, field in ARG_FIELDS.items() if args.get(arg) is not None}
    if args.get("no_scale_embedding") is not None:
        fields["scale_embedding"] = not args["no_scale_embedding"]
    return {**fields, "vocab_size": vocab_size}


def load_fairseq_checkpoint(path: str | Path, image_size: int = 384) -> tuple[OFAUFOConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for a fairseq `.pt`, checked key by key against that config's model."""
    checkpoint = read_checkpoint(path)
    state_dict = fairseq_to_hf_port(checkpoint["model"])
    if "encoder.embed_tokens.weight" not in state_dict:
        raise ValueError(f"{path}: 'model' has no encoder.embed_tokens.weight: not an OFA fairseq checkpoint")
    vocab_size = state_dict["encoder.embed_tokens.weight"].shape[0]
    config = config_from_hf_port(config_dict(settings(checkpoint), vocab_size), image_size=image_size)
    return config, convert_hf_port_state_dict(state_dict, config)


def convert_fairseq_checkpoint(path: str | Path, vocab_file: str | Path, merges_file: str | Path,
                               output_dir: str | Path, image_size: int = 384):
    """Convert a fairseq `.pt` into a `save_pretrained` directory; returns model and processor."""
    config, converted = load_fairseq_checkpoint(path, image_size)
    return save_converted(config, converted, vocab_file, merges_file, output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.converters.fairseq", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="fairseq OFA checkpoint (.pt)")
    parser.add_argument("--vocab", required=True, help="OFA's BART vocab.json")
    parser.add_argument("--merges", required=True, help="OFA's BART merges.txt")
    parser.add_argument("--output", required=True, help="save_pretrained directory to write")
    parser.add_argument("--image-size", type=int, default=384, help="processor input size (OFA fine-tunes use 480/512)")
    args = parser.parse_args(argv)
    convert_fairseq_checkpoint(args.input, args.vocab, args.merges, args.output, args.image_size)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
