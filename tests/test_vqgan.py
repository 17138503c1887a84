"""VQGAN image tokenizer: shapes, bad input, training forward, save/load, presets and the taming converter."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModel

import ofa_ufo
from ofa_ufo.converters.taming import convert_taming_checkpoint, main as convert_main, read_taming_checkpoint
from ofa_ufo.hf.modeling_vqgan import VQGANConfig, VQGANModel, create_vqgan, create_vqgan_config

from conftest import RunsCode

# Parameters of taming's vqgan_gumbel_f8 (OpenImages, 8192 codes): its Encoder + Decoder + GumbelQuantize +
# quant convs at that config, counted by tests/test_vqgan_parity.py against taming's own GumbelVQ.
F8_8192_PARAMETERS = 68_995_971


def tiny(seed: int = 0, **overrides) -> VQGANModel:
    torch.manual_seed(seed)
    return create_vqgan("vqgan_tiny", **overrides).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny convolutions run faster on one thread, and do not fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> VQGANModel:
    return tiny()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_presets_and_unknown_names():
    assert {"vqgan_f8_8192_gumbel", "vqgan_tiny", "vqgan_demo"} <= set(ofa_ufo.list_vqgans())
    demo = create_vqgan_config("vqgan_demo")  # what the demo text-to-image run trains
    assert (demo.n_embed, demo.quantizer, demo.downsample_factor) == (256, "vq", 8)
    with pytest.raises(ValueError, match="Unknown VQGAN 'vqgan_nope'.*vqgan_tiny"):
        ofa_ufo.create_vqgan("vqgan_nope")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['chanels'\]"):
        VQGANConfig(chanels=3)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        VQGANConfig(quantizer="ema")
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48)
    with pytest.raises(ValueError, match=r"attn_resolutions=\[16\] must be level resolutions \[256, 128, 64, 32\]"):
        VQGANConfig(attn_resolutions=[16])


def test_full_f8_8192_model_shape_on_meta_device():
    with torch.device("meta"):
        big = create_vqgan("vqgan_f8_8192_gumbel.openimages")  # a tag after the dot names weights, not shape
    assert big.downsample_factor == 8 and big.code_grid(256, 256) == (32, 32)  # 1024 codes per image
    assert big.quantize.embedding.weight.shape == (8192, 256)
    assert sum(p.numel() for p in big.parameters()) == F8_8192_PARAMETERS


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_encode_decode_shapes_and_ranges(quantizer, pixels):
    model = tiny(quantizer=quantizer)
    codes = model.encode(pixels)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.n_embed
    images = model.decode(codes)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1.0
    assert torch.equal(model.decode(codes.flatten(1)), images)  # (B, h*h) row-major is accepted
    assert model.encode(pixels[:, :, :16, :24]).shape == (2, 2, 3)  # any multiple of f, not only `resolution`
    output = model(pixels)
    assert torch.equal(output.codes, codes)
    assert torch.equal(output.reconstruction.clamp(-1, 1), images)  # eval forward = decode(encode(x))


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_training_forward_gives_gradients_to_every_part(quantizer, pixels):
    model = tiny(quantizer=quantizer, kl_weight=1e-3).train()
    output = model(pixels)
    assert output.quantizer_loss.ndim == 0 and output.quantizer_loss > 0
    ((output.reconstruction - pixels).abs().mean() + output.quantizer_loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_bad_inputs_are_named(model, pixels):
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of the VQGAN downsampling factor 8"):
        model.encode(pixels[:, :, :30])
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \(B, 3, H, W\)"):
        model.encode(pixels[:, :1])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\).*\[0, 70\]"):
        model.decode(torch.tensor([[[0, 70]]]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(torch.tensor([[[-1, 3]]]))
    with pytest.raises(ValueError, match=r"shape \(B, h, w\).*got \(2, 5\)"):
        model.decode(torch.zeros(2, 5, dtype=torch.long))  # 5 codes: not a square grid
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode(torch.zeros(1, 2, 2))


def test_save_pretrained_round_trip_is_exact(model, pixels, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ofa-ufo-vqgan"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, VQGANModel) and not loaded.training
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    codes = model.encode(pixels)
    assert torch.equal(loaded.encode(pixels), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


# --- taming checkpoints -------------------------------------------------------------------------------

def taming_state_dict(model: VQGANModel) -> dict[str, torch.Tensor]:
    """Our weights in taming's key layout, plus loss/discriminator weights that the converter drops."""
    state = {("quantize.embed.weight" if k == "quantize.embedding.weight" and model.config.quantizer == "gumbel"
              else k): v.clone() for k, v in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    return state


def taming_yaml(config: VQGANConfig, target: str = "taming.models.vqgan.GumbelVQ") -> dict:
    ddconfig = dict(double_z=False, z_channels=config.z_channels, resolution=config.resolution, in_channels=3,
                    out_ch=3, ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    attn_resolutions=config.attn_resolutions + [1024], dropout=0.0)  # 1024: no such level
    params = dict(embed_dim=config.embed_dim, n_embed=config.n_embed, kl_weight=1e-8, ddconfig=ddconfig,
                  lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"})
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}


@pytest.fixture()
def lightning_checkpoint(model, tmp_path, monkeypatch):
    """A Lightning-style .ckpt: weights under state_dict, a Lightning class as a callback-state key, numpy."""
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # just enough for pickle to name the class
    lightning = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]
    checkpoint_class = type("ModelCheckpoint", (), {"__module__": lightning.__name__})
    lightning.ModelCheckpoint = checkpoint_class
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                "callbacks": {checkpoint_class: {"best_model_score": torch.tensor(0.5), "monitor": "val/rec_loss"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": np.float64(4.5e-6)}]}],
                "state_dict": taming_state_dict(model)}, path)
    for name in list(sys.modules):  # loading must not need Lightning's modules
        if name.startswith("pytorch_lightning"):
            monkeypatch.delitem(sys.modules, name)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(taming_yaml(model.config)))
    return path


def test_lightning_checkpoint_converts_exactly(model, pixels, lightning_checkpoint, tmp_path, capsys):
    output = tmp_path / "converted"
    convert_main(["--input", str(lightning_checkpoint), "--config", str(tmp_path / "model.yaml"),
                  "--output", str(output)])
    assert "gumbel, 64 codes, f=8" in capsys.readouterr().out
    converted = VQGANModel.from_pretrained(output)
    assert converted.config.attn_resolutions == [8]
    codes = model.encode(pixels)
    assert torch.equal(converted.encode(pixels), codes)
    assert torch.equal(converted.decode(codes), model.decode(codes))


def test_plain_state_dict_with_preset(pixels, tmp_path):
    vq = tiny(seed=3, quantizer="vq")
    path = tmp_path / "vq.pt"
    torch.save(taming_state_dict(vq), path)
    converted = convert_taming_checkpoint(path, config=vq.config)
    assert torch.equal(converted.encode(pixels), vq.encode(pixels))
    with pytest.raises(ValueError, match=r"missing: \['quantize.proj.bias', 'quantize.proj.weight'\]"):
        convert_taming_checkpoint(path, preset="vqgan_tiny")  # the Gumbel preset needs the logit projection


def test_mismatched_keys_are_named(model, tmp_path):
    state = taming_state_dict(model)
    del state["decoder.conv_out.bias"]
    state["quantize.extra"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"missing: \['decoder.conv_out.bias'\]\n  unexpected: \['quantize.extra'\]"):
        convert_taming_checkpoint(path, preset="vqgan_tiny")
    with pytest.raises(ValueError, match="shape mismatch: .*quantize.embedding.weight: checkpoint \\(64, 32\\) vs "
                                         "model \\(128, 32\\)"):
        convert_taming_checkpoint(path, config=VQGANConfig(**{**_tiny_fields(), "n_embed": 128}))


def _tiny_fields() -> dict:
    return {k: getattr(tiny().config, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                   "resolution", "z_channels", "embed_dim", "n_embed")}


def test_unsupported_taming_configs_are_refused(model, tmp_path):
    from ofa_ufo.converters.taming import config_from_taming

    with pytest.raises(ValueError, match="unsupported taming model target 'taming.models.vqgan.EMAVQ'"):
        config_from_taming(taming_yaml(model.config, target="taming.models.vqgan.EMAVQ"))
    remapped = taming_yaml(model.config)
    remapped["model"]["params"]["remap"] = "used.npy"
    with pytest.raises(ValueError, match="remap"):
        config_from_taming(remapped)
    assert config_from_taming(taming_yaml(model.config, "taming.models.vqgan.VQModel")).quantizer == "vq"


PWNED = "/tmp/ofa_ufo_vqgan_pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": RunsCode(PWNED)}, path)
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_taming_checkpoint(path)
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": RunsCode(PWNED)}))
    with pytest.raises(ValueError, match="refused to unpickle|not a readable checkpoint"):
        read_taming_checkpoint(raw)
    assert not os.path.exists(PWNED)


def test_truncated_checkpoint_is_named(lightning_checkpoint, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(lightning_checkpoint.read_bytes()[:4000])
    with pytest.raises(ValueError, match="cut.ckpt: not a readable checkpoint"):
        read_taming_checkpoint(cut)
