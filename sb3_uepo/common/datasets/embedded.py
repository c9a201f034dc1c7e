"""Datasets shipped inside the package (``sb3_uepo/data/<name>/``, Minari directory layout).

Owns: the name of the default dataset and resolving embedded names to directories.
Must not touch: reading the data (see ``loaders.py``).

The default dataset, ``hopper-medium-v0``, was made with ``uepo data make`` (Hopper-v5, level medium,
80k steps); its data card is ``docs/datasets.md``.
"""

from __future__ import annotations

from pathlib import Path

# Name of the dataset the main job and the examples use when none is given.
DEFAULT_DATASET = "hopper-medium-v0"

EMBEDDED_ROOT = Path(__file__).resolve().parents[2] / "data"


def embedded_datasets() -> dict[str, Path]:
    """Embedded dataset names and their directories (each holds ``data/metadata.json``)."""
    if not EMBEDDED_ROOT.is_dir():
        return {}
    return {
        directory.name: directory
        for directory in sorted(EMBEDDED_ROOT.iterdir())
        if (directory / "data" / "metadata.json").is_file()
    }


def embedded_dataset_path(name: str) -> Path | None:
    """Directory of the embedded dataset called ``name``, or None when there is none by that name.

    :param name: dataset name, e.g. :data:`DEFAULT_DATASET`
    """
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    directory = EMBEDDED_ROOT / name
    return directory if (directory / "data" / "metadata.json").is_file() else None
