"""OFA's decoding rule at the length limit, as an option of `generate`.

fairseq's SequenceGenerator (what OFA and ModelScope decode with) lets only EOS through at the last
allowed position and keeps EOS's log-probability there, so it counts in the beam score. transformers'
`forced_eos_token_id` forces EOS too but gives it log-probability 0, which changes the scores of
beams that reach the limit and can rank the final beams differently (2 of 10 Base inputs in
tests/test_parity_modelscope.py). With `generation_config.fairseq_max_len_eos = True` (or
`generate(..., fairseq_max_len_eos=True)`) our model applies fairseq's rule instead; converted OFA
checkpoints ship with it on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor

__all__ = ["FAIRSEQ_MAX_LEN_EOS", "FairseqMaxLenEOS", "check_fairseq_option", "fairseq_max_len_eos_processor",
           "with_fairseq_rules"]

FAIRSEQ_MAX_LEN_EOS = "fairseq_max_len_eos"  # the generation-config field (and generate keyword)


class FairseqMaxLenEOS(LogitsProcessor):
    """At the last position before `max_length`, every token but EOS gets -inf and EOS keeps its score.

    Beam search hands processors log-probabilities, so the forced EOS adds log p(EOS) to the beam's
    score, as in fairseq; greedy search and sampling pick EOS there as well. Earlier positions are
    left untouched.
    """

    def __init__(self, max_length: int, eos_token_id: int | Sequence[int]):
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{FAIRSEQ_MAX_LEN_EOS} needs eos_token_id as an id or a list of ids >= 0, "
                             f"got {eos_token_id!r}")
        self.max_length = max_length
        self.eos_token_ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        eos = torch.tensor(self.eos_token_ids, device=scores.device)
        forced = torch.full_like(scores, -math.inf)
        forced[:, eos] = scores[:, eos]
        return forced


def check_fairseq_option(value: Any) -> bool:
    """The option's value as a bool; anything but True/False/None is a TypeError naming the field."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{FAIRSEQ_MAX_LEN_EOS} must be True or False, got {value!r}")
    return bool(value)


def fairseq_max_len_eos_processor(generation_config: GenerationConfig) -> FairseqMaxLenEOS | None:
    """The processor `generate` adds when the option is on (None when off), for the config's
    `max_length` (already resolved from `max_new_tokens`) and EOS id(s)."""
    if not check_fairseq_option(getattr(generation_config, FAIRSEQ_MAX_LEN_EOS, None)):
        return None
    if generation_config.eos_token_id is None:
        raise ValueError(f"{FAIRSEQ_MAX_LEN_EOS}=True needs generation_config.eos_token_id (the id to force)")
    return FairseqMaxLenEOS(generation_config.max_length, generation_config.eos_token_id)


def with_fairseq_rules(generation_config: GenerationConfig) -> GenerationConfig:
    """A copy of `generation_config` with the option on, written so that it survives save/load.

    A config derived from the model config (`_from_model_config`) drops custom fields when it is read
    back, so the copy is built as an ordinary one.
    """
    values = {key: value for key, value in generation_config.to_dict().items()
              if key not in ("_from_model_config", "transformers_version")}
    return GenerationConfig(**{**values, FAIRSEQ_MAX_LEN_EOS: True})
