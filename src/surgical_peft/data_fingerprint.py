"""What data a run trains on, as its checkpoints record it (`surgical_peft.training.identity`): a fingerprint of the
dataset, and a description of how two fingerprints differ.

- a local folder (`imagefolder`): each image's file, relative to the folder, with its size in bytes;
- any other `datasets` dataset (from the Hub, or files that hold the images themselves): the fingerprint `datasets`
  gives it, which follows its files and every transformation, and its number of rows;
- the built-in digits: their name and number (scikit-learn ships them, unchanging), given by the caller.

Example:
    >>> old = {"source": "./data", "files": {"cat/0.png": 120, "dog/0.png": 98}}
    >>> new = {"source": "./data", "files": {"cat/0.png": 120, "cat/1.png": 130, "cat/2.png": 99, "dog/0.png": 101}}
    >>> describe_data_change(old, new)
    '2 images added to ./data/cat (1.png, 2.png); 1 image changed in ./data/dog (0.png)'
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

__all__ = ["describe_data_change", "fingerprint_data"]

_NAMES_SHOWN = 3  # file names a description names per folder; more are counted
_FOLDERS_SHOWN = 4  # folders a description names; more are counted


def _image_files(source: str, dataset: datasets.Dataset, column: str) -> dict[str, int] | None:
    """Each image's file under the folder `source` (a relative POSIX path) with its size; `None` where an image is
    not a file of that folder (bytes held in the dataset's own files, as a Hub dataset holds them)."""
    import datasets

    if not os.path.isdir(source):
        return None
    root = Path(source).resolve()
    files = {}
    for image in dataset.cast_column(column, datasets.Image(decode=False))[column]:
        path = Path(image["path"]).resolve() if image.get("path") and not image.get("bytes") else None
        if path is None or not path.is_relative_to(root) or not path.is_file():
            return None
        files[path.relative_to(root).as_posix()] = path.stat().st_size
    return dict(sorted(files.items()))


def fingerprint_data(source: str, dataset: datasets.Dataset, image_column: str = "image") -> dict[str, Any]:
    """The fingerprint of `dataset`, loaded from `source` (a local folder or a Hub id): the image files of a folder
    with their sizes, else the fingerprint `datasets` gives the dataset and its number of rows.

    Example:
        >>> import datasets
        >>> fingerprint = fingerprint_data("org/name", datasets.Dataset.from_dict({"x": [1, 2]}))
        >>> sorted(fingerprint), fingerprint["rows"]
        (['fingerprint', 'rows', 'source'], 2)
    """
    files = _image_files(source, dataset, image_column) if image_column in dataset.column_names else None
    if files is not None:
        return {"source": source, "files": files}
    return {"source": source, "fingerprint": dataset._fingerprint, "rows": dataset.num_rows}


def _images(count: int) -> str:
    return f"{count} image{'s' * (count != 1)}"


def _describe_files(source: str, old: Mapping[str, int], new: Mapping[str, int]) -> str:
    """The images added, removed and changed (in size), per folder, e.g. `3 images added to ./data/cat (a.png, ...)`
    (a few folders, each with a few names)."""
    changes = {
        "added to": sorted(new.keys() - old.keys()),
        "removed from": sorted(old.keys() - new.keys()),
        "changed in": sorted(name for name in old.keys() & new.keys() if old[name] != new[name]),
    }
    parts = []
    for how, names in changes.items():
        folders: dict[str, list[str]] = defaultdict(list)
        for name in names:
            path = PurePosixPath(name)
            folders[posixpath.join(source, str(path.parent))].append(path.name)
        for folder, files in folders.items():
            shown = ", ".join(files[:_NAMES_SHOWN]) + (", ..." if len(files) > _NAMES_SHOWN else "")
            parts.append(f"{_images(len(files))} {how} {folder} ({shown})")
    more = f"; and changes in {len(parts) - _FOLDERS_SHOWN} more folders" if len(parts) > _FOLDERS_SHOWN else ""
    return "; ".join(parts[:_FOLDERS_SHOWN]) + more


def _summary(fingerprint: Mapping[str, Any]) -> str:
    if "files" in fingerprint:
        return f"{_images(len(fingerprint['files']))} in files"
    if "fingerprint" in fingerprint:
        return f"datasets' fingerprint {fingerprint['fingerprint']}, {fingerprint.get('rows')} rows"
    return ", ".join(f"{key} {value}" for key, value in fingerprint.items() if key != "source")


def describe_data_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """How the data of fingerprint `new` differs from that of `old` (both from `fingerprint_data`, or a caller's own
    mapping), in words; `None` if they are the same.

    Example:
        >>> describe_data_change({"source": "d", "fingerprint": "ab12", "rows": 10},
        ...                      {"source": "d", "fingerprint": "cd34", "rows": 12})
        "datasets' fingerprint ab12, 10 rows then; datasets' fingerprint cd34, 12 rows now"
    """
    if dict(old) == dict(new):
        return None
    if "files" in old and "files" in new:
        return _describe_files(new["source"], old["files"], new["files"])
    return f"{_summary(old)} then; {_summary(new)} now"
