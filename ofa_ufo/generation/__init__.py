"""Decoding helpers on top of transformers' `generate`."""

from ofa_ufo.generation.constraints import TokenRangeLogitsProcessor, Trie, TrieLogitsProcessor

__all__ = ["TokenRangeLogitsProcessor", "Trie", "TrieLogitsProcessor"]
