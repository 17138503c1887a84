"""Closed-set tasks: answers drawn from a list (trie-constrained beam search, top-k with
probabilities) or from a few fixed classes scored exhaustively (ITM, entailment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ofa_ufo.core.prompts import DEFAULT_STYLE, format_prompt
from ofa_ufo.generation import Trie, TrieLogitsProcessor
from ofa_ufo.generation.scoring import Decoded, score_candidates
from ofa_ufo.tasks.base import Task


@lru_cache(maxsize=8)
def _answer_trie(tokenizer, answers: tuple[str, ...]) -> tuple[Trie, int]:
    """The trie over `answers` and the longest one's token count, built once per tokenizer and answer
    set: tokenising VQA's 3,129 answers takes ~0.1 s, more than decoding one question."""
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return Trie(ids + [tokenizer.eos_token_id] for ids in encoded), max(len(ids) for ids in encoded)


def _trie_kwargs(task: Task, tokenizer, choices: list[str], top_k: int) -> dict[str, Any]:
    """Beam search restricted to `choices` (OFA writes answers with a leading space), k answers back."""
    if not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"task {task.name!r}: the answer list must be non-empty strings, got {choices!r}")
    answers = tuple(sorted({" " + Task.normalize(c) for c in choices}))
    trie, longest = _answer_trie(tokenizer, answers)
    top_k = min(top_k, len(answers))  # beams beyond the distinct answers would return dead sequences
    settings = {k: v for k, v in task.generation.items() if k != "min_new_tokens"}  # the trie sets the length
    return {
        **settings,
        "num_beams": max(task.generation.get("num_beams", 1), top_k),
        "num_return_sequences": top_k,
        "max_new_tokens": longest + 1,  # the longest answer, then </s>
        "logits_processor": [TrieLogitsProcessor(trie, tokenizer.eos_token_id)],
    }


def _ranked(raw: list[Decoded], tokenizer, key: str, choices: list[str]) -> dict[str, Any]:
    """The decoded answers as the caller wrote them (`choices`, matched after normalisation), best
    first; a sequence that is no choice (none when the trie finished every beam) is left out."""
    written = {Task.normalize(c): c for c in reversed(choices)}  # the first spelling of a duplicate wins
    ranked = []
    for decoded in raw:
        text = tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
        if text in written:
            ranked.append({key: written[text], "score": decoded.probability})
    ranked.sort(key=lambda r: -r["score"])
    return {key: ranked[0][key], "score": ranked[0]["score"], "top_k": ranked}


@dataclass
class ClassificationTask(Task):
    """Image classification as generation over the class names given in `labels` (OFA's trie)."""

    options: tuple[str, ...] = ("labels", "top_k")
    required: dict[str, str] = field(default_factory=lambda: {"labels": "['cat', 'dog']"})

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        self.check_options(options)
        return _trie_kwargs(self, tokenizer, list(options["labels"]), options.get("top_k") or 5)

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        return self.prompt(None, style), " " + self.normalize(example["target"])

    def postprocess(self, raw: list[Decoded], tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        return _ranked(raw, tokenizer, "label", list(meta["options"]["labels"]))

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {"labels": labels}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        return [r["label"] for r in result.get("top_k", [])], example["target"]


@dataclass
class VQATask(Task):
    """The question is the prompt (OFA; a trailing '?' is ensured). Open-ended by default; with
    `candidates` (an answer list, e.g. VQAv2's 3,129) the answer is trie-constrained and the
    top-k answers come back with probabilities."""

    options: tuple[str, ...] = ("candidates", "top_k")

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text or not text.strip():
            raise ValueError("task 'vqa' needs a question: pass text='...'")
        question = self.normalize(text)
        return super().prompt(question if question.endswith("?") else question + "?", style)

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        return self.prompt(example["text"], style), " " + self.normalize(example["target"])

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("candidates") is None:
            return super().generate_kwargs(config, tokenizer, options)
        return _trie_kwargs(self, tokenizer, list(options["candidates"]), options.get("top_k") or 5)

    def postprocess(self, raw: list[Decoded], tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        if meta["options"].get("candidates") is None:
            return super().postprocess(raw, tokenizer, meta)
        return _ranked(raw, tokenizer, "text", list(meta["options"]["candidates"]))


@dataclass
class ChoiceTask(Task):
    """A few fixed classes, each answered by a word; every class is scored, probabilities sum to 1."""

    classes: dict[str, str] = field(default_factory=dict)  # class label -> answer word

    def run(self, model, inputs: dict, tokenizer, options: dict[str, Any], generate_kwargs: dict[str, Any]) -> list:
        words = [" " + word for word in self.classes.values()]
        candidates = [ids + [tokenizer.eos_token_id] for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
        logprobs = score_candidates(model, inputs, candidates, tokenizer.pad_token_id)  # (B, C)
        return list(logprobs.softmax(-1))

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {name: example[name] for name in ("text", *self.options) if example.get(name)}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        return [result["label"]] if "label" in result else [], example["target"]

    def postprocess(self, raw, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        scores = {label: float(p) for label, p in zip(self.classes, raw.tolist())}
        best = max(scores, key=scores.get)
        return {"label": best, "score": scores[best], "scores": scores}

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        label = example["target"]
        if label not in self.classes:
            raise ValueError(f"task {self.name!r}: target {label!r} is not one of {list(self.classes)}")
        return self.request_prompt({"text": example["text"], "options": example}, style), " " + self.classes[label]


@dataclass
class ITMTask(ChoiceTask):
    """Image-text matching: does the image show the text? (OFA's pretraining ITM prompt)."""

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text:
            raise ValueError(f"task {self.name!r} needs the text to match: pass text='...'")
        return super().prompt(text, style)


@dataclass
class EntailmentTask(ChoiceTask):
    """Visual entailment (SNLI-VE): hypothesis in `text`, optional `premise` (OFA's two prompts)."""

    options: tuple[str, ...] = ("premise",)

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        text, premise = meta["text"], meta["options"].get("premise")
        if not text:
            raise ValueError("task 'entailment' needs the hypothesis: pass text='...'")
        if premise:
            return format_prompt("entailment", style, premise=self.normalize(premise), text=self.normalize(text))
        return format_prompt("itm", style, text=self.normalize(text))
