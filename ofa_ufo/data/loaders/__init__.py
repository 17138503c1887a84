"""Loaders: each source format -> a stream of canonical examples (see :mod:`ofa_ufo.data.canonical`).

Every loader is a generator function's result: rows are read lazily (JSONL/TSV line by line;
COCO/VQA JSON documents and RefCOCO's refs pickle are read whole, that is inherent).
``on_error="raise"`` (default) stops at the first bad row with a :class:`DataError` naming file, row and field;
``on_error="skip"`` drops bad rows, counts them in ``report`` (a :class:`LoadReport`, if
passed) and logs one warning with the first few reasons when the load ends.
"""

from ofa_ufo.data.loaders._common import LoadReport, OnError, read_pickle
from ofa_ufo.data.loaders.coco import load_coco_captions, load_coco_instances, load_refcoco
from ofa_ufo.data.loaders.folder import IMAGE_EXTENSIONS, load_image_folder
from ofa_ufo.data.loaders.hf_datasets import load_hf_dataset
from ofa_ufo.data.loaders.jsonl import load_jsonl
from ofa_ufo.data.loaders.karpathy import KARPATHY_SPLITS, KARPATHY_UNITS, karpathy_splits, load_coco_karpathy
from ofa_ufo.data.loaders.reid import (
    load_identity_folder, load_lfw_pairs, load_market1501, load_msmt17, load_sop, load_veri776,
)
from ofa_ufo.data.loaders.snli_ve import load_snli_ve
from ofa_ufo.data.loaders.tsv import TSV_LAYOUTS, load_ofa_tsv
from ofa_ufo.data.loaders.vqa_v2 import (
    VQA_ANSWER_VOCABULARY_SIZE, build_answer_vocabulary, load_vqa_v2, read_answer_vocabulary, write_answer_vocabulary,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "KARPATHY_SPLITS",
    "KARPATHY_UNITS",
    "TSV_LAYOUTS",
    "VQA_ANSWER_VOCABULARY_SIZE",
    "LoadReport",
    "OnError",
    "build_answer_vocabulary",
    "karpathy_splits",
    "load_coco_captions",
    "load_coco_instances",
    "load_coco_karpathy",
    "load_hf_dataset",
    "load_identity_folder",
    "load_image_folder",
    "load_jsonl",
    "load_lfw_pairs",
    "load_market1501",
    "load_msmt17",
    "load_ofa_tsv",
    "load_refcoco",
    "load_snli_ve",
    "load_sop",
    "load_veri776",
    "load_vqa_v2",
    "read_answer_vocabulary",
    "read_pickle",
    "write_answer_vocabulary",
]
