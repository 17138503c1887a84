"""Function-preserving growth of a trained small OFA-UFO model into a larger preset.

OFA's sizes step by whole factors (Tiny 256 -> Base 768 wide, 4 heads -> 12, FFN 1024 -> 3072, the
same 64-wide heads; ResNet-50 -> ResNet-101 differ only in the depth of stage 3), so a trained Tiny
can be written into a Base that computes exactly the same outputs (bert2BERT's function-preserving
initialisation, Chen et al. 2022; Net2Net, Chen et al. 2016):

- every width is tiled k times: unit i of the small model becomes units i, i + n, ..., i + (k-1) n,
  so 64-wide head h becomes heads h, h + H, ...; LayerNorm over a tiled vector gives the tiled
  normalised vector, GELU is element-wise;
- a Linear layer whose input is tiled splits each small weight over the k input copies with random
  shares that sum to 1 (the output is unchanged; the copies get different weights, so gradient
  descent can pull them apart instead of keeping k identical units forever);
- the decoder's final LayerNorm is divided by k: the output projection is tied to the (tiled)
  token embedding and would otherwise read k times the small model's logits;
- extra transformer layers are identity (their attention and FFN branches write zeros: NormFormer's
  post-attention norms and `fc2` zeroed; pre-LN layers add the branch to the residual), extra ResNet
  bottleneck blocks are identity (last BatchNorm scale and shift zeroed, the input is already >= 0).
"""

from __future__ import annotations

import torch
from torch import nn

SPLIT_SPREAD = 0.5  # shares of a split weight: (1 + spread * z) / k, z zero-mean over the k copies


class GrowthError(ValueError):
    """The small and the large model cannot be related by whole-factor tiling."""


def _width_factor(small, large) -> int:
    """k with every width of `large` = k x the one of `small`; GrowthError naming the field otherwise."""
    s, g = small.config, large.config
    if g.d_model % s.d_model:
        raise GrowthError(f"d_model {g.d_model} is not a whole multiple of the small model's {s.d_model}")
    k = g.d_model // s.d_model
    for side in ("encoder", "decoder"):
        pairs = {f"{side}_ffn_dim": (getattr(s, f"{side}_ffn_dim"), getattr(g, f"{side}_ffn_dim")),
                 f"{side}_attention_heads": (getattr(s, f"{side}_attention_heads"),
                                             getattr(g, f"{side}_attention_heads"))}
        for field, (a, b) in pairs.items():
            if b != k * a:
                raise GrowthError(f"{field} {b} is not {k} x the small model's {a} (d_model grows {k}x)")
        if getattr(g, f"{side}_layers") < getattr(s, f"{side}_layers"):
            raise GrowthError(f"{side}_layers {getattr(g, f'{side}_layers')} is fewer than the small model's "
                              f"{getattr(s, f'{side}_layers')}")
    for field in ("vocab_size", "image_size", "max_position_embeddings", "token_bucket_size", "image_bucket_size",
                  "attn_scale_factor", "normformer", "scale_heads"):
        if getattr(s, field) != getattr(g, field):
            raise GrowthError(f"{field} differs: {getattr(s, field)} (small) vs {getattr(g, field)} (large)")
    if s.vision_config.supernet_layers or g.vision_config.supernet_layers:
        raise GrowthError("growth covers the ResNet-stem models; a UFO supernet encoder is not grown")
    small_blocks, large_blocks = s.vision_config.resnet_layers, g.vision_config.resnet_layers
    if len(small_blocks) != len(large_blocks) or any(a > b for a, b in zip(small_blocks, large_blocks)):
        raise GrowthError(f"ResNet blocks per stage {tuple(large_blocks)} do not contain the small model's "
                          f"{tuple(small_blocks)}")
    return k


def _tile(value: torch.Tensor, shape: torch.Size, split_dim: int | None, generator: torch.Generator) -> torch.Tensor:
    """`value` tiled along every dim whose size grows by a whole factor; along `split_dim` (a Linear
    weight's input dim) each copy carries a random share of the value, the shares summing to 1."""
    out = value
    for dim, (small, large) in enumerate(zip(value.shape, shape)):
        if large == small:
            continue
        if large % small:
            raise GrowthError(f"size {large} is not a whole multiple of {small}")
        k = large // small
        if dim == split_dim:
            z = torch.randn((k, *out.shape), generator=generator, dtype=out.dtype)
            shares = (1 + SPLIT_SPREAD * (z - z.mean(0, keepdim=True))) / k  # (k, ...) summing to 1 over k
            out = torch.cat(list(out * shares), dim)
        else:
            out = torch.cat([out] * k, dim)
    return out


def _input_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> its dim fed by the (tiled) input activation: dim 1 of every Linear weight, except
    the output projection tied to the token embedding, which stays tiled like the embedding it is."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {f"{name}.weight" if name else "weight": 1 for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) not in embeddings}  # name "": `model` is one


def _identity_layer(layer: nn.Module) -> None:
    """Zero the residual branches of a pre-LN (NormFormer) encoder or decoder layer."""
    zeroed = [layer.self_attn_mid_layer_norm, layer.fc2, getattr(layer, "cross_attn_mid_layer_norm", None)]
    for module in zeroed:
        if module is None:
            continue
        if not isinstance(module, (nn.LayerNorm, nn.Linear)):
            raise GrowthError(f"cannot make {type(layer).__name__} an identity: {type(module).__name__} branch end")
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)


def _identity_bottleneck(block: nn.Module) -> None:
    nn.init.zeros_(block.bn3.weight)
    nn.init.zeros_(block.bn3.bias)


@torch.no_grad()
def grow_state(small_state: dict[str, torch.Tensor], large: nn.Module, generator: torch.Generator,
               split_dims: dict[str, int] | None = None) -> None:
    """Write each tensor of `small_state` into `large`'s tensor of the same name, tiled to its shape (split
    over the input copies where `split_dims`, default: every Linear weight, names the dim); names that
    `large` has and `small_state` lacks are left alone. Also grows a training-only head that reads the
    grown model's states (grounding's box-mask head, a Linear on the encoder output)."""
    split_dims = _input_dims(large) if split_dims is None else split_dims
    for name, param in large.state_dict().items():
        source = small_state.get(name)
        if source is None:
            continue
        if source.dim() != param.dim():
            raise GrowthError(f"{name}: {tuple(source.shape)} (small) and {tuple(param.shape)} (large) differ in rank")
        if source.dim() == 0:
            param.copy_(source)
            continue
        param.copy_(_tile(source.float(), param.shape, split_dims.get(name), generator).to(param.dtype))


@torch.no_grad()
def grow_model(small: nn.Module, large: nn.Module, seed: int = 0) -> nn.Module:
    """Write trained `small` into freshly built `large` (two `OFAUFOForConditionalGeneration`: this layer
    sits below `ofa_ufo.hf`, so it takes them as modules; in place, `large` returned) so that `large` computes
    `small`'s outputs: widths tiled, extra layers and ResNet blocks identity (module docstring).
    GrowthError when the two configs are not related by whole-factor widths and added depth."""
    k = _width_factor(small, large)
    generator = torch.Generator().manual_seed(seed)
    split_dims = _input_dims(large)
    small_state = small.state_dict()
    for side in ("encoder", "decoder"):
        stack = getattr(large.model, side)
        for index in range(getattr(small.config, f"{side}_layers"), len(stack.layers)):
            _identity_layer(stack.layers[index])
    stem = large.model.encoder.embed_images
    for stage, small_count in enumerate(small.config.vision_config.resnet_layers, start=1):
        for block in list(getattr(stem, f"layer{stage}"))[small_count:]:
            _identity_bottleneck(block)
    grow_state(small_state, large, generator, split_dims)  # added layers / blocks (set above) are skipped
    final = large.model.decoder.layer_norm  # tied output projection: tiled hidden . tiled embedding = k x logits
    final.weight.div_(k)
    final.bias.div_(k)
    return large
