"""Pieces shared by the experiment scripts: standardised data, a shared data order, mean ± s.e."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from iso_lightning.datamodules import DATAMODULES

DATASETS = tuple(DATAMODULES)
Data = Tuple[Tensor, Tensor, Tensor, Tensor]


def prepare(dataset: str, data_dir: Optional[str], train_subset: Optional[int]) -> Tuple[Data, int]:
    """Standardised ``(x_train, y_train, x_test, y_test)`` (flattened) and the number of classes."""
    dm = DATAMODULES[dataset](data_dir=data_dir, val_fraction=0, train_subset=train_subset, flatten=True)
    dm.prepare_data()
    dm.setup(None)
    x_train, y_train = dm.train_dataset.tensors()
    x_test, y_test = dm.test_dataset.tensors()
    return (x_train.contiguous(), y_train, x_test.contiguous(), y_test), dm.num_classes


def data_order(seed: int, n: int, epochs: int) -> List[Tensor]:
    """One permutation of the training set per epoch, from the seed alone: shared by every model."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g) for _ in range(epochs)]


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error (NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
