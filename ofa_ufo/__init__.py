"""OFA-UFO: one encoder-decoder for captioning, VQA, grounding, detection and more, as prompted generation.

`import ofa_ufo` registers the config, models, tokenizer, processors and the `ofa-ufo` pipeline
with transformers' Auto classes.
"""

from ofa_ufo.core.box_codec import BoxCodec
from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.deploy.dense_detector import extract_dense_detector
from ofa_ufo.deploy.ort_model import register as _register_onnx
from ofa_ufo.deploy.quantize import quantize_int8_dynamic
from ofa_ufo.deploy.quantize import register as _register_int8
from ofa_ufo.deploy.subnets import SupernetArch, extract_subnet, sample_arch, set_arch
from ofa_ufo.hf.configuration import OFAUFOConfig, OFAUFOVisionConfig
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.image_processing_detection import OFAUFODetectorImageProcessor
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration, OFAUFOModel
from ofa_ufo.hf.modeling_detection import OFAUFODetectorConfig, OFAUFOForObjectDetection
from ofa_ufo.hf.modeling_vqgan import VQGANConfig, VQGANModel, create_vqgan, list_vqgans
from ofa_ufo.hf.pipeline import OFAUFOPipeline
from ofa_ufo.hf.presets import create_config, create_model, create_processor, list_models
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.registration import register as _register
from ofa_ufo.hf.tokenization import OFAUFOTokenizer, build_tokenizer
from ofa_ufo.tasks import get_task, list_tasks

_register()
_register_onnx()  # the `ofa-ufo-onnx` type of exported directories (ofa_ufo.deploy.ort_model)
_register_int8()  # the `ofa-ufo-int8` type of dynamically quantised models (ofa_ufo.deploy.quantize)

__version__ = "0.1.0"

__all__ = [
    "BoxCodec",
    "SupernetArch",
    "extract_subnet",
    "extract_dense_detector",
    "quantize_int8_dynamic",
    "sample_arch",
    "set_arch",
    "ImageLoadError",
    "OFAUFOConfig",
    "OFAUFODetectorConfig",
    "OFAUFODetectorImageProcessor",
    "OFAUFOForObjectDetection",
    "OFAUFOForConditionalGeneration",
    "OFAUFOImageProcessor",
    "OFAUFOModel",
    "OFAUFOPipeline",
    "OFAUFOProcessor",
    "OFAUFOTokenizer",
    "OFAUFOVisionConfig",
    "VQGANConfig",
    "VQGANModel",
    "build_tokenizer",
    "create_config",
    "create_model",
    "create_processor",
    "create_vqgan",
    "get_task",
    "list_models",
    "list_tasks",
    "list_vqgans",
    "load_image",
]
