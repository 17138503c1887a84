"""Build the default byte-level BPE text vocabulary shipped in ``ofa_ufo/assets/tokenizer/``.

Why this exists: OFA's own vocabulary is BART's GPT-2 BPE (50,265 ids), which cannot be
downloaded at run time and is too large to ship. The library therefore ships a small
(8,000 ids) byte-level BPE trained offline, with exactly the same id layout as BART's files:
``<s> <pad> </s> <unk>`` at ids 0..3, BPE pieces, then ``<mask>`` as the last id. Given real
BART files instead, ``ofa_ufo.hf.tokenization.build_tokenizer`` reproduces OFA's ids exactly.

The corpus is built from text that is on every machine with Python:

* every docstring (module, class, function) in the standard library's ``.py`` sources, read
  with :mod:`ast` (nothing is imported, so no module side effects), test suites excluded;
* a deterministic set of sentences covering the demo vocabulary (colours, shapes, positions,
  numbers) and OFA's task prompts verbatim (leading space included), so that prompt words
  are single pieces.

Pre-tokenisation follows GPT-2: byte-level with ``Ġ`` marking a leading space and
``add_prefix_space=False``. The output is deterministic for a given Python version and
``tokenizers`` version (the shipped files were built with CPython 3.11 and tokenizers 0.23).

Usage::

    python docs/build_default_vocab.py            # writes ofa_ufo/assets/tokenizer/
    python docs/build_default_vocab.py --out DIR  # writes DIR/vocab.json and DIR/merges.txt
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK = "<mask>"
VOCAB_SIZE = 8000  # total ids in vocab.json, specials and <mask> included
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "brown", "cyan"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "ellipse", "cross", "diamond"]
POSITIONS = ["left", "right", "top", "bottom", "center", "top left corner", "top right corner",
             "bottom left corner", "bottom right corner", "middle"]
RELATIONS = ["above", "below", "next to", "left of", "right of", "near", "inside", "behind"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
OBJECTS = ["person", "man", "woman", "child", "dog", "cat", "car", "bus", "bird", "horse", "tree", "table",
           "chair", "cup", "ball", "boat", "rocket", "coffee", "coins", "flower", "building", "face"]
FIXED_PROMPTS = [
    " what does the image describe?",
    " what are the objects in the image?",
    "  what does the region describe? region:",
    " what is the image in the middle part?",
    " what are the texts on the image?",
]


def stdlib_docstrings() -> Iterator[str]:
    """Yield every docstring of the standard library sources, in a fixed (sorted) order."""
    root = Path(sysconfig.get_path("stdlib"))
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def demo_sentences(n: int = 6000, seed: int = 0) -> Iterator[str]:
    """Yield ``n`` prompt/caption/answer lines over the demo vocabulary, deterministically."""
    rng = random.Random(seed)
    pick, number = rng.choice, rng.randint

    def thing() -> str:
        return f"{pick(COLORS)} {pick(SHAPES + OBJECTS)}"

    templates = [
        lambda: f" a {thing()} in the {pick(POSITIONS)} of the image",
        lambda: f" {pick(NUMBER_WORDS)} {thing()}s {pick(RELATIONS)} a {thing()}",
        lambda: f' which region does the text " {thing()} " describe?',
        lambda: f' which region does the text " the {thing()} {pick(RELATIONS)} the {thing()} " describe?',
        lambda: f" what color is the {pick(SHAPES + OBJECTS)}?",
        lambda: f" how many {pick(SHAPES + OBJECTS)}s are there?",
        lambda: f" is there a {thing()}?",
        lambda: f" is the {thing()} {pick(RELATIONS)} the {thing()}?",
        lambda: f' does the image describe " a {thing()} "?',
        lambda: f' can image and text1 " a {thing()} " imply text2 " a {pick(SHAPES)} "?',
        lambda: f" what is the complete image? caption: a {thing()} on a {pick(COLORS)} background",
        lambda: f' what is the complete text of " a {pick(COLORS)} {pick(SHAPES)} in the {pick(POSITIONS)} "?',
        lambda: f' what is the answer to question " what color is the {pick(SHAPES)}? ". is " {pick(COLORS)} "?',
        lambda: f" there are {number(0, 100)} {pick(SHAPES)}s and {pick(NUMBER_WORDS)} {pick(OBJECTS)}s",
        lambda: pick([
            " yes", " no", " maybe",
            f" {pick(COLORS)}", f" {pick(NUMBER_WORDS)}", f" {number(0, 100)}", f" {pick(SHAPES)}",
        ]),
    ]
    for i in range(n):
        yield FIXED_PROMPTS[i % len(FIXED_PROMPTS)] if i % 10 == 0 else pick(templates)()


def train(out_dir: Path) -> None:
    """Train the BPE and write ``vocab.json`` (with ``<mask>`` appended last) and ``merges.txt``."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,  # <mask> is appended after training
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    corpus = list(stdlib_docstrings()) + list(demo_sentences())
    tokenizer.train_from_iterator(corpus, trainer=trainer)

    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if [vocab.get(tok) for tok in SPECIALS] != [0, 1, 2, 3]:
        raise RuntimeError(f"trainer did not place {SPECIALS} at ids 0..3")
    vocab[MASK] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out_dir / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(corpus)} corpus lines -> {len(ordered)} ids, {len(merges)} merges in {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(__file__).resolve().parents[1] / "ofa_ufo" / "assets" / "tokenizer"
    parser.add_argument("--out", type=Path, default=default_out)
    train(parser.parse_args().out)


if __name__ == "__main__":
    main()
