"""Turn `generate` output into scored answers, and score closed answer sets directly.

A score is the answer's summed token log-probability under the decoding constraints in force
(constrained tokens are renormalised over the allowed set, as in OFA); its exponent is the
probability the pipeline reports.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


@dataclass
class Decoded:
    """One answer: token ids after the start token (no padding, no </s>) and per-token log-probabilities."""

    tokens: list[int]
    token_logprobs: list[float]

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)


def generate_decoded(model, inputs: dict[str, torch.Tensor], eos_token_id: int, pad_token_id: int, **kwargs) -> list[list[Decoded]]:
    """Run `model.generate` and return, per input, its `num_return_sequences` scored answers."""
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    beams = kwargs.get("num_beams", 1) > 1
    scores = model.compute_transition_scores(
        out.sequences, out.scores, out.beam_indices if beams else None, normalize_logits=not beams
    )  # (rows, new_tokens)
    per_input = kwargs.get("num_return_sequences", 1)
    rows = [_decoded(seq, row, eos_token_id, pad_token_id) for seq, row in zip(out.sequences, scores)]
    return [rows[i : i + per_input] for i in range(0, len(rows), per_input)]


def _decoded(sequence: torch.Tensor, scores: torch.Tensor, eos: int, pad: int) -> Decoded:
    """Strip the start token, stop after </s> (its log-probability counts), drop pads."""
    tokens = sequence[1:].tolist()
    length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
    kept = [(t, float(s)) for t, s in zip(tokens[:length], scores[:length].tolist()) if t != pad]
    answer = [(t, s) for t, s in kept if t != eos]
    eos_logprob = sum(s for t, s in kept if t == eos)
    token_logprobs = [s for _, s in answer]
    if token_logprobs:
        token_logprobs[-1] += eos_logprob  # stopping is part of the answer's probability
    return Decoded([t for t, _ in answer], token_logprobs)


class RunningLogProb(LogitsProcessor):
    """Per row, the summed log-probability of the tokens chosen so far, under the scores this processor
    sees (put it after the constraints and before the sampling warpers, which `generate` appends last).

    For long sequences (1,024 image codes) this replaces `output_scores`, which would keep a
    vocabulary-wide score row per step. The token chosen at the last call is not counted: callers
    end with a forced token (</s>), whose log-probability is 0.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # (rows,)
        self._last: torch.Tensor | None = None  # (rows, V) log-probabilities of the previous step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is None:
            self.total = scores.new_zeros(scores.shape[0], dtype=torch.float32)
        else:
            self.total += self._last.gather(-1, input_ids[:, -1:])[:, 0]
        self._last = scores.float().log_softmax(-1)
        return scores


def score_candidates(
    model, inputs: dict[str, torch.Tensor], candidates: Sequence[Sequence[int]], pad_token_id: int
) -> torch.Tensor:
    """(B, C) summed log-probabilities of each candidate token sequence (include </s>) for each input.

    The encoder runs once; all B x C candidates are teacher-forced in one decoder pass, the C
    candidates of an input sharing its encoder row.
    """
    with torch.inference_mode():
        encoder_outputs = model.get_encoder()(**inputs)
        batch, count = inputs["input_ids"].shape[0], len(candidates)
        width = max(len(c) for c in candidates)
        labels = torch.full((count, width), pad_token_id, dtype=torch.long)
        for i, candidate in enumerate(candidates):
            labels[i, : len(candidate)] = torch.tensor(candidate)
        labels = labels.repeat(batch, 1).to(model.device)  # (B * C, W), input-major
        start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
        decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)
        logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits
        logprobs = logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]  # (B * C, W)
        logprobs = logprobs.masked_fill(labels.eq(pad_token_id), 0.0)
    return logprobs.sum(-1).view(batch, count)
