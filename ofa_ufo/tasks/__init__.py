"""Task registry: name -> task object. The one place that knows which tasks exist.

Adding a task is a class (or an instance of an existing one) registered here plus its prompt
in the `prompts/` tables.
"""

from __future__ import annotations

from ofa_ufo.tasks.base import Decoded, Task
from ofa_ufo.tasks.choice import ClassificationTask, EntailmentTask, ITMTask, VQATask
from ofa_ufo.tasks.dense_detection import DenseDetectionTask
from ofa_ufo.tasks.embedding import EmbeddingTask
from ofa_ufo.tasks.image_gen import ImageInfillTask, TextToImageTask
from ofa_ufo.tasks.localization import DetectionTask, GroundedCaptionTask, GroundingTask
from ofa_ufo.tasks.text import FreePromptTask

_REGISTRY: dict[str, Task] = {}

FREE_PROMPT = "prompt"


def register_task(task: Task) -> Task:
    """Add a task to the registry (names are unique)."""
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown task {name!r}. Available: {', '.join(list_tasks())}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    """Registered task names (the free-prompt pseudo-task excluded)."""
    return [name for name in _REGISTRY if name != FREE_PROMPT]


_TEXT = dict(num_beams=5, max_new_tokens=16, no_repeat_ngram_size=3)
register_task(Task("caption", generation=_TEXT, headline="cider", example_fields=("target",)))
register_task(VQATask("vqa", generation=dict(num_beams=5, min_new_tokens=1, max_new_tokens=8, length_penalty=0.0),
                       metric="vqa_accuracy", example_fields=("text", "target")))
# grounding: `boxes` may be empty (the phrase matches nothing)
register_task(GroundingTask("grounding", generation=dict(num_beams=5), metric="acc@0.5",
                            example_fields=("text", ("box", "boxes"))))
register_task(GroundedCaptionTask("grounded_caption", generation=_TEXT, example_fields=("box", "target")))
register_task(ITMTask("itm", metric="top1", classes={"yes": "yes", "no": "no"}, example_fields=("text", "target")))
register_task(EntailmentTask("entailment", metric="top1", example_fields=("text", "target"),
                             classes={"entailment": "yes", "contradiction": "no", "neutral": "maybe"}))
register_task(ClassificationTask("classification", generation=dict(num_beams=5), metric="top1",
                                 example_fields=("target",)))
register_task(DetectionTask("detection", generation=dict(num_beams=1, max_new_tokens=64), metric="coco_map",
                            example_fields=("boxes", "labels")))
register_task(Task("text_infill", generation=dict(num_beams=5, max_new_tokens=32, no_repeat_ngram_size=3),
                   headline="cider", example_fields=("text", "target"), needs_image=False))
register_task(FreePromptTask(FREE_PROMPT, generation=dict(num_beams=5, max_new_tokens=32, no_repeat_ngram_size=3),
                             needs_image=False))
# AllInOne embedding tasks: CosFace s / m per task (face 50/0.3, person 30/0.2, vehicle 20/0.2,
# product 30/0.2); batch-hard triplet on P x 4 batches except face (CosFace only). Identity, camera, split,
# pair... live in an example's `meta` (see ofa_ufo.data.loaders.reid).
_IDENTITY = ("meta",)
register_task(EmbeddingTask("reid_person", metric="reid", cosface_scale=30.0, cosface_margin=0.2,
                            identity_kind="person", example_fields=_IDENTITY))
register_task(EmbeddingTask("reid_vehicle", metric="reid", cosface_scale=20.0, cosface_margin=0.2,
                            identity_kind="vehicle", example_fields=_IDENTITY))
register_task(EmbeddingTask("face", metric="verification", cosface_scale=50.0, cosface_margin=0.3,
                            triplet_weight=0.0, instances_per_identity=0, identity_kind="face",
                            example_fields=_IDENTITY))
register_task(EmbeddingTask("product", metric="recall@k", cosface_scale=30.0, cosface_margin=0.2,
                            identity_kind="product", example_fields=_IDENTITY))
# Image generation as VQGAN code sequences (OFA): top-k 256 sampling, options vqgan / image_size.
# The image is the target: text_to_image draws it from the text, image_infill restores its centre.
register_task(TextToImageTask("text_to_image", example_fields=("text", "image"), needs_image=False))
register_task(ImageInfillTask("image_infill", example_fields=("image",)))
# DAMO-YOLO dense detection: every box in one forward pass of the model's dense head (ofa_ufo.models.damo_yolo)
register_task(DenseDetectionTask("dense_detection", example_fields=("boxes", "labels")))

__all__ = ["Decoded", "Task", "get_task", "list_tasks", "register_task"]
