"""Captioning metrics through pycocoevalcap (the COCO caption evaluation code): BLEU-4, METEOR,
ROUGE-L and CIDEr, on captions tokenised by its PTBTokenizer, exactly as the COCO server does.

Inputs: ``predictions[i]`` is the generated caption of image ``i`` and ``references[i]`` its list
of human captions. Scores are corpus-level: BLEU-4 uses the "closest" reference length, CIDEr is
pycocoevalcap's ``Cider`` (CIDEr-D style, on a 0-10 scale, document frequencies taken from the
given references, so it needs a corpus of several images: with one image every n-gram has zero
IDF and CIDEr is 0).

SPICE is not offered: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use.

Cost: tokenisation and METEOR are Java programs (``java`` must be on PATH). One call tokenises
predictions and references together in a single JVM (~0.2 s); METEOR starts a second JVM that
loads its paraphrase tables (~6 s), so ask for the metrics you need (``cider`` alone skips it).
pycocoevalcap writes its temporary tokeniser input next to its own jar, so its install directory
must be writable; the Java tokeniser prints a one-line summary on stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

__all__ = ["CAPTION_METRICS", "caption_scores"]

CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider")

Tokenized = dict[int, list[str]]


def _bleu4(gts: Tokenized, res: Tokenized) -> float:
    """Corpus BLEU-4 (the last of BLEU-1..4), without the scorer's console report."""
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return scores[3]


def _meteor(gts: Tokenized, res: Tokenized) -> float:
    """METEOR 1.5, stopping its JVM at once instead of whenever the scorer is garbage-collected."""
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return score


def _rouge_l(gts: Tokenized, res: Tokenized) -> float:
    """Mean sentence ROUGE-L (F-measure with beta 1.2)."""
    score, _ = Rouge().compute_score(gts, res)
    return score


def _cider(gts: Tokenized, res: Tokenized) -> float:
    """Corpus CIDEr (pycocoevalcap's CIDEr-D variant, 0-10 scale)."""
    score, _ = Cider().compute_score(gts, res)
    return score


_SCORERS: dict[str, Callable[[Tokenized, Tokenized], float]] = {
    "bleu4": _bleu4,
    "meteor": _meteor,
    "rouge_l": _rouge_l,
    "cider": _cider,
}


def _tokenize(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[Tokenized, Tokenized]:
    """PTB-tokenise both sides in one JVM run; returns (references, predictions) by image index."""
    captions = {("ref", i): [{"caption": ref} for ref in refs] for i, refs in enumerate(references)}
    captions.update({("pred", i): [{"caption": pred}] for i, pred in enumerate(predictions)})
    tokens = PTBTokenizer().tokenize(captions)
    gts = {i: tokens[("ref", i)] for i in range(len(references))}
    res = {i: tokens[("pred", i)] for i in range(len(predictions))}
    return gts, res


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Iterable[str]) -> None:
    """Reject mismatched, empty or reference-less inputs and unknown metric names up front."""
    unknown = sorted(set(metrics) - set(_SCORERS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; valid: {list(CAPTION_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("caption metrics need at least one image")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("each references[i] must be a non-empty list of captions")


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = CAPTION_METRICS
) -> dict[str, float]:
    """Corpus scores ``{name: value}`` for the requested subset of ``CAPTION_METRICS``."""
    _check(predictions, references, metrics)
    gts, res = _tokenize(predictions, references)
    return {name: float(_SCORERS[name](gts, res)) for name in metrics}
