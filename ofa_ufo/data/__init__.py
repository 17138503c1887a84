"""Data: the canonical example format, loaders for dataset formats, offline demo scenes and identities,
and the registry that opens any of them by name (:mod:`ofa_ufo.data.sources`)."""

from ofa_ufo.data.canonical import CANONICAL_TASKS, FIELDS, DataError, new_example, validate_example
from ofa_ufo.data.demo_examples import (
    TASKS,
    caption_example,
    classification_example,
    detection_example,
    entailment_example,
    grounded_caption_example,
    grounding_example,
    itm_example,
    make_examples,
    referring_expression,
    vqa_example,
)
from ofa_ufo.data.demo_scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    DemoScenes,
    Scene,
    SceneObject,
    class_names,
    detection_labels,
    generate_scene,
)
from ofa_ufo.data.loaders import (
    LoadReport,
    load_coco_captions,
    load_coco_instances,
    load_hf_dataset,
    load_image_folder,
    load_jsonl,
    load_ofa_tsv,
    load_refcoco,
    load_snli_ve,
    load_vqa_v2,
)

__all__ = [
    "BACKGROUNDS", "CANONICAL_TASKS", "COLORS", "FIELDS", "SHAPES", "TASKS",
    "DataError", "DemoScenes", "LoadReport", "Scene", "SceneObject",
    "caption_example", "class_names", "classification_example", "detection_example", "detection_labels",
    "entailment_example", "generate_scene", "grounded_caption_example", "grounding_example", "itm_example",
    "load_coco_captions", "load_coco_instances", "load_hf_dataset", "load_image_folder", "load_jsonl",
    "load_ofa_tsv", "load_refcoco", "load_snli_ve", "load_vqa_v2",
    "make_examples", "new_example", "referring_expression", "validate_example", "vqa_example",
]
