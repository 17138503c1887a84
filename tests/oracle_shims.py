"""Import-time shims that let ModelScope 1.40.2's OFA run beside transformers 5 (oracle tests only).

Nothing in site-packages is edited; everything is patched in the running process, before the
first import of `modelscope.models.multi_modal.ofa`:

1. `transformers.models.bert.tokenization_bert` no longer exports `BasicTokenizer` /
   `WordpieceTokenizer` (they moved to `tokenization_bert_legacy`): re-export them.
2. `transformers.models.bart.tokenization_bart_fast` is gone (transformers 5 has one tokenizers-backed
   `BartTokenizer`): register a stub module whose `BartTokenizerFast` is that class.
3. `OFAConfig.__init__` reads `self.forced_bos_token_id` before anything sets it (transformers 5 no
   longer defines it on `PreTrainedConfig`): give the class a `None` default.
4. If a (CUDA-only) torchvision is installed beside CPU torch, define the two op schemas its import
   needs (reference/environment.md); its C++ ops stay unusable, and OFA does not call them.

Call `modelscope_ofa()` to get `(OFAConfig, OFAModel)` with the shims applied.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_APPLIED = False


def _torchvision_shim() -> None:
    if importlib.util.find_spec("torchvision") is None or "torchvision" in sys.modules:
        return
    import torch

    for name in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (a real CPU build, or a second call)
            pass


def apply() -> None:
    """Apply shims 1, 2 and 4 (idempotent); shim 3 needs the config class, see `modelscope_ofa`."""
    global _APPLIED
    if _APPLIED:
        return
    _torchvision_shim()
    from transformers.models.bert import tokenization_bert, tokenization_bert_legacy

    for name in ("BasicTokenizer", "WordpieceTokenizer"):
        if not hasattr(tokenization_bert, name):
            setattr(tokenization_bert, name, getattr(tokenization_bert_legacy, name))

    fast_name = "transformers.models.bart.tokenization_bart_fast"
    if importlib.util.find_spec(fast_name) is None and fast_name not in sys.modules:
        from transformers.models.bart.tokenization_bart import BartTokenizer

        stub = types.ModuleType(fast_name)
        stub.BartTokenizerFast = BartTokenizer
        stub.__doc__ = "stub added by tests/oracle_shims.py for modelscope's OFA (transformers 5 has no bart fast module)"
        sys.modules[fast_name] = stub
        import transformers.models.bart as bart

        bart.tokenization_bart_fast = stub
    _APPLIED = True


def modelscope_ofa():
    """(OFAConfig, OFAModel) of ModelScope's OFA, importable and constructible on transformers 5."""
    apply()
    from modelscope.models.multi_modal.ofa import configuration_mmspeech, configuration_ofa, modeling_ofa

    for config_class in (configuration_ofa.OFAConfig, configuration_mmspeech.MMSpeechConfig):
        if "forced_bos_token_id" not in vars(config_class):
            config_class.forced_bos_token_id = None
    return configuration_ofa.OFAConfig, modeling_ofa.OFAModel


def modelscope_sequence_generator():
    """ModelScope's fairseq-style `SequenceGenerator` class (OFA's own beam search)."""
    modelscope_ofa()
    from modelscope.models.multi_modal.ofa.generate.sequence_generator import SequenceGenerator

    return SequenceGenerator
