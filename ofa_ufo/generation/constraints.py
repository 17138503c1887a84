"""Constrained decoding as `LogitsProcessor`s: a prefix trie over allowed sequences, or an id range.

The trie serves closed-set answers (VQA answer lists, class names); the range serves bins-only
(grounding) and codes-only (image generation) decoding, and its complement text-only decoding
(no `<code_N>` / `<bin_N>` in a caption or an answer). All mask disallowed tokens to -inf
before the softmax, so beam scores are renormalised over the allowed set, as in OFA.

Boxes are well formed by construction: inside a box of four bins (x0 y0 x1 y1) x0 and y0 leave
room for a larger corner and x1 > x0, y1 > y0 (`allow_box_bins`), so a decoded box always has
positive area whatever the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList


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


class BanTokenRangeLogitsProcessor(LogitsProcessor):
    """Forbid ids in [start, end) (`end` None: to the end of the vocabulary). Text tasks ban from the
    first `<code_N>` on: image codes, location bins and any task tokens after them."""

    def __init__(self, start: int, end: int | None = None):
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"empty or negative token range [{start}, {end})")
        self.start, self.end = start, end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.start : self.end] = float("-inf")
        return scores


def end_banned(eos_token_id: int | Sequence[int]) -> LogitsProcessorList:
    """Processors that make greedy or beam search run to `max_new_tokens` (benchmarks time a fixed length): the
    end token (the first, where the generation config lists several) banned, one slice write per step.
    transformers' `min_new_tokens` does it with two vocabulary-wide isin / clone / where passes per step, work
    a real request does not do, added to every model alike (it pulls latency ratios towards 1)."""
    eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    return LogitsProcessorList([BanTokenRangeLogitsProcessor(eos, eos + 1)])


def allow_box_bins(allowed: torch.Tensor, bin_start: int, bin_end: int, box: Sequence[int]) -> None:
    """Set in `allowed` (V,) the bin ids that may follow the open box's first bin ids `box` (0 to 3 of
    them): x0 and y0 below the last bin, x1 above x0, y1 above y0."""
    if len(box) < 2:
        allowed[bin_start : bin_end - 1] = True
    else:
        allowed[box[len(box) - 2] + 1 : bin_end] = True


class CodeSequenceLogitsProcessor(LogitsProcessor):
    """Exactly `count` tokens from [start, end) (VQGAN code tokens), then </s> (OFA's codes-only
    `constraint_range` with the length fixed by the code grid).

    The </s> step is forced: its score is set to 0 and every other to -inf, so it works when only the
    code rows' logits were computed (`logits_range`), where </s> itself is -inf.
    """

    def __init__(self, start: int, end: int, count: int, eos_token_id: int, prefix_length: int = 1):
        if not 0 <= start < end:
            raise ValueError(f"empty or negative token range [{start}, {end})")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.start, self.end, self.count = start, end, count
        self.eos, self.prefix_length = eos_token_id, prefix_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prefix_length < self.count:
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            allowed[self.start : self.end] = True
            return scores.masked_fill(~allowed, float("-inf"))
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos] = 0.0
        return forced


class BoxSequenceLogitsProcessor(LogitsProcessor):
    """Zero to `max_boxes` boxes of four bin tokens, or one "no object" token, then </s>.

    Inside a box only bins are allowed, with positive width and height (`allow_box_bins`); after
    each complete box, another box or </s>; at the start, a box or `none_token_id` (when given),
    which must be followed by </s>.
    """

    def __init__(self, bin_start: int, bin_end: int, eos_token_id: int, max_boxes: int = 1,
                 none_token_id: int | None = None, prefix_length: int = 1):
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.bins = (bin_start, bin_end)
        self.eos, self.none, self.max_boxes, self.prefix_length = eos_token_id, none_token_id, max_boxes, prefix_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (rows, V)
        for row, ids in enumerate(input_ids[:, self.prefix_length :].tolist()):
            done = len(ids)
            if done and ids[0] == self.none:
                allowed[row, self.eos] = True
                continue
            if done % 4 or done // 4 < self.max_boxes:
                allow_box_bins(allowed[row], *self.bins, ids[done - done % 4 :])
            if done and done % 4 == 0:
                allowed[row, self.eos] = True
            if done == 0 and self.none is not None:
                allowed[row, self.none] = True
        return scores.masked_fill(~allowed, float("-inf"))


class DetectionLogitsProcessor(LogitsProcessor):
    """Pix2Seq-style object sequences: `<bin> x4 label <bin> x4 label ... </s>`.

    Four bins open an object (a box of positive area, `allow_box_bins`); its label follows (from
    `label_trie` when given, else any non-bin text token) and is complete before the next object
    or </s> may start.
    """

    def __init__(self, bin_start: int, bin_end: int, eos_token_id: int, text_end: int, special_ids: Sequence[int],
                 label_trie: Trie | None = None, prefix_length: int = 1):
        self.bin_start, self.bin_end, self.eos, self.text_end = bin_start, bin_end, eos_token_id, text_end
        self.special_ids = list(special_ids)
        self.trie, self.prefix_length = label_trie, prefix_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (rows, V)
        for row, ids in enumerate(input_ids[:, self.prefix_length :].tolist()):
            self._allow(allowed[row], *self._state(ids))
        return scores.masked_fill(~allowed, float("-inf"))

    def _state(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(bin ids of the last box, label tokens after it when it is complete)."""
        box, label = [], []
        for token in ids:
            if self.bin_start <= token < self.bin_end:
                box, label = ([token] if label or len(box) == 4 else box + [token]), []
            else:
                label.append(token)
        return box, label

    def _allow(self, allowed: torch.Tensor, box: list[int], label: list[int]) -> None:
        if not box or (len(box) == 4 and label and self._label_complete(label)):
            allow_box_bins(allowed, self.bin_start, self.bin_end, [])  # a new box
            allowed[self.eos] = True
        if 0 < len(box) < 4:
            allow_box_bins(allowed, self.bin_start, self.bin_end, box)
        elif len(box) == 4:
            self._allow_label(allowed, label)

    def _label_complete(self, label: list[int]) -> bool:
        return self.trie is None or self.eos in self.trie.next_tokens(label)

    def _allow_label(self, allowed: torch.Tensor, label: list[int]) -> None:
        if self.trie is not None:
            allowed[[t for t in self.trie.next_tokens(label) if t != self.eos]] = True
            return
        allowed[: self.text_end] = True  # free text labels: text tokens, no specials
        allowed[self.special_ids] = False
        if label:
            allow_box_bins(allowed, self.bin_start, self.bin_end, [])
            allowed[self.eos] = True
