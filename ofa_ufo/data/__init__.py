"""Datasets and example builders (offline demo scenes)."""

from ofa_ufo.data.demo_scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    TASKS,
    DemoScenes,
    Scene,
    SceneObject,
    caption_example,
    class_names,
    classification_example,
    detection_example,
    detection_labels,
    generate_scene,
    grounding_example,
    make_examples,
    referring_expression,
    vqa_example,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "TASKS",
    "DemoScenes",
    "Scene",
    "SceneObject",
    "caption_example",
    "class_names",
    "classification_example",
    "detection_example",
    "detection_labels",
    "generate_scene",
    "grounding_example",
    "make_examples",
    "referring_expression",
    "vqa_example",
]

from ofa_ufo.data.canonical import CANONICAL_TASKS, FIELDS, DataError, new_example, validate_example  # noqa: E402
from ofa_ufo.data.loaders import (  # noqa: E402
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

__all__ += [
    "CANONICAL_TASKS",
    "FIELDS",
    "DataError",
    "LoadReport",
    "load_coco_captions",
    "load_coco_instances",
    "load_hf_dataset",
    "load_image_folder",
    "load_jsonl",
    "load_ofa_tsv",
    "load_refcoco",
    "load_snli_ve",
    "load_vqa_v2",
    "new_example",
    "validate_example",
]
