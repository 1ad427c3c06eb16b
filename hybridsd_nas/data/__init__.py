"""Real image sets that install offline, the prompts built from their class names, training-data
sources named by one spec string, and their encoded latents cached on disk."""

from hybridsd_nas.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DIR,
    ENV_DIR,
    DatasetMissingError,
    FashionMNIST,
    load_fashion_mnist,
    to_rgb_uint8,
)
from hybridsd_nas.data.latents import (
    LatentData,
    Rows,
    cache_key,
    encode_images,
    encode_source,
    encode_text,
    pipeline_key,
)
from hybridsd_nas.data.prompts import PROMPT_TEMPLATES, class_prompt, eval_prompts, prompt_for_label
from hybridsd_nas.data.sources import (
    IMAGE_EXTS,
    SPEC_FORMS,
    DataSpec,
    Example,
    folder_items,
    iter_examples,
    parse_data_spec,
    prepare_image,
    read_prompt_file,
    validate_source,
)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DIR",
    "ENV_DIR",
    "DataSpec",
    "DatasetMissingError",
    "Example",
    "FashionMNIST",
    "IMAGE_EXTS",
    "LatentData",
    "PROMPT_TEMPLATES",
    "Rows",
    "SPEC_FORMS",
    "cache_key",
    "class_prompt",
    "encode_images",
    "encode_source",
    "encode_text",
    "eval_prompts",
    "folder_items",
    "iter_examples",
    "load_fashion_mnist",
    "parse_data_spec",
    "pipeline_key",
    "prepare_image",
    "prompt_for_label",
    "read_prompt_file",
    "to_rgb_uint8",
    "validate_source",
]
