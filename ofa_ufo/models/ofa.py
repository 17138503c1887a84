"""OFA encoder and decoder assembled from the shared layers.

Encoder input is [image tokens ; text tokens]; positions enter only as attention biases
(decoupled absolute bias shared by all layers + per-layer 1-D text / 2-D image relative bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from ofa_ufo.layers.drop_path import linear_rates
from ofa_ufo.layers.inference_cache import cache_of
from ofa_ufo.layers.normformer import DecoderLayer, EncoderLayer
from ofa_ufo.layers.packed_linear import tracing
from ofa_ufo.layers.position import (
    absolute_bias,
    code_position_ids,
    image_position_ids,
    image_relative_buckets,
    relative_bias,
    split_heads,
    text_relative_buckets,
)
from ofa_ufo.models.resnet import OUT_CHANNELS, ResNetStem
from ofa_ufo.models.ufo import UFOSupernet

if TYPE_CHECKING:  # the config is read field by field; a type-only import keeps models/ below hf/
    from ofa_ufo.hf.configuration import OFAUFOConfig


@dataclass
class OFAUFOEncoderOutput(ModelOutput):
    """Encoder states plus what the decoder needs to attend to them.

    padding_mask (B, S) is True at padded or image-less positions; position_embeddings (B, S, D)
    are the encoder's normalised position embeddings, the key side of the cross-attention bias.
    cross_position_keys memoises the decoder's projection of them during cached generation, and
    self_position_keys the decoder's key projections of its own positions, per kind of target row
    (text, or codes on a grid of a given side), which grow by one step at a time.
    image_embedding (B, D) is the mean of the image tokens before the encoder layers (the "image"
    embedding read-out, `OFAUFOConfig.embedding_readout`); None without an image.
    """

    last_hidden_state: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    position_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cross_position_keys: torch.Tensor | None = None
    self_position_keys: dict[int, torch.Tensor] | None = None
    image_embedding: torch.Tensor | None = None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean 'blocked' mask -> additive float mask (0 where allowed, dtype min where blocked)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)


@dataclass
class _TargetPositions:
    """What one kind of decoder target (text, or VQGAN codes on one grid) brings to the decoder."""

    rows: torch.Tensor | None  # (R,) bool: the decoder rows of this kind; None = all rows
    self_bias: torch.Tensor  # (1, H, T, past+T): absolute position bias + causal mask
    cross_bias: torch.Tensor  # (B, H, T, S)
    rel_tables: nn.ModuleList  # per-layer relative-bias tables
    rel_index: torch.Tensor  # (T, past+T) indices into them
    norm: nn.LayerNorm  # LayerNorm of the token embeddings

    def layer_bias(self, idx: int) -> torch.Tensor:
        return self.self_bias + relative_bias(self.rel_tables[idx], self.rel_index)


def _by_row(kinds: list[_TargetPositions], values: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Pick each kind's value on its rows. `batch` is the result's row count: R decoder rows, or the B
    source rows that groups of R / B beams share (rows of one group are always of one kind)."""
    out = values[0]
    for kind, value in zip(kinds[1:], values[1:]):
        rows = kind.rows.view(batch, -1)[:, 0]
        out = torch.where(rows.view(-1, *[1] * (value.dim() - 1)), value, out)
    return out


def _rel_tables(count: int, entries: int, heads: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Embedding(entries, heads) for _ in range(count))


def _layer_kwargs(config: OFAUFOConfig) -> dict:
    return dict(
        dropout=config.dropout, attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout, activation=config.activation_function,
        normformer=config.normformer, scale_heads=config.scale_heads, scale_factor=config.attn_scale_factor,
    )


class _Stack(nn.Module):
    """What encoder and decoder share: position tables and norms, the layer stack with its
    per-layer relative-bias tables, the final LayerNorm."""

    def __init__(self, config: OFAUFOConfig, embed_tokens: nn.Embedding):
        super().__init__()
        dim = config.d_model
        self.config = config
        self.embed_tokens = embed_tokens  # shared by encoder, decoder and the output projection
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, dim)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, dim)
        self.pos_ln = nn.LayerNorm(dim)
        self.image_pos_ln = nn.LayerNorm(dim)

    def text_positions(self, length: int, device: torch.device, start: int = 0) -> torch.Tensor:
        """(1, length, D) normalised embeddings of text positions start..start+length-1."""
        if start + length > self.embed_positions.num_embeddings - 2:
            raise ValueError(
                f"sequence of {start + length} tokens exceeds max_position_embeddings="
                f"{self.embed_positions.num_embeddings - 2}"
            )
        return self.pos_ln(self.embed_positions(torch.arange(start, start + length, device=device)))[None]

    def _build_stack(self, config: OFAUFOConfig, layer_class: type[EncoderLayer], side: str) -> None:
        """Layers (drop path rising linearly), final LN and relative-bias tables of one side."""
        depth, heads = getattr(config, f"{side}_layers"), getattr(config, f"{side}_attention_heads")
        ffn_dim = getattr(config, f"{side}_ffn_dim")
        rates = linear_rates(getattr(config, f"{side}_drop_path_rate"), depth)
        self.num_heads = heads
        self.pos_scaling = (config.d_model / heads * config.attn_scale_factor) ** -0.5
        self.layers = nn.ModuleList(
            layer_class(config.d_model, heads, ffn_dim, drop_path=rates[i], layer_idx=i, **_layer_kwargs(config))
            for i in range(depth)
        )
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.token_rel_pos_table_list = _rel_tables(depth, 2 * config.token_bucket_size - 1, heads)
        image_entries = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.image_rel_pos_table_list = _rel_tables(depth, image_entries, heads)
        self.dropout = nn.Dropout(config.dropout)


class OFAEncoder(_Stack):
    def __init__(self, config: OFAUFOConfig, embed_tokens: nn.Embedding):
        super().__init__(config, embed_tokens)
        dim = config.d_model
        self.type_embedding = nn.Embedding(2, dim)
        vision = config.vision_config
        self.embed_images = ResNetStem(vision.resnet_layers, vision.resnet_drop_path_rate)
        self.supernet = None
        if vision.supernet_layers:
            self.supernet = UFOSupernet(vision, OUT_CHANNELS, config.image_bucket_size)
        self.image_proj = nn.Linear(vision.supernet_dim if self.supernet is not None else OUT_CHANNELS, dim)
        self.patch_layernorm_embedding = nn.LayerNorm(dim)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)
        self._build_stack(config, EncoderLayer, "encoder")

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D): token embedding + type 0, normalised."""
        x = self.embed_tokens(input_ids) + self.type_embedding.weight[0]
        return self.dropout(self.layernorm_embedding(x))

    def embed_image(
        self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> image tokens (B, h*w, D) and their grid position ids (h*w,)."""
        grid = self.embed_images(pixel_values)  # (B, C, h, w)
        height, width = grid.shape[-2:]
        if max(height, width) > self.config.image_bucket_size:
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} px gives a {height}x{width} grid; the 2-D "
                f"relative bias supports at most {self.config.image_bucket_size} per side"
            )
        tokens = grid.flatten(2).transpose(1, 2)  # (B, h*w, C)
        ids = image_position_ids(height, width, self.config.image_bucket_size, pixel_values.device)
        if self.supernet is not None:
            tokens = self.supernet(tokens, ids, task_ids)  # (B, h*w, supernet_dim)
        x = self.image_proj(tokens) + self.type_embedding.weight[1]
        return self.dropout(self.patch_layernorm_embedding(x)), ids

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        output_attentions: bool = False,
    ) -> OFAUFOEncoderOutput:
        """input_ids (B, T); pixel_values (B, 3, H, W) or None; image_mask (B,) False = no image."""
        if output_attentions:
            raise NotImplementedError("OFA-UFO attention runs through SDPA and does not return attention maps")
        x = self.embed_text(input_ids)
        pad = input_ids.eq(self.config.pad_token_id) if attention_mask is None else ~attention_mask.bool()
        positions = self.text_positions(input_ids.shape[1], input_ids.device)  # (1, T, D)
        image_ids = image_embedding = None
        if pixel_values is not None:
            image_x, image_ids = self.embed_image(pixel_values, task_ids)
            image_embedding = image_x.mean(1)  # (B, N, D) -> (B, D)
            image_pad = torch.zeros(image_x.shape[:2], dtype=torch.bool, device=x.device)
            if image_mask is not None:
                image_pad = image_pad | ~image_mask.bool()[:, None]
            x, pad = torch.cat([image_x, x], 1), torch.cat([image_pad, pad], 1)
            image_pos = self.image_pos_ln(self.embed_image_positions(image_ids))[None]  # (1, N, D)
            positions = torch.cat([image_pos, positions], 1)
        x = x * (~pad)[..., None].to(x.dtype)
        states = self._run_layers(x, pad, positions, image_ids, output_hidden_states)
        hidden_states = states if output_hidden_states else None
        return OFAUFOEncoderOutput(
            last_hidden_state=self.layer_norm(states[-1]),
            padding_mask=pad,
            position_embeddings=positions.expand(x.shape[0], -1, -1),
            hidden_states=hidden_states,
            image_embedding=image_embedding,
        )

    def _run_layers(
        self, x: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor | None,
        keep_all: bool,
    ) -> tuple[torch.Tensor, ...]:
        biases = self._position_biases(x, positions, image_ids)
        pad_bias = additive_mask(pad[:, None, None, :], biases[0].dtype) if pad.any() else 0.0  # (B, 1, 1, S)
        states = [x]
        for layer, bias in zip(self.layers, biases):
            x = layer(x, (bias, pad_bias) if torch.is_tensor(pad_bias) else bias)
            if keep_all:
                states.append(x)
        return tuple(states) if keep_all else (x,)

    def _position_biases(self, x: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor | None
                         ) -> list[torch.Tensor]:
        """Each layer's (1, H, S, S) position bias (absolute + relative). They depend on the weights and the
        layout (text length, image grid) only, not on the pixels or tokens: without gradients they are kept
        for the next forward with the same layout and unchanged weights (at Base, 384 px, the six gathers of
        584 x 584 positions and their sums were about a sixth of a one-image caption), one layout at a time."""
        if torch.is_grad_enabled() or tracing():  # an exported graph computes them from its inputs
            return self._build_position_biases(x, positions, image_ids)
        sources = self._bias_parameters()
        key = (x.shape[1], None if image_ids is None else tuple(image_ids.tolist()), positions.dtype, x.device)
        cached = cache_of(self).get("position_biases")
        # compared by value with a copy of the weights (about 1 % of the parameters): fused optimizers update
        # in place without bumping version counters, so only the values tell that the weights moved
        if (cached is None or cached[0] != key or len(cached[2]) != len(sources)
                or not all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                           for a, b in zip(cached[2], sources))):
            cached = (key, self._build_position_biases(x, positions, image_ids),
                      [p.detach().clone() for p in sources])
            cache_of(self)["position_biases"] = cached  # beside the module: never saved, moved, cast or copied
        return cached[1]

    def _bias_parameters(self) -> list[torch.Tensor]:
        """The parameters a position bias is computed from (what `_position_biases` compares its copy with)."""
        modules = [self.pos_q_linear, self.pos_k_linear, self.embed_positions, self.pos_ln,
                   self.embed_image_positions, self.image_pos_ln, self.token_rel_pos_table_list,
                   self.image_rel_pos_table_list]
        return [p for module in modules for p in module.parameters()]

    def _build_position_biases(self, x: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor | None
                               ) -> list[torch.Tensor]:
        abs_bias = absolute_bias(
            self.pos_q_linear, self.pos_k_linear, positions, positions, self.num_heads, self.pos_scaling
        )  # (1, H, S, S)
        n_image = 0 if image_ids is None else image_ids.numel()
        text_index = text_relative_buckets(self.config.token_bucket_size, self.config.max_position_embeddings)
        text_len = x.shape[1] - n_image
        text_entries = self.token_rel_pos_table_list[0].num_embeddings
        image_entries = self.image_rel_pos_table_list[0].num_embeddings
        # One (S, S) index into [text table; image table; a zero row] per forward: each layer's relative
        # bias is then a single gather (image-text pairs read the zero row)
        index = torch.full((x.shape[1], x.shape[1]), text_entries + image_entries, dtype=torch.long, device=x.device)
        index[n_image:, n_image:] = text_index[:text_len, :text_len]
        if image_ids is not None:
            image_index = image_relative_buckets(self.config.image_bucket_size).to(x.device)
            index[:n_image, :n_image] = image_index[image_ids[:, None], image_ids[None, :]] + text_entries  # (N, N)
        zero_row = abs_bias.new_zeros(1, self.num_heads)
        biases = []
        for idx in range(len(self.layers)):
            table = torch.cat([self.token_rel_pos_table_list[idx].weight, self.image_rel_pos_table_list[idx].weight,
                               zero_row])  # (text + image entries + 1, H)
            biases.append(abs_bias + relative_bias(table, index))  # (1, H, S, S); padding stays a (B, 1, 1, S) term
        return biases


class OFADecoder(_Stack):
    def __init__(self, config: OFAUFOConfig, embed_tokens: nn.Embedding):
        super().__init__(config, embed_tokens)
        dim = config.d_model
        # Embedding norm of rows whose target is a VQGAN code grid (image generation, see `forward`).
        self.code_layernorm_embedding = nn.LayerNorm(dim)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        self._build_stack(config, DecoderLayer, "decoder")

    def forward(
        self, input_ids: torch.Tensor, encoder_outputs: OFAUFOEncoderOutput, cache: Cache | None = None,
        code_grid: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (R, T) new target tokens (after `cache` holds the earlier ones) -> states (R, T, D).

        `code_grid` marks rows whose target is a grid of VQGAN codes (OFA's `code_masks`): an int for
        all rows or an (R,) long tensor, 0 for a text row and s for an s x s code grid. Such rows get
        image positions (OFA's `image_position_idx`), the 2-D relative bias and
        `code_layernorm_embedding` instead of text positions, the 1-D bias and `layernorm_embedding`.
        """
        past = cache.get_seq_length() if cache is not None else 0
        kinds = self._target_kinds(code_grid, past, input_ids.shape[1], encoder_outputs, cached=cache is not None)
        rows, sources = input_ids.shape[0], encoder_outputs.last_hidden_state.shape[0]
        embedded = self.embed_tokens(input_ids)
        x = self.dropout(_by_row(kinds, [kind.norm(embedded) for kind in kinds], rows))
        cross_bias = _by_row(kinds, [kind.cross_bias for kind in kinds], sources)  # (B, H, T, S)
        memory = encoder_outputs.last_hidden_state
        for idx, layer in enumerate(self.layers):
            self_bias = _by_row(kinds, [kind.layer_bias(idx) for kind in kinds], rows)  # (1 or R, H, T, past+T)
            x = layer(x, self_bias, memory, cross_bias, cache)
        return self.layer_norm(x)

    def _target_kinds(
        self, code_grid: int | torch.Tensor | None, past: int, length: int, encoder_outputs: OFAUFOEncoderOutput,
        cached: bool,
    ) -> list[_TargetPositions]:
        """One entry per kind of target row in the batch: text (side 0) and each code-grid side."""
        if code_grid is None or isinstance(code_grid, int):
            sides, grid = [int(code_grid or 0)], None
        else:
            grid = code_grid.flatten()
            sides = sorted(set(grid.tolist()))
        kinds = []
        for side in sides:
            rows = None if len(sides) == 1 else grid == side
            kinds.append(self._code_kind(side, rows, past, length, encoder_outputs, cached) if side
                         else self._text_kind(rows, past, length, encoder_outputs, cached))
        return kinds

    def _text_kind(self, rows, past: int, length: int, encoder_outputs: OFAUFOEncoderOutput, cached: bool):
        device = encoder_outputs.last_hidden_state.device
        steps = torch.arange(past + length)
        if rows is None:
            positions = self.text_positions(past + length, device)  # (1, past+T, D); fails past the table
        else:  # text rows padded to a longer code row: only their padding can lie past the table (causal)
            steps = steps.clamp(max=self.config.max_position_embeddings - 1)
            positions = self.pos_ln(self.embed_positions(steps.to(device)))[None]  # (1, past+T, D)
        index = text_relative_buckets(self.config.token_bucket_size, self.config.max_position_embeddings)
        index = index[steps[past:, None], steps[None, :]].to(device)  # (T, past+T)
        return self._kind(0, rows, positions, past, encoder_outputs, cached, self.token_rel_pos_table_list, index,
                          self.layernorm_embedding)

    def _code_kind(self, side: int, rows, past: int, length: int, encoder_outputs: OFAUFOEncoderOutput, cached: bool):
        device = encoder_outputs.last_hidden_state.device
        bucket = self.config.image_bucket_size
        ids = code_position_ids(side, past + length, bucket, torch.device("cpu"))  # (past+T,)
        index = image_relative_buckets(bucket)[ids[past:, None], ids[None, :]].to(device)  # (T, past+T)
        positions = self.image_pos_ln(self.embed_image_positions(ids.to(device)))[None]  # (1, past+T, D)
        return self._kind(side, rows, positions, past, encoder_outputs, cached, self.image_rel_pos_table_list, index,
                          self.code_layernorm_embedding)

    def _kind(self, side, rows, positions, past, encoder_outputs, cached, tables, index, norm) -> _TargetPositions:
        """Biases from normalised target positions (1, past+T, D): absolute + causal self bias, cross bias."""
        new_positions = positions[:, past:]
        length = new_positions.shape[1]
        queries = split_heads(self.self_pos_q_linear(new_positions), self.num_heads) * self.pos_scaling
        keys = self._self_position_keys(side, positions, encoder_outputs, cached)  # (1, H, past+T, D/H)
        self_bias = queries @ keys.transpose(-1, -2)  # (1, H, T, past+T)
        causal = torch.ones(length, past + length, dtype=torch.bool, device=positions.device).triu(past + 1)
        self_bias = self_bias + additive_mask(causal, self_bias.dtype)
        cross_bias = self._cross_bias(new_positions, encoder_outputs, cached)  # (B, H, T, S)
        return _TargetPositions(rows, self_bias, cross_bias, tables, index, norm)

    def _self_position_keys(
        self, side: int, positions: torch.Tensor, encoder_outputs: OFAUFOEncoderOutput, cached: bool
    ) -> torch.Tensor:
        """Key projections of target positions (1, past+T, D) -> (1, H, past+T, D/H). During cached
        generation only the new positions are projected (1,024 codes would otherwise cost K x D^2 per step)."""
        if not cached:
            return split_heads(self.self_pos_k_linear(positions), self.num_heads)
        memo = encoder_outputs.self_position_keys or {}
        known = memo.get(side)
        have = 0 if known is None else known.shape[2]
        if have < positions.shape[1]:
            new = split_heads(self.self_pos_k_linear(positions[:, have:]), self.num_heads)
            known = new if known is None else torch.cat([known, new], 2)
            memo[side] = known
            encoder_outputs["self_position_keys"] = memo
        return known[:, :, : positions.shape[1]]

    def _cross_bias(
        self, new_positions: torch.Tensor, encoder_outputs: OFAUFOEncoderOutput, cached: bool
    ) -> torch.Tensor:
        """Absolute bias from decoder to encoder positions plus the encoder padding mask: (B, H, T, S)."""
        keys = encoder_outputs.cross_position_keys if cached else None
        if keys is None:
            keys = split_heads(self.cross_pos_k_linear(encoder_outputs.position_embeddings), self.num_heads)
            if cached:
                encoder_outputs["cross_position_keys"] = keys
        queries = split_heads(self.cross_pos_q_linear(new_positions), self.num_heads) * self.pos_scaling
        bias = queries @ keys.transpose(-1, -2)  # (B, H, T, S)
        pad = encoder_outputs.padding_mask
        if pad is not None and pad.any():
            bias = bias + additive_mask(pad[:, None, None, :], bias.dtype)
        return bias
