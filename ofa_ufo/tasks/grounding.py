"""Visual grounding: a referring expression in, a box (four location bins) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ofa_ufo.generation import TokenRangeLogitsProcessor
from ofa_ufo.prompts import DEFAULT_STYLE
from ofa_ufo.tasks.base import Decoded, Task


@dataclass
class GroundingTask(Task):
    """Decodes exactly four bin tokens (bins-only constraint) and maps them to original-image pixels."""

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text or not text.strip():
            raise ValueError("task 'grounding' needs the phrase to find: pass text='...'")
        return super().prompt(text, style)

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        """Target: the four bin tokens of the box, coded against the original image size."""
        codec = meta["box_codec"]
        bins = codec.encode(example["box"], meta["original_size"], meta["input_size"])
        return self.prompt(example["text"], style), codec.to_text(bins[0])

    def generate_kwargs(self, config, tokenizer) -> dict[str, Any]:
        bins = TokenRangeLogitsProcessor(config.bin_offset, config.bin_offset + config.num_bins)
        return {**self.generation, "min_new_tokens": 4, "max_new_tokens": 4, "logits_processor": [bins]}

    def postprocess(self, decoded: Decoded, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        codec = meta["box_codec"]
        bins = codec.from_token_ids(decoded.tokens[:4], tokenizer.bin_offset)
        box = codec.decode(bins, meta["original_size"], meta["input_size"])[0]
        return {"boxes": [[round(float(v), 2) for v in box]], "labels": [meta["text"]], "scores": [decoded.probability]}
