"""The unified OFA vocabulary: byte-level BPE text, then VQGAN image codes, then location bins.

Id layout (exactly OFA's, so converted checkpoints keep their embedding rows)::

    0..3                      <s> <pad> </s> <unk>
    4..T-2                    byte-level BPE pieces (GPT-2 convention, "Ġ" = leading space)
    T-1                       <mask>
    T..T+num_codes-1          <code_0> .. <code_{num_codes-1}>
    T+num_codes..             <bin_0>  .. <bin_{num_bins-1}>

With OFA's BART ``vocab.json``/``merges.txt`` (T = 50,265) this gives ``<code_0>`` = 50265,
``<bin_0>`` = 58457 and 59,457 ids in all. Without files, a small BPE shipped in
``ofa_ufo/assets/tokenizer`` (built by ``docs/build_default_vocab.py``) is used, fully offline.

Codes and bins are added tokens (not special, so ``skip_special_tokens`` keeps them) with
``lstrip=True``: ``" region: <bin_1> <bin_2>"`` becomes ``... ":" <bin_1> <bin_2>`` with no
space pieces in between, which is what OFA's fairseq code feeds the model (it writes bin
strings without BPE). ``<mask>`` also absorbs the space before it, as in BART.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken
from transformers.models.bart.tokenization_bart import BartTokenizer

from ofa_ufo.hf.saved_files import check_files, local_directory, naming_files, tokenizer_files

__all__ = ["DEFAULT_VOCAB_DIR", "OFAUFOTokenizer", "build_tokenizer"]

DEFAULT_VOCAB_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"


class OFAUFOTokenizer(BartTokenizer):
    """BART's byte-level BPE tokenizer plus OFA's code and bin tokens.

    Saved with ``save_pretrained`` as ``tokenizer.json``; the code/bin layout is read back
    from the vocabulary itself, so it needs no extra config to survive a save/load.
    Build one with :func:`build_tokenizer`.
    """

    model_input_names = ["input_ids", "attention_mask"]
    _layout_cache: tuple[int, dict[str, tuple[int, int]]] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> OFAUFOTokenizer:
        """As transformers', but a truncated, non-JSON or wrong-type tokenizer file (tokenizer.json,
        tokenizer_config.json, special_tokens_map.json, added_tokens.json; vocab.json and merges.txt without
        a tokenizer.json) fails with an error naming the file (`ofa_ufo.hf.saved_files.SavedFileError`)."""
        directory = local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        files = tokenizer_files(directory)
        check_files(directory, files)
        # `tokenizers` raises a bare Exception for a tokenizer.json it cannot parse ("Model missing. at line 1 ...")
        with naming_files(directory, files, "the tokenizer", errors=(Exception,)):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _run(self, prefix: str) -> tuple[int, int]:
        """(id of ``<prefix_0>``, length of the contiguous run ``<prefix_0>``, ``<prefix_1>``, ...)."""
        backend = self.backend_tokenizer
        offset = backend.token_to_id(f"<{prefix}_0>")
        if offset is None:
            return -1, 0
        count = 0
        while backend.id_to_token(offset + count) == f"<{prefix}_{count}>":
            count += 1
        return offset, count

    def _layout(self, prefix: str) -> tuple[int, int]:
        # Cached per vocabulary size: tokens are only ever appended, never removed, so the cache holds while
        # no token has the id just past it (one lookup; len(self) walks every added token, and the data
        # pipeline asks for the bins once per example).
        cache = self._layout_cache
        if cache is None or self.backend_tokenizer.id_to_token(cache[0]) is not None:
            self._layout_cache = cache = (len(self), {p: self._run(p) for p in ("code", "bin")})
        return cache[1][prefix]

    @property
    def code_offset(self) -> int:
        """Id of ``<code_0>`` (where the codes would start if there are none: just before the bins)."""
        offset, count = self._layout("code")
        return offset if count else self.bin_offset

    @property
    def num_codes(self) -> int:
        """Number of VQGAN code tokens ``<code_k>``."""
        return self._layout("code")[1]

    @property
    def bin_offset(self) -> int:
        """Id of ``<bin_0>``."""
        offset, count = self._layout("bin")
        if not count:
            raise ValueError("this tokenizer has no <bin_k> tokens; build it with ofa_ufo.hf.tokenization.build_tokenizer")
        return offset

    @property
    def num_bins(self) -> int:
        """Number of location bin tokens ``<bin_k>``."""
        return self._layout("bin")[1]

    def bin_token(self, k: int) -> str:
        """The text of bin ``k``, e.g. ``"<bin_12>"``, checked against the vocabulary."""
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin index {k} out of range [0, {self.num_bins - 1}]")
        return f"<bin_{k}>"

    def code_token(self, k: int) -> str:
        """The text of image code ``k``, e.g. ``"<code_7>"``, checked against the vocabulary."""
        if not 0 <= k < self.num_codes:
            raise ValueError(f"code index {k} out of range [0, {self.num_codes - 1}]")
        return f"<code_{k}>"


def _read_vocab(path: Path) -> dict[str, int]:
    """Load ``vocab.json`` and check it has fairseq's specials at 0..3 and contiguous ids."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON vocabulary ({err})") from err
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping token strings to integer ids")
    found = [vocab.get(tok) for tok in SPECIAL_TOKENS]
    if found != [0, 1, 2, 3]:
        raise ValueError(
            f"{path}: expected the special tokens {list(SPECIAL_TOKENS)} at ids [0, 1, 2, 3] "
            f"(fairseq/BART layout), found ids {found}"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: token ids must be exactly 0..{len(vocab) - 1} with no gaps or duplicates")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Load GPT-2 style ``merges.txt`` (optional ``#version`` header, one ``left right`` pair per line)."""
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{lineno}: expected two space-separated pieces, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def build_tokenizer(
    vocab_file: str | None = None,
    merges_file: str | None = None,
    num_codes: int = 8192,
    num_bins: int = 1000,
) -> OFAUFOTokenizer:
    """Build the unified tokenizer from BART-layout ``vocab.json`` + ``merges.txt``.

    With no files, the default vocabulary shipped in the package is used (no network).
    ``<mask>`` is appended after the text pieces when the vocabulary lacks it; then
    ``num_codes`` ``<code_k>`` and ``num_bins`` ``<bin_k>`` tokens follow, in that order.
    """
    if (vocab_file is None) != (merges_file is None):
        raise ValueError("give both vocab_file and merges_file, or neither for the default vocabulary")
    if num_codes < 0 or num_bins < 1:
        raise ValueError(f"need num_codes >= 0 and num_bins >= 1, got {num_codes} and {num_bins}")
    vocab_path = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB_DIR / "vocab.json"
    merges_path = Path(merges_file) if merges_file is not None else DEFAULT_VOCAB_DIR / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")

    tokenizer = OFAUFOTokenizer(
        vocab=_read_vocab(vocab_path),
        merges=_read_merges(merges_path),
        mask_token=AddedToken(MASK_TOKEN, lstrip=True, rstrip=False, normalized=False, special=True),
    )
    text_size = len(tokenizer)
    # One batched add_tokens call: one at a time, 9,192 tokens take seconds instead of milliseconds.
    tokenizer.add_tokens(
        [AddedToken(f"<code_{k}>", lstrip=True, normalized=False, special=False) for k in range(num_codes)]
        + [AddedToken(f"<bin_{k}>", lstrip=True, normalized=False, special=False) for k in range(num_bins)]
    )
    if (tokenizer.num_codes, tokenizer.num_bins) != (num_codes, num_bins) or tokenizer.bin_offset != (
        text_size + num_codes
    ):
        raise ValueError(f"{vocab_path}: already contains <code_k>/<bin_k> entries; give a text-only vocabulary")
    return tokenizer
