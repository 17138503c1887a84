"""Register OFA-UFO with the transformers Auto classes and the `ofa-ufo` pipeline task.

Registration is per process, so `import ofa_ufo` does it; no remote code is involved.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForObjectDetection,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY

from ofa_ufo.hf.configuration import OFAUFOConfig, OFAUFOVisionConfig
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.image_processing_detection import OFAUFODetectorImageProcessor
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration, OFAUFOModel
from ofa_ufo.hf.modeling_detection import OFAUFODetectorConfig, OFAUFOForObjectDetection
from ofa_ufo.hf.modeling_vqgan import VQGANConfig, VQGANModel
from ofa_ufo.hf.pipeline import OFAUFOPipeline
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.tokenization import OFAUFOTokenizer

PIPELINE_TASK = "ofa-ufo"


def register_seq2seq_variant(config_class: type, model_class: type) -> None:
    """Register another config type whose models (int8, ONNX Runtime) generate like OFA-UFO and load the
    same tokenizer and processors: `AutoModelForSeq2SeqLM` / `AutoProcessor` then serve it. Idempotent."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForSeq2SeqLM.register(config_class, model_class, exist_ok=True)
    AutoTokenizer.register(config_class, fast_tokenizer_class=OFAUFOTokenizer, exist_ok=True)
    AutoImageProcessor.register(config_class, slow_image_processor_class=OFAUFOImageProcessor, exist_ok=True)
    AutoProcessor.register(config_class, OFAUFOProcessor, exist_ok=True)


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
    register_detector()
    # The class itself, not AutoModelForSeq2SeqLM: the Auto class drops `_from_pipeline` before calling it,
    # and with it `from_pretrained` checks the tokenizer and processor files the pipeline loads next.
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=OFAUFOPipeline, pt_model=OFAUFOForConditionalGeneration, type="multimodal"
    )


def register_detector() -> None:
    """The extracted dense detector (`ofa-ufo-detector`) for `AutoModelForObjectDetection`,
    `AutoImageProcessor` and `pipeline("object-detection", model=DIR)`."""
    AutoConfig.register(OFAUFODetectorConfig.model_type, OFAUFODetectorConfig, exist_ok=True)
    AutoModelForObjectDetection.register(OFAUFODetectorConfig, OFAUFOForObjectDetection, exist_ok=True)
    AutoImageProcessor.register(OFAUFODetectorConfig, slow_image_processor_class=OFAUFODetectorImageProcessor,
                                exist_ok=True)
    # The object-detection pipeline checks the model's class name against this table only (not the Auto
    # registry) and logs an error for any other; the entry names the class registered above.
    MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(OFAUFODetectorConfig.model_type,
                                                        OFAUFOForObjectDetection.__name__)
