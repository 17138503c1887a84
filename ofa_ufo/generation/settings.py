"""Checking decoding settings before any model work.

transformers fails late and far from the cause on some settings (`num_beams=0` is a
ZeroDivisionError inside beam search); these checks name the argument instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

from ofa_ufo.generation.fairseq_rules import FAIRSEQ_MAX_LEN_EOS, check_fairseq_option

__all__ = ["check_generation_settings"]

_COUNTS = {"num_beams": 1, "max_new_tokens": 1, "num_return_sequences": 1, "min_new_tokens": 0, "top_k": 0}


def _count(settings: Mapping[str, Any], name: str, least: int) -> None:
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {least}, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def _number(settings: Mapping[str, Any], name: str) -> float:
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_generation_settings(settings: Mapping[str, Any]) -> None:
    """ValueError (TypeError for a wrong type) naming the first invalid setting among those `generate`
    would get (defaults merged in).

    Checked: the counts above (num_beams, max_new_tokens, num_return_sequences >= 1; min_new_tokens,
    top_k >= 0), num_return_sequences <= num_beams without sampling, min_new_tokens <= max_new_tokens,
    temperature > 0 when sampling, top_p in (0, 1], fairseq_max_len_eos True or False. Settings not named
    here are left to `generate`.
    """
    check_fairseq_option(settings.get(FAIRSEQ_MAX_LEN_EOS))
    for name, least in _COUNTS.items():
        if settings.get(name) is not None:
            _count(settings, name, least)
    sampling = bool(settings.get("do_sample"))
    beams, sequences = settings.get("num_beams") or 1, settings.get("num_return_sequences") or 1
    if not sampling and sequences > beams:
        raise ValueError(f"num_return_sequences={sequences} needs num_beams >= {sequences} (beam search keeps "
                         f"num_beams={beams} candidates), or do_sample=True")
    low, high = settings.get("min_new_tokens"), settings.get("max_new_tokens")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min_new_tokens={low} is more than max_new_tokens={high}")
    if sampling and settings.get("temperature") is not None and _number(settings, "temperature") <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {settings['temperature']}")
    if settings.get("top_p") is not None and not 0 < _number(settings, "top_p") <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {settings['top_p']}")
