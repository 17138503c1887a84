"""Register OFA-UFO with the transformers Auto classes and the `ofa-ufo` pipeline task.

Registration is per process, so `import ofa_ufo` does it; no remote code is involved.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSeq2SeqLM, AutoProcessor, AutoTokenizer
from transformers.pipelines import PIPELINE_REGISTRY

from ofa_ufo.hf.configuration import OFAUFOConfig, OFAUFOVisionConfig
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration, OFAUFOModel
from ofa_ufo.hf.modeling_vqgan import VQGANConfig, VQGANModel
from ofa_ufo.hf.pipeline import OFAUFOPipeline
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.tokenization import OFAUFOTokenizer

PIPELINE_TASK = "ofa-ufo"


def register() -> None:
    """Idempotent: safe to call again (e.g. after a test re-imports the package)."""
    AutoConfig.register(OFAUFOConfig.model_type, OFAUFOConfig, exist_ok=True)
    AutoConfig.register(OFAUFOVisionConfig.model_type, OFAUFOVisionConfig, exist_ok=True)
    AutoModel.register(OFAUFOConfig, OFAUFOModel, exist_ok=True)
    AutoConfig.register(VQGANConfig.model_type, VQGANConfig, exist_ok=True)
    AutoModel.register(VQGANConfig, VQGANModel, exist_ok=True)
    AutoModelForSeq2SeqLM.register(OFAUFOConfig, OFAUFOForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(OFAUFOConfig, fast_tokenizer_class=OFAUFOTokenizer, exist_ok=True)
    AutoImageProcessor.register(OFAUFOConfig, slow_image_processor_class=OFAUFOImageProcessor, exist_ok=True)
    AutoProcessor.register(OFAUFOConfig, OFAUFOProcessor, exist_ok=True)
    # The class itself, not AutoModelForSeq2SeqLM: the Auto class drops `_from_pipeline` before calling it,
    # and with it `from_pretrained` checks the tokenizer and processor files the pipeline loads next.
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=OFAUFOPipeline, pt_model=OFAUFOForConditionalGeneration, type="multimodal"
    )
