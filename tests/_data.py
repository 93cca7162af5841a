"""A private reader for the Fashion-MNIST IDX files used by the training tests.

The IDX format is a big-endian header (a magic number whose last byte is the number of dimensions,
then one ``uint32`` per dimension) followed by raw ``uint8`` values. Only the first ``n`` records are
read from the gzip stream, so asking for 2,000 images costs milliseconds.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from typing import Tuple

import numpy as np
import torch

FASHION_MNIST_DIR = os.environ.get("ISO_LIGHTNING_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_available() -> bool:
    return all(os.path.isfile(os.path.join(FASHION_MNIST_DIR, f)) for f in _FILES["train"])


def _read_idx(path: str, n: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
        if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte
            raise ValueError(f"{path}: not an uint8 IDX file (header {zero:#x}, {dtype_code:#x}).")
        dims = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        count = min(n, dims[0])
        per_record = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
        raw = fh.read(count * per_record)
    if len(raw) != count * per_record:
        raise ValueError(f"{path}: truncated, expected {count * per_record} bytes, got {len(raw)}.")
    return np.frombuffer(raw, dtype=np.uint8).reshape((count,) + tuple(dims[1:]))


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(n: int = 2000, size: int = 14, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` images as float32 ``(n, size * size)`` (standardised) and int64 labels ``(n,)``.

    ``size`` must divide 28; images are average-pooled down to ``size x size``.
    """
    if 28 % size:
        raise ValueError(f"Expected `size` to divide 28, but got {size}.")
    images_file, labels_file = _FILES[split]
    images = _read_idx(os.path.join(FASHION_MNIST_DIR, images_file), n).astype(np.float32) / 255.0
    labels = _read_idx(os.path.join(FASHION_MNIST_DIR, labels_file), n).astype(np.int64)
    k = 28 // size
    images = images.reshape(-1, size, k, size, k).mean(axis=(2, 4)).reshape(len(images), size * size)
    images = (images - images.mean()) / images.std()
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
