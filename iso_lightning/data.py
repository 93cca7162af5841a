"""Dataset files: readers for the IDX format of MNIST and Fashion-MNIST.

Fashion-MNIST is looked up in ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist`` package) unless another directory is given.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

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
