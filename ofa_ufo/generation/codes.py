"""Generating VQGAN code sequences (text-to-image, image infilling) and checking them.

A side x side code grid is generated row-major as side**2 code tokens, then </s>. The decoder
runs with `code_grid=side` (OFA's image positions for code targets) and the KV cache; with
`code_slice=True` the output projection multiplies only the code rows of the tied embedding
(`logits_range`), about V / num_codes times less work than the full vocabulary (7x for OFA's).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ofa_ufo.generation.constraints import CodeSequenceLogitsProcessor
from ofa_ufo.generation.scoring import RunningLogProb

__all__ = ["generate_codes", "tokens_to_codes"]

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


def generate_codes(
    model, inputs: dict[str, torch.Tensor], code_range: tuple[int, int], side: int, eos_token_id: int,
    code_slice: bool = True, **generate_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `num_return_sequences` (default 1) grids of side x side codes per input.

    code_range = (first, end) vocabulary ids of the codes that may be generated. Returns the code
    *token ids* (B, k, side**2), row-major, and their summed log-probabilities (B, k) under the
    codes-only distribution (before temperature / top-k / top-p). Other keyword arguments go to
    `model.generate` (`do_sample`, `top_k`, `top_p`, `temperature`, `use_cache`, ...); the length is
    fixed by `side` and beam search is refused.
    """
    fixed = sorted(set(_FIXED) & set(generate_kwargs))
    if fixed:
        raise ValueError(f"{fixed} cannot be set for image generation: the code count is fixed by the image "
                         f"size ({side}x{side} = {side * side} codes, then </s>); change image_size instead")
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("image generation samples (do_sample=True) or decodes greedily; num_beams must be 1")
    count = side * side
    recorder = RunningLogProb()
    processors = [CodeSequenceLogitsProcessor(*code_range, count, eos_token_id), recorder]
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
