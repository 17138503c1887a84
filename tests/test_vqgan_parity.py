"""Numerical parity with taming-transformers' `GumbelVQ` / `VQModel` on random weights (oracle test).

    .venv-oracle/bin/pip install --no-deps taming-transformers-rom1504==0.0.6 einops
    .venv-oracle/bin/python -m pytest -m oracle tests/test_vqgan_parity.py -s

taming's own model classes are used. `taming.models.vqgan` imports pytorch_lightning and `taming.main`
(a training script); both are replaced by stubs while it is imported (a `LightningModule` that is a
plain `nn.Module`, and `instantiate_from_config`), and `sys.modules` is restored afterwards.

A taming model at a small config gets every parameter perturbed (GroupNorms off their 1/0 init; the VQ
codebook drawn from the encoder's own features so that many codes are used), is saved as a Lightning
`.ckpt` with its `model.yaml`, converted with `ofa_ufo.converters.taming`, and compared in eval mode:
codes from `encode` identical, `decode` of the same codes within 1e-5, and the forward pass.

taming's `GumbelQuantize` draws Gumbel noise even in eval mode, so its codes are a sample; ours are the
argmax. For the comparison `F.gumbel_softmax` is replaced by the same function without the noise
(the rate at which taming's noisy samples equal our codes is printed for information).
"""

from __future__ import annotations

import importlib
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

pytestmark = pytest.mark.oracle
pytest.importorskip("einops")
pytest.importorskip("taming.modules.vqvae.quantize")

from ofa_ufo.converters.taming import convert_taming_checkpoint  # noqa: E402
from ofa_ufo.hf.modeling_vqgan import create_vqgan  # noqa: E402

from test_vqgan import F8_8192_PARAMETERS  # noqa: E402

TOL = 1e-5
DDCONFIG = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 4],
                num_res_blocks=2, attn_resolutions=[16, 4], dropout=0.0)
SCHEDULER = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
             "params": dict(warm_up_steps=0, max_decay_steps=1000, lr_start=0.9, lr_max=0.9, lr_min=1e-6)}
MODELS = {
    "gumbel": {"target": "taming.models.vqgan.GumbelVQ",
               "params": dict(embed_dim=32, n_embed=128, kl_weight=1e-3, ddconfig=DDCONFIG,
                              lossconfig={"target": "torch.nn.Identity"}, temperature_scheduler_config=SCHEDULER)},
    "vq": {"target": "taming.models.vqgan.VQModel",
           "params": dict(embed_dim=16, n_embed=128, ddconfig=DDCONFIG, lossconfig={"target": "torch.nn.Identity"})},
}


def _instantiate_from_config(config: dict):
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


@pytest.fixture(scope="module")
def taming_vqgan() -> types.ModuleType:
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = nn.Module
    main = types.ModuleType("taming.main")
    main.instantiate_from_config = _instantiate_from_config
    with mock.patch.dict(sys.modules, {"pytorch_lightning": lightning, "taming.main": main}):
        sys.modules.pop("taming.models.vqgan", None)
        return importlib.import_module("taming.models.vqgan")


def _taming_model(taming_vqgan: types.ModuleType, config: dict) -> nn.Module:
    """Instantiate `config` with the classes of the module the fixture imported (not a fresh import)."""
    return getattr(taming_vqgan, config["target"].rsplit(".", 1)[1])(**config["params"])


def _noise_free_gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """torch's gumbel_softmax with the Gumbel noise left out (hard: straight-through one-hot of the argmax)."""
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(logits).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def _build(taming_vqgan, kind: str, images: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = _taming_model(taming_vqgan, MODELS[kind]).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        if kind == "vq":  # codebook = the encoder's own features, jittered: every code is near some input
            z = model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1).reshape(-1, 16)  # (B*h*w, 16)
            table = model.quantize.embedding.weight
            table.copy_(z[torch.randint(len(z), (len(table),))] + 0.1 * z.std() * torch.randn_like(table))
    return model


def _convert(model: nn.Module, kind: str, tmp_path):
    ckpt = tmp_path / f"{kind}.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": model.state_dict()}, ckpt)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": MODELS[kind]}))
    return convert_taming_checkpoint(ckpt, tmp_path / "out", config=tmp_path / "model.yaml")


@pytest.mark.parametrize("kind", ["gumbel", "vq"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_codes_and_pixels_match_taming(taming_vqgan, kind, size, tmp_path, monkeypatch):
    images = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    theirs = _build(taming_vqgan, kind, images)
    ours = _convert(theirs, kind, tmp_path)
    b, h, w = images.shape[0], size[0] // 8, size[1] // 8
    with torch.no_grad():
        sampled = theirs.encode(images)[2][2].view(b, h, w)  # taming as is (Gumbel: noisy sample)
        monkeypatch.setattr(F, "gumbel_softmax", _noise_free_gumbel_softmax)
        their_codes = theirs.encode(images)[2][2].view(b, h, w)
        codes = ours.encode(images)
        assert torch.equal(codes, their_codes)
        their_z = theirs.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, ours.config.embed_dim))
        their_pixels = theirs.decode(their_z)
        pixel_diff = (ours.decode(codes, clamp=False) - their_pixels).abs().max().item()
        their_rec, their_loss = theirs(images)
        output = ours(images)
    rec_diff = (output.reconstruction - their_rec).abs().max().item()
    loss_diff = abs(output.quantizer_loss.item() - their_loss.item())
    print(f"\n[{kind} {size[0]}x{size[1]}] {codes.unique().numel()} distinct codes of {codes.numel()}, identical; "
          f"decode max abs diff {pixel_diff:.2e}; forward reconstruction {rec_diff:.2e}, quantiser loss "
          f"{loss_diff:.2e}; taming's own (noisy) codes equal ours at {sampled.eq(codes).float().mean():.0%}")
    assert codes.unique().numel() > 8  # the comparison is not between constant code maps
    assert pixel_diff < TOL and rec_diff < 10 * TOL and loss_diff < TOL


def test_f8_8192_gumbel_layout_and_size_match_taming(taming_vqgan):
    """taming's vqgan_gumbel_f8 (OFA's tokenizer) and our preset: same keys after conversion, same shapes."""
    from ofa_ufo.converters.taming import taming_to_ours

    ddconfig = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0)
    config = {"target": "taming.models.vqgan.GumbelVQ",
              "params": dict(embed_dim=256, n_embed=8192, kl_weight=1e-8, ddconfig=ddconfig,
                             lossconfig={"target": "torch.nn.Identity"}, temperature_scheduler_config=SCHEDULER)}
    with torch.device("meta"):
        theirs = _taming_model(taming_vqgan, config)
        ours = create_vqgan("vqgan_f8_8192_gumbel")
    their_shapes = {k: tuple(v.shape) for k, v in taming_to_ours(theirs.state_dict()).items()}
    assert their_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    count = sum(p.numel() for p in theirs.parameters())
    print(f"\n[f8-8192 gumbel] taming GumbelVQ {count:,} parameters, ours {F8_8192_PARAMETERS:,}")
    assert count == F8_8192_PARAMETERS
