"""Convert taming-transformers VQGAN checkpoints (`VQModel`, `GumbelVQ`) into a `VQGANModel` directory.

    python -m ofa_ufo.converters.taming --input last.ckpt --config model.yaml --output DIR
    python -m ofa_ufo.converters.taming --input last.ckpt --preset vqgan_f8_8192_gumbel --output DIR

The input is a PyTorch Lightning `.ckpt` (weights under "state_dict"), a plain state dict, or a
`.safetensors` file. Pickles are read with `torch.load(weights_only=True)` and an explicit allow-list:
omegaconf containers and argparse namespaces (as the fairseq converter), numpy scalars, and Lightning's
own classes (the callback-state keys of a `.ckpt`) mapped to an inert placeholder that is never run.
Anything else that would run code is refused. Loss weights (discriminator, LPIPS) are dropped, Gumbel's
codebook `quantize.embed` is renamed `quantize.embedding`, and the rest must match the model exactly.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from ofa_ufo.converters.fairseq import allowed_globals as _fairseq_allowed_globals
from ofa_ufo.converters.hf_port import check_state_dict
from ofa_ufo.hf.modeling_vqgan import VQGANConfig, VQGANModel, create_vqgan_config
from ofa_ufo.models.vqgan import level_resolutions

DROPPED_PREFIXES = ("loss.",)  # VQLPIPSWithDiscriminator: discriminator and LPIPS weights
RENAMES = {"quantize.embed.weight": "quantize.embedding.weight"}  # GumbelQuantize's codebook
TARGETS = {"GumbelVQ": "gumbel", "VQModel": "vq"}  # taming.models.vqgan classes (or OFA's copy of them)
DDCONFIG_FIELDS = {
    "ch": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
    "resolution": "resolution", "z_channels": "z_channels", "in_channels": "in_channels", "out_ch": "out_channels",
    "dropout": "dropout",
}
LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class LightningPlaceholder:
    """Stands in for any Lightning class named in a checkpoint (e.g. the `ModelCheckpoint` key of its
    callback states): accepts and discards whatever the pickle passes, so nothing of Lightning runs."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _numpy_globals() -> list:
    """numpy scalars and dtypes (Lightning may store metric values as numpy scalars)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    scalar = [(multiarray.scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    return scalar + [np.dtype] + [type(np.dtype(code)) for code in "?bhilqBHILQefdFD"]


def allowed_globals(path: Path) -> list:
    """fairseq's allow-list, numpy scalars, and the placeholder under every Lightning name the file uses."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads opcodes, runs nothing
    except Exception:  # not a zip checkpoint (legacy format): torch.load's own checks decide
        names = []
    lightning = [(LightningPlaceholder, name) for name in names if name.startswith(LIGHTNING_MODULES)]
    return _fairseq_allowed_globals() + _numpy_globals() + lightning


def _load_pickle(path: Path) -> Any:
    try:
        allowed = allowed_globals(path)
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused to unpickle (only tensors and plain settings are allowed): {error}"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {error}") from None


def read_taming_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a taming checkpoint (Lightning `.ckpt`, plain state dict or safetensors), safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    checkpoint = _load_pickle(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        keys = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path}: expected a Lightning checkpoint with a 'state_dict' or a plain state dict, got {keys}"
        )
    return dict(checkpoint)


def taming_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop loss/discriminator weights and rename taming keys to `VQGANModel`'s."""
    if "quantize.used" in state_dict:
        raise ValueError("checkpoint uses a remapped codebook (quantize.used, taming's `remap`); not supported")
    return {RENAMES.get(key, key): value for key, value in state_dict.items() if not key.startswith(DROPPED_PREFIXES)}


def config_from_taming(taming_config: Mapping[str, Any]) -> VQGANConfig:
    """`VQGANConfig` from a taming `model.yaml` (parsed): `model.target` and `model.params.ddconfig`."""
    model = taming_config.get("model", taming_config)
    target = str(model.get("target", ""))
    quantizer = TARGETS.get(target.rsplit(".", 1)[-1])
    if quantizer is None:
        raise ValueError(f"unsupported taming model target {target!r}; expected one of "
                         f"{[f'taming.models.vqgan.{name}' for name in TARGETS]}")
    params = model.get("params", {})
    ddconfig = params.get("ddconfig", {})
    if ddconfig.get("double_z", False) or not ddconfig.get("resamp_with_conv", True):
        raise ValueError("taming ddconfig with double_z=True or resamp_with_conv=False is not a VQGAN we support")
    if params.get("remap") is not None:
        raise ValueError("taming configs with `remap` (a remapped codebook) are not supported")
    fields = {ours: ddconfig[theirs] for theirs, ours in DDCONFIG_FIELDS.items() if theirs in ddconfig}
    fields.update(quantizer=quantizer, embed_dim=params["embed_dim"], n_embed=params["n_embed"])
    if quantizer == "gumbel":
        fields["kl_weight"] = params.get("kl_weight", 1e-8)  # GumbelVQ's default
    # taming silently skips attention resolutions no level has; keep only the effective ones.
    probe = VQGANConfig(**{**fields, "attn_resolutions": []})
    fields["attn_resolutions"] = [r for r in fields.get("attn_resolutions", []) if r in level_resolutions(probe)]
    return VQGANConfig(**fields)


def load_config_file(path: str | Path) -> VQGANConfig:
    with open(path, encoding="utf-8") as handle:
        return config_from_taming(yaml.safe_load(handle))


def load_converted(config: VQGANConfig, converted: Mapping[str, torch.Tensor]) -> VQGANModel:
    """A `VQGANModel` holding `converted`; raises naming every missing, unexpected or misshapen key."""
    model = VQGANModel(config)
    want = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    check_state_dict(converted, want, "taming state dict (VQGAN config)")
    model.load_state_dict(dict(converted), strict=True)
    return model.eval()


def convert_taming_checkpoint(path: str | Path, output_dir: str | Path | None = None, *,
                              config: VQGANConfig | str | Path | None = None,
                              preset: str | None = None) -> VQGANModel:
    """Convert a taming checkpoint; `config` is a taming `model.yaml` (or a `VQGANConfig`), else `preset`
    names one of `list_vqgans()`. Saves a `save_pretrained` directory when `output_dir` is given."""
    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config (a taming model.yaml) or preset (a VQGAN name)")
    if preset is not None:
        config = create_vqgan_config(preset)
    elif not isinstance(config, VQGANConfig):
        config = load_config_file(config)
    model = load_converted(config, taming_to_ours(read_taming_checkpoint(path)))
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.converters.taming", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="taming checkpoint: Lightning .ckpt, state dict or .safetensors")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the checkpoint's taming model.yaml")
    source.add_argument("--preset", help="a VQGAN preset name instead (e.g. vqgan_f8_8192_gumbel)")
    parser.add_argument("--output", required=True, help="save_pretrained directory to write")
    args = parser.parse_args(argv)
    model = convert_taming_checkpoint(args.input, args.output, config=args.config, preset=args.preset)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.input} -> {args.output} ({model.config.quantizer}, {model.config.n_embed} codes, "
          f"f={model.downsample_factor}, {params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
