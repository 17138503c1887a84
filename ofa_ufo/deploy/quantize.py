"""Dynamic int8 quantisation of a dense model for CPU deployment, in PyTorch (no ONNX needed).

    dense = ofa_ufo.extract_subnet(supernet, task="caption")     # a routed supernet must be extracted first
    int8 = ofa_ufo.quantize_int8_dynamic(dense)                  # Linear layers -> int8 weights
    int8.save_pretrained(DIR); processor.save_pretrained(DIR)
    pipe = pipeline("ofa-ufo", model=DIR)                         # AutoModelForSeq2SeqLM loads it too

Every plain `nn.Linear` of the encoder and decoder (attention projections, FFNs, image projection;
not the UFO blocks' elastic layers, which slice their weights, nor the ResNet stem's convolutions)
gets int8 weights, one symmetric scale per output row (`scale = max|w_row| / 127`), and runs as
`torch.ao.nn.quantized.dynamic.Linear`: activations are quantised per call, the matmul is int8
(fbgemm) and the output fp32. With `embeddings=True` (default) the token embedding is *stored* as
int8 rows + scales too and dequantised to fp32 when loaded (the lookup needs floating point). The tied
output projection (V x D, in a base model as many multiply-adds per decoded token as the whole decoder)
runs from the same int8 rows as a dynamic int8 Linear when `head=True` (default, config `int8_head`):
built when the model loads, nothing extra is stored. A `logits_range` (the code slice of image
generation) multiplies the fp32 rows instead.

The saved directory (config.json with model_type `ofa-ufo-int8`, model.safetensors) really holds
int8: for each quantised layer `<name>.weight` (int8, out x in) and `<name>.weight_scale` (fp32, out),
its `<name>.bias` in fp32, and every other tensor as saved by the fp32 model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import GenerationConfig

from ofa_ufo.deploy.subnets import extract_subnet
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.model_card import write_model_card
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.registration import register_seq2seq_variant
from ofa_ufo.layers.elastic import ElasticAttention, ElasticMLP

__all__ = ["OFAUFOInt8Config", "OFAUFOInt8ForConditionalGeneration", "WEIGHTS_FILE", "int8_linear_names",
           "quantize_int8_dynamic", "quantize_rows", "register"]

WEIGHTS_FILE = "model.safetensors"
EMBEDDING_KEY = "model.shared.weight"
OUTPUT_HEAD = "output_int8"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (out, in), scale fp32 (out,)) with weight ~= q * scale[:, None]."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_names(model: nn.Module) -> list[str]:
    """The layers to quantise: every module that is exactly `nn.Linear`, except those sharing the input
    embedding's weight (the tied output head) and those whose parent slices their weight instead of calling
    them (the UFO blocks' elastic attention and MLP, which stay fp32)."""
    tied = model.get_input_embeddings().weight
    sliced = {f"{parent}.{child}".lstrip(".") for parent, module in model.named_modules()
              if isinstance(module, (ElasticAttention, ElasticMLP)) for child, _ in module.named_children()}
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and module.weight is not tied and name not in sliced]


@strict(accept_kwargs=True)
class OFAUFOInt8Config(OFAUFOConfig):
    """The source model's fields under their own model type (the Auto classes then load the int8 class),
    plus `int8_linears` (the quantised layer names), `int8_embeddings` (the embedding stored as int8) and
    `int8_head` (the output projection computed in int8)."""

    model_type = "ofa-ufo-int8"
    int8_linears: list[str] | None = None
    int8_embeddings: bool = True
    int8_head: bool = True


def _packed_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 rows (out, in) and their scales (out,) as a per-row (axis 0) symmetric quantised tensor."""
    zero = torch.zeros_like(scale, dtype=torch.long)  # symmetric: no offset
    return torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)


def _submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


class OFAUFOInt8ForConditionalGeneration(OFAUFOForConditionalGeneration):
    """The PyTorch model with int8 dynamic Linear layers (module docstring); inference only."""

    config_class = OFAUFOInt8Config
    config: OFAUFOInt8Config

    def __init__(self, config: OFAUFOInt8Config) -> None:
        super().__init__(config)
        for name in config.int8_linears or []:
            parent, child = _submodule_parent(self, name)
            linear = getattr(parent, child)
            if type(linear) is not nn.Linear:
                raise ValueError(f"int8_linears names {name!r}, which is a {type(linear).__name__}, not nn.Linear")
            setattr(parent, child, DynamicInt8Linear(linear.in_features, linear.out_features,
                                                     bias_=linear.bias is not None, dtype=torch.qint8))
        # derived from the embedding's int8 rows when the weights load (never saved: OUTPUT_HEAD is skipped)
        self.output_int8 = (DynamicInt8Linear(config.d_model, config.vocab_size, bias_=False, dtype=torch.qint8)
                            if config.int8_head else None)
        self.eval()

    def project(self, states: torch.Tensor, logits_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Decoder states (B, T, D) -> logits (B, T, V): the int8 output head, or the fp32 rows for a
        `logits_range` (see `OFAUFOForConditionalGeneration.project`) or without `int8_head`."""
        if self.output_int8 is None or logits_range is not None:
            return super().project(states, logits_range)
        return self.output_int8(states)

    @classmethod
    def from_state(cls, config: OFAUFOInt8Config, state: dict[str, torch.Tensor],
                   generation_config: GenerationConfig | None = None) -> OFAUFOInt8ForConditionalGeneration:
        """The model from an int8 state (the saved layout, module docstring)."""
        model, state, names = cls(config), dict(state), config.int8_linears or []
        for name in names:
            missing = [k for k in (f"{name}.weight", f"{name}.weight_scale") if k not in state]
            if missing:
                raise KeyError(f"int8 weights lack {missing} (config.json's int8_linears names {name!r})")
            q, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")
            if q.dtype != torch.int8:
                raise ValueError(f"int8 weights: {name}.weight is {q.dtype}, expected torch.int8")
            model.get_submodule(name).set_weight_bias(_packed_rows(q, scale), state.pop(f"{name}.bias", None))
        if model.output_int8 is not None:
            embedding = state[EMBEDDING_KEY]
            rows = ((embedding, state[f"{EMBEDDING_KEY}_scale"]) if config.int8_embeddings
                    else quantize_rows(embedding))
            model.output_int8.set_weight_bias(_packed_rows(*rows), None)
        if config.int8_embeddings:
            state[EMBEDDING_KEY] = state[EMBEDDING_KEY].float() * state.pop(f"{EMBEDDING_KEY}_scale")[:, None]
        _load_float_state(model, state, names)
        if generation_config is not None:
            model.generation_config = generation_config
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any,
                        **kwargs: Any) -> OFAUFOInt8ForConditionalGeneration:
        """Load a directory written by `save_pretrained` (keyword arguments `pipeline` passes are ignored)."""
        path = Path(pretrained_model_name_or_path)
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an int8 model directory: no {WEIGHTS_FILE}")
        config = OFAUFOInt8Config.from_pretrained(path)
        generation = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
        return cls.from_state(config, load_file(str(path / WEIGHTS_FILE)), generation)

    def save_pretrained(self, save_directory: str | Path, *args: Any, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """config.json, generation_config.json and model.safetensors with the int8 layout."""
        if not is_main_process:
            return
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        self.generation_config.save_pretrained(path)
        state = _int8_state(self, self.config.int8_linears or [], self.config.int8_embeddings)
        save_file(state, str(path / WEIGHTS_FILE),
                  metadata={"format": "pt", "quantization": "ofa-ufo dynamic int8, per-row symmetric"})
        write_model_card(path, self.config)


def _load_float_state(model: nn.Module, state: dict[str, torch.Tensor], quantized: list[str]) -> None:
    """Load the floating-point tensors; a KeyError naming any the model expects and the state lacks."""
    inside = tuple(f"{name}." for name in quantized)
    expected = {key for key in _distinct_keys(model) if not key.startswith(inside)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"int8 weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # copied tensor by tensor: load_state_dict would make the int8 layers look for their own packed keys
    targets = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    with torch.no_grad():
        for key in expected:
            if targets[key].shape != state[key].shape:
                raise ValueError(f"int8 weights: {key} is {tuple(state[key].shape)}, the config makes "
                                 f"{tuple(targets[key].shape)}")
            targets[key].copy_(state[key])


def _distinct_keys(model: nn.Module) -> list[str]:
    """State keys with one key per tensor: tied weights (the output head, the encoder's and decoder's token
    embeddings) are saved once, under the shared embedding's key."""
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    keys = []
    for key in sorted(state, key=lambda k: k != EMBEDDING_KEY):
        if key.startswith(f"{OUTPUT_HEAD}."):  # the int8 output head: rebuilt from the embedding's rows
            continue
        if id(state[key]) not in seen:
            seen.add(id(state[key]))
            keys.append(key)
    return keys


def _int8_state(model: nn.Module, names: list[str], embeddings: bool) -> dict[str, torch.Tensor]:
    """The saved layout from a model whose `names` layers are fp32 nn.Linear or already int8."""
    inside = tuple(f"{name}." for name in names)
    full = model.state_dict()
    state = {k: full[k].detach().contiguous() for k in _distinct_keys(model) if not k.startswith(inside)}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DynamicInt8Linear):
            packed, bias = module._weight_bias()
            q, scale = packed.int_repr(), packed.q_per_channel_scales().float()
        else:
            (q, scale), bias = quantize_rows(module.weight), module.bias
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = q.contiguous(), scale.contiguous()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().float().contiguous()
    if embeddings:
        state[EMBEDDING_KEY], state[f"{EMBEDDING_KEY}_scale"] = quantize_rows(state[EMBEDDING_KEY])
    return state


def quantize_int8_dynamic(model: OFAUFOForConditionalGeneration, task: str | None = None,
                          embeddings: bool = True, head: bool = True) -> OFAUFOInt8ForConditionalGeneration:
    """An int8 copy of a dense fp32 model (module docstring); `model` is left unchanged. A routed UFO
    supernet is a ValueError unless `task` names the subnet to extract first (`ofa_ufo.extract_subnet`).
    `head=False` keeps the output projection in fp32."""
    if isinstance(model, OFAUFOInt8ForConditionalGeneration):
        raise ValueError("the model is already int8")
    vision = model.config.vision_config
    if vision.supernet_layers and vision.supernet_routed:
        if task is None:
            raise ValueError("a routed UFO supernet has no dense Linear layers to quantise: pass task=... "
                             "(or call ofa_ufo.extract_subnet(model, task) first)")
        model = extract_subnet(model, task)
    names = int8_linear_names(model)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    config = OFAUFOInt8Config(**{**fields, "int8_linears": names, "int8_embeddings": embeddings, "int8_head": head})
    return OFAUFOInt8ForConditionalGeneration.from_state(config, _int8_state(model, names, embeddings),
                                                         model.generation_config)


def register() -> None:
    """Register the `ofa-ufo-int8` config type with the Auto classes (idempotent; `import ofa_ufo` calls it)."""
    register_seq2seq_variant(OFAUFOInt8Config, OFAUFOInt8ForConditionalGeneration)
