"""The unified vocabulary: OFA's id layout, bins inside text, save/load, BART-layout files, errors."""

from __future__ import annotations

import json
import time

import pytest
from tokenizers import pre_tokenizers

from ofa_ufo.hf.tokenization import DEFAULT_VOCAB_DIR, OFAUFOTokenizer, build_tokenizer

TEXTS = [
    " what does the image describe?",
    ' which region does the text " the red circle " describe?',
    "  what does the region describe? region: <bin_1> <bin_2> <bin_998> <bin_999>",
    "<bin_10> <bin_20> <bin_30> <bin_40> circle <bin_5> <bin_6> <bin_7> <bin_8> star",
    " what is the complete text of \" a <mask> square \"?",
    "<code_0> <code_8191> Ünïcödé 日本 😀",
]


@pytest.fixture(scope="module")
def tokenizer() -> OFAUFOTokenizer:
    return build_tokenizer()


def test_default_layout(tokenizer):
    text_size = len(json.loads((DEFAULT_VOCAB_DIR / "vocab.json").read_text(encoding="utf-8")))
    assert text_size == 8000
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.mask_token_id == text_size - 1
    assert tokenizer.code_offset == text_size and tokenizer.num_codes == 8192
    assert tokenizer.bin_offset == text_size + 8192 and tokenizer.num_bins == 1000
    assert len(tokenizer) == text_size + 8192 + 1000
    assert tokenizer.convert_tokens_to_ids(["<code_8191>", "<bin_0>", "<bin_999>"]) == [
        tokenizer.bin_offset - 1,
        tokenizer.bin_offset,
        len(tokenizer) - 1,
    ]
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]


def test_build_is_fast():
    start = time.perf_counter()
    build_tokenizer()
    assert time.perf_counter() - start < 1.0


def test_source_layout_and_leading_space(tokenizer):
    ids = tokenizer(" what does the image describe?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["Ġwhat", "Ġdoes"]


def test_bins_inside_text_are_single_tokens(tokenizer):
    ids = tokenizer(" region: <bin_1> <bin_2> <bin_12> <bin_999>", add_special_tokens=False)["input_ids"]
    bins = [tokenizer.bin_offset + k for k in (1, 2, 12, 999)]
    assert ids[-4:] == bins
    assert tokenizer.convert_ids_to_tokens(ids[:-4]) == ["Ġregion", ":"]  # no space pieces before bins
    assert tokenizer.bin_token(12) == "<bin_12>"
    assert tokenizer.code_token(7) == "<code_7>"
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.bin_token(1000)


def test_bins_and_codes_survive_decode(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids
    ids = tokenizer("<bin_3> person<code_5>")["input_ids"]  # with <s> ... </s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<bin_3> person<code_5>"


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = OFAUFOTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is OFAUFOTokenizer
    assert len(loaded) == len(tokenizer)
    layout = ("code_offset", "num_codes", "bin_offset", "num_bins", "mask_token_id", "pad_token_id")
    assert [getattr(loaded, a) for a in layout] == [getattr(tokenizer, a) for a in layout]
    assert loaded(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]


def _write_bart_style(tmp_path, with_mask: bool = True):
    """A tiny BART-layout vocabulary: specials at 0..3, byte pieces, a few merges, <mask> last."""
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "Ġ", "a", "b", "c", "r", "e", "d", "?", "Ġa", "Ġr", "Ġre", "Ġred"]
    vocab = {tok: i for i, tok in enumerate(pieces + (["<mask>"] if with_mask else []))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ a\nĠ r\nĠr e\nĠre d\n", encoding="utf-8")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), len(vocab)


@pytest.mark.parametrize("with_mask", [True, False])
def test_bart_layout_files(tmp_path, with_mask):
    vocab_file, merges_file, size = _write_bart_style(tmp_path, with_mask)
    tok = build_tokenizer(vocab_file, merges_file, num_codes=16, num_bins=10)
    text_size = size if with_mask else size + 1  # a missing <mask> is appended after the text pieces
    assert tok.mask_token_id == text_size - 1
    assert (tok.code_offset, tok.num_codes, tok.bin_offset, tok.num_bins) == (text_size, 16, text_size + 16, 10)
    assert len(tok) == text_size + 26
    ids = tok(" red a <bin_9>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Ġred", "Ġa", "<bin_9>"]


def test_bart_sized_vocabulary_gives_ofa_ids(tmp_path):
    # Same size and layout as BART's vocab.json: 4 specials, 50,260 pieces, <mask> = 50264.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [f"Ġw{i}" for i in range(50260 - len(alphabet))]
    vocab = {tok: i for i, tok in enumerate(["<s>", "<pad>", "</s>", "<unk>", *pieces, "<mask>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = build_tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert (tok.mask_token_id, tok.code_offset, tok.bin_offset, len(tok)) == (50264, 50265, 58457, 59457)


def test_no_codes(tmp_path):
    vocab_file, merges_file, size = _write_bart_style(tmp_path)
    tok = build_tokenizer(vocab_file, merges_file, num_codes=0, num_bins=4)
    assert (tok.num_codes, tok.code_offset, tok.bin_offset, len(tok)) == (0, size, size, size + 4)


def test_missing_file(tmp_path):
    vocab_file, _, _ = _write_bart_style(tmp_path)
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_tokenizer(vocab_file, missing)
    with pytest.raises(ValueError, match="both"):
        build_tokenizer(vocab_file)


def test_specials_must_lead(tmp_path):
    _, merges_file, _ = _write_bart_style(tmp_path)
    bad = tmp_path / "bad_vocab.json"
    bad.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab\.json.*<s>.*ids \[0, 1, 2, 3\]"):
        build_tokenizer(str(bad), merges_file)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 7}', "no gaps"),
        ("not json", "not a JSON vocabulary"),
        ('["<s>", "<pad>"]', "JSON object"),
    ],
)
def test_malformed_vocab(tmp_path, content, match):
    _, merges_file, _ = _write_bart_style(tmp_path)
    (tmp_path / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        build_tokenizer(str(tmp_path / "vocab.json"), merges_file)


def test_malformed_merges(tmp_path):
    vocab_file, _, _ = _write_bart_style(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ a\nthree pieces here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt:3"):
        build_tokenizer(vocab_file, str(tmp_path / "merges.txt"))


def test_layout_follows_appended_tokens():
    """The cached bin / code layout is read again once tokens are appended: bins added past <bin_999> count."""
    tok = build_tokenizer()
    assert (tok.num_bins, tok.num_codes) == (1000, 8192)  # fills the cache
    tok.add_tokens(["<bin_1000>", "<bin_1001>"])
    assert tok.num_bins == 1002 and tok.convert_tokens_to_ids("<bin_1001>") == tok.bin_offset + 1001
    tok.add_tokens(["zebra-stripes"])  # not a bin: the layout is read again and stays
    assert (tok.num_bins, tok.num_codes, tok.code_offset) == (1002, 8192, 8000)
