"""The encoder-decoder KV cache of generation: self-attention and cross-attention caches in one object."""

from __future__ import annotations

import torch
from transformers.cache_utils import EncoderDecoderCache

__all__ = ["OFAUFOCache"]


class OFAUFOCache(EncoderDecoderCache):
    """Encoder-decoder KV cache whose beam reordering leaves the cross-attention K/V alone.

    Cross-attention keys/values depend only on the encoder output, which is the same for all
    beams of one input, and beam search only reorders rows within an input's beams; copying
    them every step (as the generic cache does) costs batch x beams x source length x d per
    layer and step for nothing.
    """

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)
