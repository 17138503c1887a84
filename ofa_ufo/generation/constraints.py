"""Constrained decoding as `LogitsProcessor`s: a prefix trie over allowed sequences, or an id range.

The trie serves closed-set answers (VQA answer lists, class names); the range serves bins-only
(grounding) and codes-only (image generation) decoding. Both mask disallowed tokens to -inf
before the softmax, so beam scores are renormalised over the allowed set, as in OFA.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor


class Trie:
    """Prefix tree over token-id sequences."""

    def __init__(self, sequences: Iterable[Sequence[int]] = ()):
        self.root: dict[int, dict] = {}
        for sequence in sequences:
            self.insert(sequence)

    def insert(self, sequence: Sequence[int]) -> None:
        node = self.root
        for token in sequence:
            node = node.setdefault(int(token), {})

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow `prefix`; empty when the prefix is not in the trie or is complete."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return []
        return list(node)

    @classmethod
    def from_strings(cls, tokenizer, strings: Iterable[str]) -> "Trie":
        """Trie over BPE(string) + </s> for each string (write OFA's leading space into the string)."""
        encoded = tokenizer(list(strings), add_special_tokens=False)["input_ids"]
        return cls(ids + [tokenizer.eos_token_id] for ids in encoded)


class TrieLogitsProcessor(LogitsProcessor):
    """Allow only continuations found in `trie`; a finished or unknown prefix may only emit </s>.

    `prefix_length` tokens at the start of each decoder row (the start token, a forced prompt)
    are not part of the constrained answer.
    """

    def __init__(self, trie: Trie, eos_token_id: int, prefix_length: int = 1):
        self.trie = trie
        self.eos_token_id = eos_token_id
        self.prefix_length = prefix_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (rows, V)
        for row, ids in enumerate(input_ids[:, self.prefix_length :].tolist()):
            tokens = self.trie.next_tokens(ids) or [self.eos_token_id]
            allowed[row, tokens] = True
        return scores.masked_fill(~allowed, float("-inf"))


class TokenRangeLogitsProcessor(LogitsProcessor):
    """Allow only ids in [start, end), plus `extra_ids` (e.g. </s> once enough tokens are out)."""

    def __init__(self, start: int, end: int, extra_ids: Sequence[int] = ()):
        if not 0 <= start < end:
            raise ValueError(f"empty or negative token range [{start}, {end})")
        self.start, self.end = start, end
        self.extra_ids = list(extra_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.start : self.end] = True
        allowed[self.extra_ids] = True
        return scores.masked_fill(~allowed, float("-inf"))
