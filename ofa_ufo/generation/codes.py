"""Generating VQGAN code sequences (text-to-image, image infilling) and checking them.

A side x side code grid is generated row-major as side**2 code tokens, then </s>. The decoder
runs with `code_grid=side` (OFA's image positions for code targets) and the KV cache; with
`code_slice=True` the output projection multiplies only the code rows of the tied embedding
(`logits_range`), about V / num_codes times less work than the full vocabulary (7x for OFA's).

`guidance_scale` > 1 turns on classifier-free guidance (Ho & Salimans 2022; used for token models by
Make-A-Scene and Parti): a second decoder, on an unconditional prompt (the task's prompt with an empty
caption, which a model trained with `caption_dropout` has seen), runs beside `generate` on the same
tokens, and each step samples from log p_u + s (log p_c - log p_u), which sharpens what the caption
says about the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicCache

from ofa_ufo.generation.constraints import CodeSequenceLogitsProcessor
from ofa_ufo.generation.scoring import RunningLogProb
from ofa_ufo.layers.kv_cache import OFAUFOCache

__all__ = ["CodeGuidance", "generate_codes", "tokens_to_codes"]

_FIXED = ("max_new_tokens", "min_new_tokens", "max_length", "min_length")
# transformers warns when a sequence outgrows config.max_position_embeddings (1,024 codes + <s> + </s> do);
# code rows take image positions, not text positions, so the warning does not apply to them.
_LENGTH_REMINDER = "transformers.generation.stopping_criteria"


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CodeGuidance(LogitsProcessor):
    """Classifier-free guidance for code generation: scores -> log p_u + scale (log p_c - log p_u).

    `unconditional` holds the encoder inputs of one unconditional prompt (1 row); its encoder runs
    once, and its decoder follows the tokens `generate` chooses with a KV cache of its own (one
    extra decoder step per generated code). Tokens the constraints ruled out (-inf) stay out, and a
    step with no code left to choose (the forced </s>) passes unchanged. Put it after the code
    constraint and before the sampling warpers.
    """

    def __init__(self, model, unconditional: dict[str, torch.Tensor], scale: float, side: int,
                 code_range: tuple[int, int] | None = None) -> None:
        if unconditional["input_ids"].shape[0] != 1:
            raise ValueError(f"the unconditional prompt must be one row, got {unconditional['input_ids'].shape[0]}")
        self.model, self.scale, self.side, self.code_range = model, float(scale), side, code_range
        with torch.inference_mode():
            self.encoder_outputs = model.get_encoder()(**unconditional)  # (1, L, D), shared by every row
        self.cache = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        first = self.cache is None
        if first:
            self.cache = OFAUFOCache(DynamicCache(), DynamicCache())
        with torch.inference_mode():
            out = self.model(encoder_outputs=self.encoder_outputs, decoder_input_ids=input_ids if first else input_ids[:, -1:],
                             cache=self.cache, use_cache=True, code_grid=self.side, logits_range=self.code_range,
                             logits_to_keep=1)
        conditional = scores.float().log_softmax(-1)  # (R, V), over what the constraints allow
        allowed = torch.isfinite(conditional) & torch.isfinite(out.logits[:, -1])
        forced = ~allowed.any(-1, keepdim=True)  # (R, 1): the closing </s>, which the code slice leaves at -inf
        if forced.all():
            return scores
        # both distributions over the same allowed tokens
        unconditional = out.logits[:, -1].float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
        guided = unconditional + self.scale * (conditional - unconditional)
        guided = torch.where(allowed, guided, torch.full_like(guided, float("-inf"))).to(scores.dtype)
        return torch.where(forced, scores, guided)


def generate_codes(
    model, inputs: dict[str, torch.Tensor], code_range: tuple[int, int], side: int, eos_token_id: int,
    code_slice: bool = True, guidance_scale: float = 1.0, unconditional: dict[str, torch.Tensor] | None = None,
    **generate_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `num_return_sequences` (default 1) grids of side x side codes per input.

    code_range = (first, end) vocabulary ids of the codes that may be generated. Returns the code
    *token ids* (B, k, side**2), row-major, and their summed log-probabilities (B, k) under the
    codes-only distribution (guided when `guidance_scale` != 1; before temperature / top-k / top-p).
    `guidance_scale` != 1 needs `unconditional`, the encoder inputs of the unconditional prompt (see
    `CodeGuidance`). Other keyword arguments go to `model.generate` (`do_sample`, `top_k`, `top_p`,
    `temperature`, `use_cache`, ...); the length is fixed by `side` and beam search is refused.
    """
    fixed = sorted(set(_FIXED) & set(generate_kwargs))
    if fixed:
        raise ValueError(f"{fixed} cannot be set for image generation: the code count is fixed by the image "
                         f"size ({side}x{side} = {side * side} codes, then </s>); change image_size instead")
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("image generation samples (do_sample=True) or decodes greedily; num_beams must be 1")
    if guidance_scale != 1.0 and unconditional is None:
        raise ValueError("guidance_scale != 1 needs the unconditional prompt's encoder inputs (unconditional=...)")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
    count = side * side
    recorder = RunningLogProb()
    processors = [CodeSequenceLogitsProcessor(*code_range, count, eos_token_id)]
    if guidance_scale != 1.0:
        processors.append(CodeGuidance(model, unconditional, guidance_scale, side, code_range if code_slice else None))
    processors.append(recorder)
    processors += list(generate_kwargs.pop("logits_processor", None) or [])
    per_input = generate_kwargs.get("num_return_sequences", 1)
    kwargs = dict(generate_kwargs, max_new_tokens=count + 1, logits_processor=processors, code_grid=side)
    if code_slice:
        kwargs["logits_range"] = code_range
    with torch.inference_mode(), _quiet(_LENGTH_REMINDER):
        sequences = model.generate(**inputs, **kwargs)  # (B * k, 1 + count + 1): <s>, codes, </s>
    tokens = sequences[:, 1 : 1 + count]
    return tokens.reshape(-1, per_input, count), recorder.total.reshape(-1, per_input)


def tokens_to_codes(tokens: torch.Tensor | Sequence[int], code_offset: int, num_codes: int, count: int) -> torch.Tensor:
    """Code token ids (..., count) -> code indices (..., count) in [0, num_codes).

    ValueError when the last dimension is not `count` (the grid's side**2) or when any id is not one
    of `<code_0>`..`<code_{num_codes-1}>` (the offending ids are named).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 0 or tokens.shape[-1] != count:
        length = 0 if tokens.ndim == 0 else tokens.shape[-1]
        side = math.isqrt(count)
        grid = f" ({side}x{side} grid)" if side * side == count else ""
        raise ValueError(f"expected {count} code tokens{grid}, got a sequence of {length}")
    bad = (tokens < code_offset) | (tokens >= code_offset + num_codes)
    if bad.any():
        offending = sorted(set(tokens[bad].tolist()))
        raise ValueError(
            f"token ids {offending[:10]}{' ...' if len(offending) > 10 else ''} are not VQGAN code tokens "
            f"(<code_0>..<code_{num_codes - 1}> = ids {code_offset}..{code_offset + num_codes - 1})"
        )
    return tokens.long() - code_offset
