"""Task registry: name -> task object. The one place that knows which tasks exist.

Adding a task is a class (or an instance of an existing one) registered here plus its prompt
in the `prompts/` tables.
"""

from __future__ import annotations

from ofa_ufo.tasks.base import Decoded, Task
from ofa_ufo.tasks.choice import ClassificationTask, EntailmentTask, ITMTask, VQATask
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


def task_id(name: str) -> int:
    """The id the UFO supernet routes `name` on: its position in the registry (free prompts route as
    captioning). Registration order is therefore part of a routed checkpoint's meaning: append only."""
    names = list_tasks()
    if name == FREE_PROMPT:
        name = "caption"
    if name not in names:
        raise ValueError(f"Unknown task {name!r}. Available: {', '.join(names)}")
    return names.index(name)


_TEXT = dict(num_beams=5, max_new_tokens=16, no_repeat_ngram_size=3)
register_task(Task("caption", generation=_TEXT))
register_task(VQATask("vqa", generation=dict(num_beams=5, min_new_tokens=1, max_new_tokens=8, length_penalty=0.0),
                       metric="vqa_accuracy"))
register_task(GroundingTask("grounding", generation=dict(num_beams=5), metric="acc@0.5"))
register_task(GroundedCaptionTask("grounded_caption", generation=_TEXT))
register_task(ITMTask("itm", metric="top1", classes={"yes": "yes", "no": "no"}))
register_task(EntailmentTask("entailment", metric="top1", classes={"entailment": "yes", "contradiction": "no", "neutral": "maybe"}))
register_task(ClassificationTask("classification", generation=dict(num_beams=5), metric="top1"))
register_task(DetectionTask("detection", generation=dict(num_beams=1, max_new_tokens=64), metric="coco_map"))
register_task(Task("text_infill", generation=dict(num_beams=5, max_new_tokens=32, no_repeat_ngram_size=3)))
register_task(FreePromptTask(FREE_PROMPT, generation=dict(num_beams=5, max_new_tokens=32, no_repeat_ngram_size=3)))
# AllInOne embedding tasks: CosFace s / m per task (face 50/0.3, person 30/0.2, vehicle 20/0.2,
# product 30/0.2); batch-hard triplet on P x 4 batches except face (CosFace only).
register_task(EmbeddingTask("reid_person", metric="reid", cosface_scale=30.0, cosface_margin=0.2))
register_task(EmbeddingTask("reid_vehicle", metric="reid", cosface_scale=20.0, cosface_margin=0.2))
register_task(EmbeddingTask("face", metric="verification", cosface_scale=50.0, cosface_margin=0.3,
                            triplet_weight=0.0, instances_per_identity=0))
register_task(EmbeddingTask("product", metric="recall@k", cosface_scale=30.0, cosface_margin=0.2))
# Image generation as VQGAN code sequences (OFA): top-k 256 sampling, options vqgan / image_size.
register_task(TextToImageTask("text_to_image"))
register_task(ImageInfillTask("image_infill"))

__all__ = ["Decoded", "Task", "get_task", "list_tasks", "register_task", "task_id"]
