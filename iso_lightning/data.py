"""Dataset files: readers for the IDX format of MNIST and Fashion-MNIST and CIFAR's python pickles.

Fashion-MNIST is looked up in ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist`` package) unless another directory is given.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_FASHION_MNIST", "load_idx_dataset", "read_idx"]

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Union[str, os.PathLike]) -> Tensor:
    """Read an IDX file (optionally gzip-compressed) into a tensor.

    Raises:
        ValueError: the file is not a valid IDX file (bad magic, unknown type or truncated data).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])  # type: ignore[call-overload]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path} is truncated or padded: expected {expected} data bytes for shape {dims}, "
                         f"found {len(data) - header}.")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("=")).copy())


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"Expected `{stem}` (or `{stem}.gz`) in {root}, but it is not there.")


def load_idx_dataset(root: Optional[Union[str, os.PathLike]] = None, train: bool = True) -> Tuple[Tensor, Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of an MNIST-format directory.

    ``root`` defaults to :data:`DEFAULT_FASHION_MNIST`.
    """
    root = DEFAULT_FASHION_MNIST if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset directory {root} does not exist. On Debian install it with "
            "`apt-get install dataset-fashion-mnist`, or pass the directory holding the IDX files."
        )
    images_file, labels_file = _FILES[bool(train)]
    images = read_idx(_find(root, images_file))
    labels = read_idx(_find(root, labels_file)).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return images, labels


def find_idx_dataset(root: Union[str, os.PathLike], subdirs: Sequence[str] = ("",)) -> Optional[Path]:
    """The first of ``root / subdir`` that holds the four IDX files of an MNIST-format dataset, or ``None``.

    Each file may be gzip-compressed or not (see :func:`load_idx_dataset`). ``subdirs`` lists the layouts
    to search, e.g. ``("", "MNIST/raw")`` for the directory itself and torchvision's layout.
    """
    for subdir in subdirs:
        candidate = Path(root) / subdir
        if not candidate.is_dir():
            continue
        try:
            for stem in _FILES[True] + _FILES[False]:
                _find(candidate, stem)
        except FileNotFoundError:
            continue
        return candidate
    return None


CIFAR_FILES = {
    10: ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta"),
    100: ("cifar-100-python", ("train",), ("test",), "meta"),
}
"""For CIFAR-10 and CIFAR-100: the folder, the training files, the test files and the metadata file."""


def _cifar_dict(path: Path) -> dict:
    # The official batches are Python 2 pickles: ``latin1`` is what NumPy needs to rebuild their arrays,
    # it turns Python 2 ``str`` keys into ``str``, while keys pickled as ``bytes`` stay ``bytes``.
    with open(path, "rb") as fh:
        content = pickle.load(fh, encoding="latin1")
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a CIFAR batch: expected a pickled dict, found {type(content).__name__}.")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _cifar_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    batch = _cifar_dict(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path} is not a CIFAR batch: expected keys 'data' and {label_key!r}, "
                         f"found {sorted(map(str, batch))}.")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected 'data' to be uint8 of shape (N, 3072), found {data.dtype} {data.shape}.")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}.")
    return data, labels


def cifar_files_present(root: Union[str, os.PathLike], num_classes: int = 10) -> bool:
    """Whether ``root`` holds the extracted python version of CIFAR-10 (``num_classes=10``) or CIFAR-100."""
    folder, train_files, test_files, _ = CIFAR_FILES[num_classes]
    return all((Path(root) / folder / name).is_file() for name in train_files + test_files)


def load_cifar_dataset(root: Union[str, os.PathLike], train: bool = True, num_classes: int = 10,
                       label: str = "fine") -> Tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of the python version of CIFAR-10 or CIFAR-100.

    ``root`` is the directory that holds ``cifar-10-batches-py`` (``num_classes=10``) or ``cifar-100-python``
    (``num_classes=100``), as torchvision's ``CIFAR10(root, download=True)`` leaves it. ``label`` picks the
    CIFAR-100 labels: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses). Unlike torchvision's
    reader, no checksum is required. The files are pickles: only read files from a source you trust.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
        ValueError: a file is not a CIFAR batch (missing keys, wrong dtype or shape).
    """
    if num_classes not in CIFAR_FILES:
        raise ValueError(f"Expected argument `num_classes` to be 10 or 100, but got {num_classes!r}.")
    if label not in ("fine", "coarse"):
        raise ValueError(f"Expected argument `label` to be 'fine' or 'coarse', but got {label!r}.")
    folder, train_files, test_files, _ = CIFAR_FILES[num_classes]
    label_key = "labels" if num_classes == 10 else f"{label}_labels"
    parts = []
    for name in train_files if train else test_files:
        path = Path(root) / folder / name
        if not path.is_file():
            raise FileNotFoundError(f"Expected the CIFAR batch `{name}` in {path.parent}, but it is not there.")
        parts.append(_cifar_batch(path, label_key))
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # Each row is the red, then green, then blue 32 x 32 plane, row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar_label_names(root: Union[str, os.PathLike], num_classes: int = 10,
                           label: str = "fine") -> Optional[List[str]]:
    """The class names stored in the CIFAR metadata file, or ``None`` when the file or its key is missing."""
    folder, _, _, meta = CIFAR_FILES[num_classes]
    path = Path(root) / folder / meta
    if not path.is_file():
        return None
    key = "label_names" if num_classes == 10 else f"{label}_label_names"
    names = _cifar_dict(path).get(key)
    if names is None:
        return None
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


__all__ += ["CIFAR_FILES", "cifar_files_present", "find_idx_dataset", "load_cifar_dataset", "load_cifar_label_names"]
