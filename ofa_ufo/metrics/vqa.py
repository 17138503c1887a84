"""VQA v2 accuracy, reproducing the official ``vqaEval.py`` rules so numbers match the server.

Normalisation (``normalize_vqa_answer``): punctuation in ``_PUNCT`` is deleted when it touches a
space (or the answer contains a ``digit,digit`` group) and otherwise becomes a space; a period not
followed by a digit is deleted; the answer is lower-cased and split on whitespace; number words
``none``/``zero`` .. ``ten`` become digits; articles ``a an the`` are dropped; contractions written
without an apostrophe (``dont``) get it back (``don't``).

Scoring, as the official script: newlines/tabs become spaces and ends are stripped; only when the
ten human answers are NOT unanimous are the answers and the prediction normalised (a unanimous
question compares the raw, case-folded strings); the score is the mean over the ten
leave-one-out subsets of ``min(1, matches / 3)``. So with ``k`` matching humans the score is
0.3 (k=1), 0.6 (k=2), 0.9 (k=3) and 1.0 (k>=4).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_vqa_answer", "vqa_accuracy", "vqa_score"]

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo'd look-behind that is in effect a no-op
# look-ahead, so what it really does is drop every period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The official table, minus its capitalised keys ("Im", "Ive", ...) that can never match the
# lower-cased words it is applied to. "somebody'd" -> "somebodyd" is the official (odd) entry.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


def _clean(answer: str) -> str:
    """The official first step: newlines and tabs become spaces, ends are stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Delete or space out punctuation, deciding per mark from the ORIGINAL text (as official)."""
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or glued_number else " ")
    return _PERIOD.sub("", out)


def _process_digits_articles(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    return _process_digits_articles(_process_punctuation(_clean(answer)))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official soft accuracy of one prediction against its human answers (normally ten).

    The official leave-one-out rule needs several answers: with one answer it scores every
    prediction 0. Questions with fewer than four answers (generated or single-answer data, as
    GQA) therefore score 1.0 when the prediction matches any answer, else 0.0.
    """
    if not answers:
        raise ValueError("every question needs at least one human answer")
    pred = _clean(prediction)
    gts = [_clean(answer) for answer in answers]
    if len(set(gts)) > 1:
        pred = normalize_vqa_answer(pred)
        gts = [normalize_vqa_answer(answer) for answer in gts]
    hits = [gt.lower() == pred.lower() for gt in gts]
    if len(hits) < 4:
        return float(any(hits))
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean official VQA accuracy; ``references[i]`` holds the human answers of question ``i``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("vqa_accuracy needs at least one question")
    scores = [vqa_score(pred, answers) for pred, answers in zip(predictions, references)]
    return {"vqa_accuracy": sum(scores) / len(scores)}
