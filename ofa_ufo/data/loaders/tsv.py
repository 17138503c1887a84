"""OFA's TSV files: one sample per line, tab-separated, images as base64 (standard or urlsafe).

A layout names the fields the OFA dataset class receives, in order, after ``selected_cols``
picked them from the file's columns; defaults are OFA's own ``--selected-cols``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, decode_base64_image, drive, iter_lines

__all__ = ["TSV_LAYOUTS", "TsvRow", "load_ofa_tsv"]

# layout -> (fields received after selection, OFA's default selected_cols into the file's columns)
TSV_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    # file: uniq-id, image-id, caption(s joined by &&), predicted objects, image
    "caption": (("id", "image", "caption"), (0, 4, 2)),
    # file: question-id, image-id, question, conf|!+answer&&..., predicted objects (a&&b), image
    "vqa": (("id", "image", "question", "answers", "objects"), (0, 5, 2, 3, 4)),
    # file: uniq-id, image-id, text, "x0,y0,x1,y1", image
    "refcoco": (("id", "image", "text", "box"), (0, 4, 2, 3)),
    # file: uniq-id, image-id, image, hypothesis, premise (caption), label
    "snli_ve": (("id", "image", "hypothesis", "premise", "label"), (0, 2, 3, 4, 5)),
    # file: image (urlsafe base64), 1-based label id, synset words (class name)
    "imagenet": (("image", "label"), (0, 2)),
}
Fields = dict[str, str]


def _parse_cols(selected_cols: str | Sequence[int] | None, layout: str) -> tuple[int, ...]:
    """OFA's "0,4,2" (or a list of ints) -> column indices, one per field of the layout."""
    names, default = TSV_LAYOUTS[layout]
    if selected_cols is None:
        return default
    cols = tuple(int(c) for c in selected_cols.split(",")) if isinstance(selected_cols, str) else tuple(selected_cols)
    if len(cols) != len(names) or min(cols) < 0:
        raise ValueError(f"selected_cols for layout {layout!r} must be {len(names)} column ids "
                         f"for fields {names}, got {selected_cols!r}")
    return cols


def _pick(line: str, cols: tuple[int, ...], names: tuple[str, ...], source: str, row: int) -> Fields:
    """The selected columns of one line, by field name; a short line names the missing column."""
    columns = line.split("\t")
    for col, name in zip(cols, names):
        if col >= len(columns):
            raise DataError(source, row, f"{name} (column {col})", f"missing: the line has only {len(columns)} columns")
    return {name: columns[col] for col, name in zip(cols, names)}


def _parse_box(text: str, source: str, row: int) -> list[float]:
    """ "x0,y0,x1,y1" -> 4 floats."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise DataError(source, row, "box", f"expected 'x0,y0,x1,y1', got {text!r:.60}")
    return box


def _scored_answer(item: str, source: str, row: int) -> tuple[float, str]:
    """One "conf|!+answer" item -> (confidence, answer)."""
    conf, sep, answer = item.partition("|!+")
    try:
        if sep:
            return float(conf), answer.strip()
    except ValueError:
        pass
    raise DataError(source, row, "answers", f"expected 'confidence|!+answer', got {item!r:.60}")


def _parse_answers(text: str, source: str, row: int) -> list[str]:
    """OFA's "conf|!+answer&&conf|!+answer" -> answers, most confident first."""
    scored = [_scored_answer(item, source, row) for item in text.split("&&") if item]
    if not scored:
        raise DataError(source, row, "answers", "no answers")
    return [answer for _, answer in sorted(scored, key=lambda pair: -pair[0])]


def _caption(f: Fields, source: str, row: int) -> dict[str, Any]:
    captions = [c.strip() for c in f["caption"].split("&&")]
    return new_example(id=f["id"], task="caption", target=captions[0],
                       references=captions if len(captions) > 1 else None)


def _vqa(f: Fields, source: str, row: int) -> dict[str, Any]:
    answers = _parse_answers(f["answers"], source, row)
    objects = [o.strip() for o in f["objects"].split("&&") if o.strip()]
    return new_example(id=f["id"], task="vqa", text=f["question"], target=answers[0],
                       references=answers, meta={"objects": objects} if objects else None)


def _refcoco(f: Fields, source: str, row: int) -> dict[str, Any]:
    return new_example(id=f["id"], task="grounding", text=f["text"], box=_parse_box(f["box"], source, row))


def _snli_ve(f: Fields, source: str, row: int) -> dict[str, Any]:
    return new_example(id=f["id"], task="entailment", text=f["hypothesis"],
                       premise=f["premise"] or None, target=f["label"])


def _imagenet(f: Fields, source: str, row: int) -> dict[str, Any]:
    return new_example(id=f"{Path(source).name}:{row}", task="classification", target=f["label"])


_BUILDERS: dict[str, Callable[[Fields, str, int], dict[str, Any]]] = {
    "caption": _caption, "vqa": _vqa, "refcoco": _refcoco, "snli_ve": _snli_ve, "imagenet": _imagenet,
}


class TsvRow:
    """Builds the canonical example of one TSV line (its base64 image decoded): the one row parser that
    the eager loader and the lazy streams (`ofa_ufo.data.streaming`) share. Picklable, for DataLoader workers."""

    def __init__(self, layout: str, selected_cols: str | Sequence[int] | None, source: str) -> None:
        if layout not in TSV_LAYOUTS:
            raise ValueError(f"unknown TSV layout {layout!r}; expected one of {sorted(TSV_LAYOUTS)}")
        self.layout, self.source = layout, source
        self.cols, self.names = _parse_cols(selected_cols, layout), TSV_LAYOUTS[layout][0]

    def __call__(self, line: str, row: int) -> tuple[dict[str, Any], Size | None]:
        fields = _pick(line, self.cols, self.names, self.source, row)
        example = _BUILDERS[self.layout](fields, self.source, row)
        example["image"] = decode_base64_image(fields["image"], self.source, row)
        return example, None


def load_ofa_tsv(
    path: str | os.PathLike, layout: str, selected_cols: str | Sequence[int] | None = None,
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream canonical examples from an OFA TSV file, line by line (images decoded to PIL).

    ``layout`` is one of :data:`TSV_LAYOUTS`; ``selected_cols`` overrides OFA's default
    column picks (e.g. ``"1,4,2"`` for stage-2 captions keyed by image id). Rows are 1-based
    line numbers.
    """
    check_on_error(on_error)
    build = TsvRow(layout, selected_cols, str(path))
    return drive(iter_lines(path), build, str(path), on_error, report)
