"""Dataset records, readers for the public medical VQA / report layouts, and a medical image loader.

Light on import: `datasets`, pyarrow, pydicom and nibabel are imported only when a function needs them.
"""

from .images import ImageLoadError, image_bytes_hash, load_image
from .readers import (
    READERS,
    load_records,
    load_vqa_dataset,
    read_generic,
    read_iu_xray,
    read_llava,
    read_llava_med_eval,
    read_pathvqa,
    read_pmc_vqa,
    read_reports,
    read_slake,
    read_vqa_rad,
)
from .records import (
    DataError,
    Records,
    SkippedRecord,
    Turn,
    VQARecord,
    content_hash,
    dataset_to_records,
    normalize_answer_type,
    records_to_dataset,
)

__all__ = [
    "DataError",
    "ImageLoadError",
    "Records",
    "SkippedRecord",
    "Turn",
    "VQARecord",
    "READERS",
    "content_hash",
    "dataset_to_records",
    "image_bytes_hash",
    "load_image",
    "load_records",
    "load_vqa_dataset",
    "normalize_answer_type",
    "read_generic",
    "read_iu_xray",
    "read_llava",
    "read_llava_med_eval",
    "read_pathvqa",
    "read_pmc_vqa",
    "read_reports",
    "read_slake",
    "read_vqa_rad",
    "records_to_dataset",
]
