"""Quality metrics: offline FID / KID on Inception features, and prompt adherence by a classifier."""

from hybridsd_nas.metrics.adherence import (
    SmallCNN,
    load_classifier,
    predict,
    prompt_adherence,
    save_classifier,
    train_classifier,
)
from hybridsd_nas.metrics.fid import (
    CACHE_ENV,
    FEATURE_ID,
    FeatureExtractor,
    cache_dir,
    fid_folders,
    fid_helper_fid,
    fid_kid,
    folder_reference,
    load_image_folder,
    reference_features,
)

__all__ = [
    "CACHE_ENV",
    "FEATURE_ID",
    "FeatureExtractor",
    "SmallCNN",
    "cache_dir",
    "fid_folders",
    "fid_helper_fid",
    "fid_kid",
    "folder_reference",
    "load_classifier",
    "load_image_folder",
    "predict",
    "prompt_adherence",
    "reference_features",
    "save_classifier",
    "train_classifier",
]
