"""Convert OFA checkpoints of the Hugging Face port (OFA-Sys/OFA-*) or ModelScope into OFA-UFO.

Both use the same key layout (reference/ofa.md, section 12.3): top-level `encoder.*` / `decoder.*`,
the shared token table under `encoder.embed_tokens` (also `decoder.embed_tokens` and
`decoder.output_projection`), plus persisted index buffers. Ours is the same under `model.`,
the shared table at `model.shared.weight`, and no index buffers (we rebuild them).

    python -m ofa_ufo.converters.hf_port --input OFA-tiny/ --output ofa-ufo-tiny/ [--image-size 256]

reads `config.json`, `pytorch_model.bin` (or `model.safetensors`), `vocab.json` and `merges.txt`,
and writes a `save_pretrained` directory with the model and its processor.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from ofa_ufo.generation.fairseq_rules import with_fairseq_rules
from ofa_ufo.hf.configuration import RESNET_LAYERS, OFAUFOConfig
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.tokenization import build_tokenizer

# OFA's unified vocabulary ends with 8192 VQGAN codes then 1000 location bins.
OFA_NUM_CODES = 8192
OFA_NUM_BINS = 1000

# Index tables the port persists as buffers; ours are recomputed (see ofa_ufo/layers/position.py).
INDEX_BUFFERS = ("token_rp_bucket", "image_rp_bucket", "image_position_idx")
# The shared table appears under these names in the port; all must be the same tensor.
SHARED_SOURCE = "encoder.embed_tokens.weight"
SHARED_ALIASES = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
SHARED_TARGET = "model.shared.weight"
# Our keys that are ties of `model.shared.weight` (present in our state_dict, filled by the tie).
TIED_TARGETS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")

# HF-port config field -> our field, copied as is.
_SAME_FIELDS = (
    "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
    "attention_dropout", "activation_dropout", "encoder_drop_path_rate", "decoder_drop_path_rate", "init_std",
    "max_position_embeddings", "token_bucket_size", "image_bucket_size", "attn_scale_factor", "normformer",
    "code_image_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "use_cache",
)
# Switches that change the architecture: we implement exactly these values (OFA's released setting).
_REQUIRED_VALUES = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "share_decoder_input_output_embed": True,
    "scale_embedding": False,
    "entangle_position_embedding": False,
    "interpolate_position": False,
    "use_ofasys": False,
    "use_image_feature": True,  # ModelScope: False builds a text-only model
    "share_attn_bias": False,
    "use_gamma_feature": False,
    "exclude_mlp": True,
}
# Fields that do not affect the converted weights' architecture or that we do not model.
_IGNORED_FIELDS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
    "is_encoder_decoder", "forced_eos_token_id", "forced_bos_token_id", "encoder_layerdrop", "decoder_layerdrop",
    "classifier_dropout", "num_hidden_layers", "resnet_model_path", "orig_patch_image_size", "disable_entangle",
    "vit_type", "vit_drop_path_rate", "gamma", "mlp_dim", "remove_decoder_type_embedding", "temperature_init_value", "tie_word_embeddings", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "gradient_checkpointing", "tokenizer_class", "prefix",
    "task_specific_params", "problem_type", "chunk_size_feed_forward", "add_cross_attention",
}


def config_from_hf_port(config_dict: Mapping[str, Any], image_size: int = 384) -> OFAUFOConfig:
    """`OFAUFOConfig` for an HF-port / ModelScope `OFAConfig` (as a dict, e.g. a parsed `config.json`).

    The vocabulary is assumed to have OFA's layout: text pieces, then 8192 codes, then 1000 bins
    at the end (`code_offset = vocab_size - 9192`, `bin_offset = vocab_size - 1000`). Architecture
    switches we do not implement (post-LN, no type embedding, untied output, ...) raise; fields
    with no architectural meaning are ignored; anything unknown is reported in a warning.
    """
    config_dict = dict(config_dict)
    wrong = {
        key: config_dict[key] for key, want in _REQUIRED_VALUES.items()
        if key in config_dict and config_dict[key] is not None and bool(config_dict[key]) != want
    }
    if wrong:
        raise ValueError(f"unsupported OFA architecture settings (we implement {_REQUIRED_VALUES}): {wrong}")
    resnet_type = config_dict.get("resnet_type", "resnet101")
    if resnet_type not in RESNET_LAYERS:
        raise ValueError(f"resnet_type {resnet_type!r} is not supported (ViT trunks are not); have {sorted(RESNET_LAYERS)}")
    vocab_size = int(config_dict.get("vocab_size", 59457))
    fields: dict[str, Any] = {key: config_dict[key] for key in _SAME_FIELDS if key in config_dict}
    if fields.get("encoder_attention_heads", 0) != fields.get("decoder_attention_heads", 0):
        # Our position-bias scaling reads one head count; OFA's presets always use equal counts.
        raise ValueError("encoder_attention_heads != decoder_attention_heads is not supported")
    fields.update(
        vision_config={
            "resnet_type": resnet_type,
            "resnet_drop_path_rate": float(config_dict.get("resnet_drop_path_rate", 0.0) or 0.0),
        },
        scale_heads=True,  # the port always creates c_attn
        num_codes=OFA_NUM_CODES,
        num_bins=OFA_NUM_BINS,
        code_offset=vocab_size - OFA_NUM_CODES - OFA_NUM_BINS,
        bin_offset=vocab_size - OFA_NUM_BINS,
        box_mode="ofa",
        image_size=image_size,
    )
    unknown = sorted(set(config_dict) - set(_SAME_FIELDS) - set(_REQUIRED_VALUES) - _IGNORED_FIELDS - {
        "resnet_type", "resnet_drop_path_rate"})
    if unknown:
        warnings.warn(f"config_from_hf_port ignores unknown OFA config field(s): {unknown}", stacklevel=2)
    return OFAUFOConfig(**fields)


def convert_hf_port_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: OFAUFOConfig | None = None
) -> dict[str, torch.Tensor]:
    """Rename an HF-port / ModelScope `OFAModel` state dict to our keys.

    `encoder.embed_tokens.weight` becomes `model.shared.weight`; its aliases (decoder embedding,
    output projection) must equal it and are dropped; index buffers are dropped; everything else
    gets the `model.` prefix. With `config`, the result is checked against the keys and shapes of
    the model that config builds: missing, unexpected or mis-shaped keys raise, listed by name.
    """
    if SHARED_SOURCE not in state_dict:
        raise KeyError(f"{SHARED_SOURCE!r} not found: not an OFA HF-port/ModelScope state dict")
    shared = state_dict[SHARED_SOURCE]
    converted: dict[str, torch.Tensor] = {SHARED_TARGET: shared}
    stray: list[str] = []
    for key, tensor in state_dict.items():
        if key == SHARED_SOURCE:
            continue
        if key in SHARED_ALIASES:
            if tensor.shape != shared.shape or not torch.equal(tensor, shared):
                raise ValueError(f"{key} differs from {SHARED_SOURCE}; untied embeddings are not supported")
            continue
        if key.rsplit(".", 1)[-1] in INDEX_BUFFERS:
            continue
        if not key.startswith(("encoder.", "decoder.")):
            stray.append(key)
            continue
        converted[f"model.{key}"] = tensor
    if stray:
        raise ValueError(f"unexpected key(s) outside encoder./decoder.: {stray}")
    if config is not None:
        check_against_config(converted, config)
    return converted


def expected_shapes(config: OFAUFOConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our model's state dict for `config` (built on the meta device, no memory)."""
    with torch.device("meta"):
        model = OFAUFOForConditionalGeneration(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in TIED_TARGETS}


def check_state_dict(converted: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise, naming every missing, unexpected and misshapen key, unless `converted` has exactly
    the keys and shapes of `want` (`what` names the source in the message)."""
    missing = sorted(set(want) - set(converted))
    unexpected = sorted(set(converted) - set(want))
    shapes = sorted(
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {want[key]}"
        for key in set(want) & set(converted) if tuple(converted[key].shape) != want[key]
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} does not match the model:"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatch: {shapes}" if shapes else "")
        )


def check_against_config(converted: Mapping[str, torch.Tensor], config: OFAUFOConfig) -> None:
    """Raise, naming every key, unless `converted` has exactly the keys and shapes `config` needs."""
    check_state_dict(converted, expected_shapes(config), "converted OFA state dict")


def load_converted_state_dict(model, converted: Mapping[str, torch.Tensor]) -> None:
    """Load a converted state dict into `model` strictly: only the tied aliases of the shared table may be
    absent from it (they are the same Parameter), anything else missing or unexpected raises by name."""
    result = model.load_state_dict(dict(converted), strict=False)
    missing = sorted(set(result.missing_keys) - set(TIED_TARGETS))
    if missing or result.unexpected_keys:
        raise ValueError(f"loading the converted state dict: missing {missing}, unexpected {sorted(result.unexpected_keys)}")
    shared = model.model.shared.weight
    for name in TIED_TARGETS:
        module_path, _ = name.rsplit(".", 1)
        if model.get_submodule(module_path).weight.data_ptr() != shared.data_ptr():
            raise ValueError(f"{name} is not tied to model.shared.weight")


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        state_dict: dict[str, torch.Tensor] = {}
        for path in safetensors:
            state_dict.update(load_file(str(path)))
        return state_dict
    path = directory / "pytorch_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no pytorch_model.bin or *.safetensors in {directory}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return state_dict.get("model", state_dict) if isinstance(state_dict.get("model"), dict) else state_dict


def convert_hf_port_checkpoint(input_dir: str | Path, output_dir: str | Path, image_size: int = 384):
    """Convert a checkpoint directory; returns the loaded model and processor after saving them."""
    input_dir = Path(input_dir)
    config = config_from_hf_port(json.loads((input_dir / "config.json").read_text()), image_size=image_size)
    converted = convert_hf_port_state_dict(_read_state_dict(input_dir), config)
    return save_converted(config, converted, input_dir / "vocab.json", input_dir / "merges.txt", output_dir)


def save_converted(config: OFAUFOConfig, converted: Mapping[str, torch.Tensor], vocab_file: str | Path,
                   merges_file: str | Path, output_dir: str | Path):
    """Load converted weights into a model, build OFA's tokenizer, check they agree, save both; the saved
    generation config turns on OFA's length-limit rule (`fairseq_max_len_eos`)."""
    tokenizer = build_tokenizer(vocab_file, merges_file, num_codes=OFA_NUM_CODES, num_bins=OFA_NUM_BINS)
    layout = (len(tokenizer), tokenizer.code_offset, tokenizer.bin_offset)
    if layout != (config.vocab_size, config.code_offset, config.bin_offset):
        raise ValueError(
            f"tokenizer layout (size, code_offset, bin_offset) = {layout} from {vocab_file} does not match the "
            f"checkpoint's {(config.vocab_size, config.code_offset, config.bin_offset)} (vocabulary of "
            f"{len(tokenizer)} tokens vs {config.vocab_size} embedding rows)"
        )
    tokenizer.model_max_length = config.max_position_embeddings
    model = OFAUFOForConditionalGeneration(config)
    load_converted_state_dict(model, converted)
    model.eval()
    model.generation_config = with_fairseq_rules(model.generation_config)  # OFA's beams through generate
    processor = OFAUFOProcessor(
        image_processor=OFAUFOImageProcessor(size=config.image_size), tokenizer=tokenizer, box_mode="ofa",
        max_image_size=config.max_image_size,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="HF-port/ModelScope checkpoint directory")
    parser.add_argument("--output", required=True, help="where to write the save_pretrained directory")
    parser.add_argument(
        "--image-size", type=int, default=384,
        help="processor image size in px (OFA pretraining 384; the OFA-tiny HF example uses 256)",
    )
    args = parser.parse_args(argv)
    model, _ = convert_hf_port_checkpoint(args.input, args.output, args.image_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.input} -> {args.output} ({params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
