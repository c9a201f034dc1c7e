"""The dataset layer: one container (:class:`OfflineDataset`), one loader, validation, normalised scores,
and local D4RL-style dataset generation (``generate.py``, imported on demand because it pulls in SB3/torch).

Importing this package is light: minari, h5py, gymnasium and SB3 are imported only when used.
"""

from sb3_uepo.common.datasets.container import DatasetStatistics, OfflineDataset
from sb3_uepo.common.datasets.embedded import DEFAULT_DATASET, embedded_datasets
from sb3_uepo.common.datasets.loaders import list_datasets, load_dataset, minari_datasets_root, read_dataset
from sb3_uepo.common.datasets.scores import D4RL_REFERENCE_SCORES, normalized_score, reference_scores, task_from_id
from sb3_uepo.common.datasets.validation import DatasetError, validate_dataset

__all__ = [
    "D4RL_REFERENCE_SCORES",
    "DEFAULT_DATASET",
    "DatasetError",
    "DatasetStatistics",
    "OfflineDataset",
    "embedded_datasets",
    "list_datasets",
    "load_dataset",
    "minari_datasets_root",
    "normalized_score",
    "read_dataset",
    "reference_scores",
    "task_from_id",
    "validate_dataset",
]
