"""Decoding helpers on top of transformers' `generate`."""

from ofa_ufo.generation.codes import generate_codes, tokens_to_codes
from ofa_ufo.generation.constraints import (
    CodeSequenceLogitsProcessor, TokenRangeLogitsProcessor, Trie, TrieLogitsProcessor,
)

__all__ = ["CodeSequenceLogitsProcessor", "TokenRangeLogitsProcessor", "Trie", "TrieLogitsProcessor",
           "generate_codes", "tokens_to_codes"]
