"""Public dataset API of sb3-uepo.

    from sb3_uepo.datasets import DEFAULT_DATASET, load_dataset, normalized_score

    data = load_dataset(DEFAULT_DATASET, env="Hopper-v5")   # embedded, Minari id, Minari dir, .hdf5 or .npz
    print(data.statistics().return_mean, normalized_score("Hopper-v5", data.statistics().return_mean))

``make_dataset`` (what ``uepo data make`` runs) is imported on first use: it pulls in SB3 and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sb3_uepo.common.datasets import (
    DEFAULT_DATASET,
    DatasetError,
    DatasetStatistics,
    OfflineDataset,
    list_datasets,
    load_dataset,
    normalized_score,
    validate_dataset,
)

if TYPE_CHECKING:
    from sb3_uepo.common.datasets.generate import make_dataset

__all__ = [
    "DEFAULT_DATASET",
    "DatasetError",
    "DatasetStatistics",
    "OfflineDataset",
    "list_datasets",
    "load_dataset",
    "make_dataset",
    "normalized_score",
    "validate_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "make_dataset":
        from sb3_uepo.common.datasets.generate import make_dataset

        return make_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
