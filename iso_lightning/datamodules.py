"""LightningDataModules for Fashion-MNIST, MNIST, CIFAR-10 and CIFAR-100, standardised per pixel.

Every datamodule holds out a seeded validation split of the training file, computes the mean and
standard deviation of every pixel (and channel) on the remaining *training* split only, and feeds
``(x / 255 - mean) / std`` as float32: flat vectors for MLPs (``flatten=True``) or ``(C, H, W)``
images for convolutional networks. The statistics are part of :meth:`ImageDataModule.state_dict`, so
a run resumed from a checkpoint standardises with the numbers it was trained with.

The modules are glue: the files are read by :mod:`iso_lightning.data` (IDX files and the python
version of CIFAR), and missing data are downloaded through torchvision.

Example:
    >>> from iso_lightning.datamodules import DATAMODULES
    >>> dm = DATAMODULES["cifar10"](batch_size=128, flatten=False)
    >>> dm.image_shape, dm.num_features, dm.num_classes
    ((3, 32, 32), 3072, 10)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from iso_lightning._validation import check_bool as _check_bool
from iso_lightning._validation import check_int as _check_int
from iso_lightning.data import (
    CIFAR_FILES,
    DEFAULT_FASHION_MNIST,
    cifar_files_present,
    find_idx_dataset,
    load_cifar_dataset,
    load_cifar_label_names,
    load_idx_dataset,
)

__all__ = [
    "DATAMODULES",
    "DEFAULT_STD_FLOOR",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "StandardisedImages",
    "pixel_statistics",
]

DEFAULT_STD_FLOOR = 1.0 / 255.0
"""Smallest standard deviation a pixel is divided by (in units of the ``[0, 1]`` intensity scale).

A pixel that is (almost) constant over the training split, such as an MNIST corner, has a standard
deviation near zero; dividing by it would turn a one-grey-level change in a test image into a value
of thousands. One grey level (``1/255``) is the resolution of the data, so a pixel is never scaled by
more than ``255``: one grey level becomes at most one unit.
"""

_STAGES = (None, "fit", "validate", "test", "predict")


# -- argument checks ---------------------------------------------------------------------------------


def _check_val_fraction(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif isinstance(value, int):
        ok = value >= 0
    else:
        ok = 0.0 <= value < 1.0
    if not ok:
        raise ValueError(
            "Expected argument `val_fraction` to be an int >= 0 (a number of samples) or a float in [0, 1) "
            f"(a fraction of the training set), but got {value!r}."
        )


# -- statistics and datasets -------------------------------------------------------------------------
def pixel_statistics(images: Tensor, std_floor: float = DEFAULT_STD_FLOOR,
                     chunk_size: int = 2048) -> Tuple[Tensor, Tensor]:
    """Mean and standard deviation of every pixel of ``uint8`` images, on the ``[0, 1]`` intensity scale.

    The standard deviation is the population one (divisor ``N``), so the standardised training images
    have standard deviation exactly 1 in every pixel whose deviation is above ``std_floor``; it is
    floored at ``std_floor`` (see :data:`DEFAULT_STD_FLOOR`).

    The sums of the values and of their squares are accumulated exactly in ``int64`` (chunk by chunk,
    to bound memory), so the variance ``(N S_2 - S_1^2) / (255 N)^2`` suffers a single rounding and no
    cancellation, even for 60,000 nearly constant pixels.

    Args:
        images: ``uint8`` tensor ``(N, ...)`` with ``N >= 1``.
        std_floor: the smallest standard deviation returned.
        chunk_size: samples converted to ``int64`` at a time.

    Returns:
        ``mean`` and ``std``: float32 tensors of shape ``images.shape[1:]``.

    Example:
        >>> images = torch.tensor([[0, 255, 7], [255, 255, 7]], dtype=torch.uint8)
        >>> mean, std = pixel_statistics(images)
        >>> mean, std * 255
        (tensor([0.5000, 1.0000, 0.0275]), tensor([127.5000,   1.0000,   1.0000]))
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"Expected argument `images` to be a uint8 tensor, but got {images.dtype}.")
    if images.ndim < 1 or images.shape[0] == 0:
        raise ValueError(
            f"Expected argument `images` to hold at least one sample, but got shape {tuple(images.shape)}."
        )
    n = images.shape[0]
    s1 = torch.zeros(images.shape[1:], dtype=torch.int64)
    s2 = torch.zeros(images.shape[1:], dtype=torch.int64)
    for start in range(0, n, chunk_size):
        block = images[start : start + chunk_size].to(torch.int64)
        s1 += block.sum(0)
        s2 += (block * block).sum(0)
    # n * s2 <= n^2 * 255^2 stays far below 2^63 for any image data set that fits in memory.
    numerator = (n * s2 - s1 * s1).to(torch.float64)
    mean = s1.to(torch.float64) / (255.0 * n)
    std = (numerator.clamp_min(0).sqrt() / (255.0 * n)).clamp_min(std_floor)
    return mean.to(torch.float32), std.to(torch.float32)


class StandardisedImages(Dataset):
    """``uint8`` images and int64 labels served as ``((x / 255 - mean) / std, label)``.

    The images stay ``uint8`` (a quarter of the memory of float32); batches are standardised when
    they are read, several samples at a time through ``__getitems__``.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        mean: float32 tensor ``(C, H, W)``.
        std: float32 tensor ``(C, H, W)``, positive.
        flatten: serve vectors of ``C * H * W`` features instead of ``(C, H, W)`` images.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, flatten: bool = True) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {labels.shape[0]} labels.")
        self.images, self.labels = images, labels
        self.mean, self.std, self.flatten = mean, std, flatten
        # (x / 255 - mean) / std as one multiply-add: two tensor operations per batch instead of four.
        self._scale = (1.0 / (255.0 * std.to(torch.float64))).to(torch.float32)
        self._shift = (-mean.to(torch.float64) / std.to(torch.float64)).to(torch.float32)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _standardise(self, images: Tensor) -> Tensor:
        x = torch.addcmul(self._shift, images.to(torch.float32), self._scale)
        return x.flatten(1) if self.flatten else x

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        return self._standardise(self.images[index].unsqueeze(0))[0], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
        # index_select, a plain gather along dim 0: for 48 of 54,000 uint8 images it measured ~15x cheaper
        # than advanced indexing (torch 2.14, one CPU thread).
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self._standardise(self.images.index_select(0, index))
        return list(zip(x.unbind(0), self.labels.index_select(0, index).unbind(0)))

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """The whole dataset as two tensors: standardised float32 inputs and int64 labels."""
        return self._standardise(self.images), self.labels


class _EpochSeededSampler(RandomSampler):
    """A random permutation per epoch, drawn from ``(seed, epoch)``: the same orders in a resumed run.

    Lightning calls :meth:`set_epoch` at the start of every training epoch; used on its own, the
    sampler moves on to the next epoch each time it is iterated. It is a ``RandomSampler``, so
    Lightning recognises it as shuffling and replaces it by a ``DistributedSampler`` under DDP.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch
        self.epoch += 1
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()  # type: ignore[arg-type]


# -- the datamodules ---------------------------------------------------------------------------------
class ImageDataModule(pl.LightningDataModule):
    """Base class: a labelled image data set with a seeded validation split and per-pixel standardisation.

    Subclasses set :attr:`IMAGE_SHAPE`, :attr:`NUM_CLASSES` and :attr:`DISPLAY_NAME` and implement the
    file hooks ``_files_present``, ``_download``, ``_load`` and ``_missing_hint``.

    The training file (its first ``train_subset`` samples, when given) is split at random with
    ``seed`` into a validation and a training split. ``mean`` and ``std`` (float32, shape
    :attr:`image_shape`, on the ``[0, 1]`` intensity scale, population standard deviation floored at
    ``std_floor``) are computed on the training split only and applied to all three splits.

    Args:
        data_dir: the directory holding the data (see each subclass for the layouts searched).
        batch_size: samples per batch of every dataloader.
        val_fraction: validation samples held out of the training file: an int is a number of samples,
            a float in ``[0, 1)`` a fraction (rounded to the nearest sample). ``0`` gives an empty
            validation set (a Trainer then skips validation, with a warning).
        num_workers: worker processes of every dataloader.
        flatten: serve vectors of :attr:`num_features` values (for MLPs) instead of ``(C, H, W)``
            images (for convolutional networks).
        train_subset: use only the first ``train_subset`` samples of the training file (before the
            validation split), for quick runs; ``None`` uses all of them.
        download: let :meth:`prepare_data` download missing files through torchvision.
        seed: seed of the validation split and of the order of the training samples (epoch ``e``
            uses a permutation drawn from ``(seed, e)``, so a resumed run sees the same orders).
        std_floor: the smallest standard deviation a pixel is divided by (:data:`DEFAULT_STD_FLOOR`).

    Attributes:
        mean: per-pixel mean of the training split, ``None`` before :meth:`setup`.
        std: per-pixel standard deviation of the training split, ``None`` before :meth:`setup`.
        train_indices: positions in the training file of the training split (sorted), after :meth:`setup`.
        val_indices: positions in the training file of the validation split (sorted), after :meth:`setup`.
    """

    IMAGE_SHAPE: ClassVar[Tuple[int, int, int]] = (1, 1, 1)
    NUM_CLASSES: ClassVar[int] = 0
    DISPLAY_NAME: ClassVar[str] = "images"
    CLASSES: ClassVar[Optional[Tuple[str, ...]]] = None

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, batch_size: int = 48,
                 val_fraction: Union[int, float] = 0.1, num_workers: int = 0, flatten: bool = True,
                 train_subset: Optional[int] = None, download: bool = True, seed: int = 0,
                 std_floor: float = DEFAULT_STD_FLOOR) -> None:
        super().__init__()
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"Expected argument `data_dir` to be None, a str or a path, but got {data_dir!r}.")
        _check_int("batch_size", batch_size, 1)
        _check_val_fraction(val_fraction)
        _check_int("num_workers", num_workers, 0)
        _check_bool("flatten", flatten)
        _check_int("train_subset", train_subset, 1, optional=True)
        _check_bool("download", download)
        _check_int("seed", seed, 0)
        if isinstance(std_floor, bool) or not isinstance(std_floor, (int, float)) or not (
            math.isfinite(std_floor) and std_floor > 0
        ):
            raise ValueError(f"Expected argument `std_floor` to be a finite float > 0, but got {std_floor!r}.")
        self.data_dir = Path(data_dir) if data_dir is not None else self._default_data_dir()
        self.batch_size, self.val_fraction, self.num_workers = batch_size, val_fraction, num_workers
        self.flatten, self.train_subset, self.download = flatten, train_subset, download
        self.seed, self.std_floor = seed, float(std_floor)
        self.mean: Optional[Tensor] = None
        self.std: Optional[Tensor] = None
        self._train: Optional[Tuple[Tensor, Tensor]] = None
        self._val: Optional[Tuple[Tensor, Tensor]] = None
        self._test: Optional[Tuple[Tensor, Tensor]] = None
        self.train_indices: Optional[Tensor] = None
        self.val_indices: Optional[Tensor] = None
        self._classes: Optional[List[str]] = list(self.CLASSES) if self.CLASSES is not None else None

    # -- what a model needs to know ------------------------------------------------------------------
    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image (known before :meth:`setup`)."""
        return self.IMAGE_SHAPE

    @property
    def num_features(self) -> int:
        """Number of values of one image, ``C * H * W``: the input size of an MLP."""
        return int(np.prod(self.image_shape))

    @property
    def num_classes(self) -> int:
        """Number of classes: the output size of a classifier."""
        return self.NUM_CLASSES

    @property
    def classes(self) -> Optional[List[str]]:
        """Class names, index by index, or ``None`` when unknown (CIFAR reads them from its metadata file)."""
        return self._classes

    # -- file hooks of the subclasses --------------------------------------------------------------------
    @classmethod
    def _default_data_dir(cls) -> Path:
        return Path("./data")

    def _files_present(self) -> bool:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def _load(self, train: bool) -> Tuple[Tensor, Tensor]:
        """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of the training or test file."""
        raise NotImplementedError

    def _missing_hint(self) -> str:
        raise NotImplementedError

    def _missing_error(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.DISPLAY_NAME} was not found in {self.data_dir} ({self._missing_hint()}). Remedy: "
            f"{self._remedy()}, or point `data_dir` at a directory that holds it."
        )

    def _remedy(self) -> str:
        return ("construct the datamodule with `download=True` and call `prepare_data()` (a Trainer calls it) to "
                "download it through torchvision")

    # -- LightningDataModule hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the data through torchvision when the files are missing and ``download=True``.

        Raises:
            FileNotFoundError: the files are missing and ``download=False`` (the message names the
                directory and the remedy), or the download left no usable files.
            RuntimeError: the download failed (no network, unreachable mirror).
        """
        if self._files_present():
            return
        if not self.download:
            raise self._missing_error()
        try:
            self._download()
        except ImportError:
            raise
        except Exception as err:
            raise RuntimeError(
                f"Could not download {self.DISPLAY_NAME} into {self.data_dir}: {type(err).__name__}: {err}. "
                "Download it on a machine with network access and copy it there, or point `data_dir` at a "
                "directory that holds it."
            ) from err
        if not self._files_present():
            raise self._missing_error()

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits ``stage`` needs and compute the statistics (unless a checkpoint provided them).

        ``"fit"`` and ``"validate"`` load the training file; ``"test"`` and ``"predict"`` the test file
        (and the training file too when the statistics are still unknown); ``None`` loads both.

        Raises:
            FileNotFoundError: the data are missing (the message names the directory and the remedy).
            ValueError: ``stage`` is unknown, the files do not hold images of :attr:`image_shape` with
                labels below :attr:`num_classes`, or the validation split leaves no training sample.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected argument `stage` to be one of {_STAGES}, but got {stage!r}.")
        if self._train is None and (stage in (None, "fit", "validate") or self.mean is None):
            if not self._files_present():
                raise self._missing_error()
            images, labels = self._checked(*self._load(train=True), "training")
            if self.train_subset is not None:
                images, labels = images[: self.train_subset], labels[: self.train_subset]
            train_index, val_index = self._split(images.shape[0])
            self.train_indices, self.val_indices = train_index, val_index
            self._train = (images.index_select(0, train_index), labels.index_select(0, train_index))
            self._val = (images.index_select(0, val_index), labels.index_select(0, val_index))
            if self.mean is None:
                self.mean, self.std = pixel_statistics(self._train[0], self.std_floor)
        if self._test is None and stage in (None, "test", "predict"):
            if not self._files_present():
                raise self._missing_error()
            self._test = self._checked(*self._load(train=False), "test")

    def _checked(self, images: Tensor, labels: Tensor, split: str) -> Tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"Expected the {split} images of {self.DISPLAY_NAME} in {self.data_dir} to be uint8 of shape "
                f"(N, {', '.join(map(str, self.image_shape))}), but got {images.dtype} {tuple(images.shape)}."
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"Expected the {split} labels of {self.DISPLAY_NAME} in {self.data_dir} to lie in "
                f"[0, {self.num_classes}), but got values from {int(labels.min())} to {int(labels.max())}."
            )
        return images, labels.to(torch.int64)

    def _num_val(self, n: int) -> int:
        if isinstance(self.val_fraction, float):
            return int(round(self.val_fraction * n))
        return self.val_fraction

    def _split(self, n: int) -> Tuple[Tensor, Tensor]:
        n_val = self._num_val(n)
        if n_val >= n:
            raise ValueError(
                f"Expected argument `val_fraction` to leave training samples, but got {self.val_fraction!r}: "
                f"{n_val} validation samples out of {n}."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        # Sorted, so each split keeps the order of the file.
        return order[n_val:].sort().values, order[:n_val].sort().values

    def _dataset(self, split: Optional[Tuple[Tensor, Tensor]], name: str) -> StandardisedImages:
        if split is None or self.mean is None or self.std is None:
            raise RuntimeError(f"The {name} split of {type(self).__name__} is not loaded: call `setup()` first.")
        return StandardisedImages(split[0], split[1], self.mean, self.std, self.flatten)

    @property
    def train_dataset(self) -> StandardisedImages:
        """The standardised training split (after :meth:`setup`)."""
        return self._dataset(self._train, "training")

    @property
    def val_dataset(self) -> StandardisedImages:
        """The standardised validation split (after :meth:`setup`)."""
        return self._dataset(self._val, "validation")

    @property
    def test_dataset(self) -> StandardisedImages:
        """The standardised test set (after :meth:`setup` with stage ``"test"`` or ``None``)."""
        return self._dataset(self._test, "test")

    def _loader(self, dataset: StandardisedImages, shuffle: bool) -> DataLoader:
        sampler = _EpochSeededSampler(dataset, self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Batches of the training split, in a seeded order that changes every epoch.

        Under DDP, Lightning replaces the sampler by a ``DistributedSampler`` (its own seed, also per epoch).
        """
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in file order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test set, in file order."""
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test set (labels included), in file order."""
        return self._loader(self.test_dataset, shuffle=False)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _split_config(self) -> Dict[str, Any]:
        return {"seed": self.seed, "val_fraction": self.val_fraction, "train_subset": self.train_subset}

    def state_dict(self) -> Dict[str, Any]:
        """The standardisation statistics and the split they were computed on (empty before :meth:`setup`)."""
        if self.mean is None or self.std is None:
            return {}
        return {"mean": self.mean.clone(), "std": self.std.clone(), **self._split_config()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Use the statistics of a checkpoint, whether :meth:`setup` ran before or runs after.

        A split configuration that differs from the checkpoint's is allowed, with a warning: the
        statistics then come from a different training split than the one in use.
        """
        mean, std = state_dict.get("mean"), state_dict.get("std")
        if mean is None or std is None:
            return
        for name, value in (("mean", mean), ("std", std)):
            if not isinstance(value, Tensor) or tuple(value.shape) != self.image_shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"Expected the checkpoint's `{name}` to be a tensor of shape {self.image_shape}, but got {shape}."
                )
        if not bool((std > 0).all()):
            raise ValueError("Expected the checkpoint's `std` to be positive everywhere, but it is not.")
        changed = {key: (state_dict[key], value) for key, value in self._split_config().items()
                   if key in state_dict and state_dict[key] != value}
        if changed:
            details = ", ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in changed.items())
            rank_zero_warn(f"{type(self).__name__}: the split differs from the checkpoint's ({details}); the "
                           "checkpoint's statistics are used with the current split.")
        self.mean = mean.detach().to("cpu", torch.float32).clone()
        self.std = std.detach().to("cpu", torch.float32).clone()


class _IDXDataModule(ImageDataModule):
    """MNIST-format data: four IDX files (gzip-compressed or not), flat or in torchvision's layout."""

    IMAGE_SHAPE = (1, 28, 28)
    NUM_CLASSES = 10
    _TORCHVISION: ClassVar[str] = ""

    def _candidates(self) -> Tuple[str, str]:
        return ("", f"{self._TORCHVISION}/raw")

    def _located(self) -> Optional[Path]:
        return find_idx_dataset(self.data_dir, self._candidates())

    def _files_present(self) -> bool:
        return self._located() is not None

    def _missing_hint(self) -> str:
        return (f"expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                f"t10k-labels-idx1-ubyte (each optionally .gz) in it or in {self.data_dir / self._candidates()[1]}")

    def _download(self) -> None:
        datasets = _torchvision_datasets()
        getattr(datasets, self._TORCHVISION)(str(self.data_dir), train=True, download=True)

    def _load(self, train: bool) -> Tuple[Tensor, Tensor]:
        root = self._located()
        if root is None:
            raise self._missing_error()
        images, labels = load_idx_dataset(root, train=train)
        return images.unsqueeze(1), labels


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST: 60,000 training and 10,000 test images of 28 x 28 grey levels, 10 classes of clothes.

    ``data_dir`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``
    package) when that directory exists, else ``./data``. The IDX files are searched in ``data_dir``
    itself and in ``data_dir/FashionMNIST/raw`` (where torchvision downloads them). Arguments: see
    :class:`ImageDataModule`.

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=64, val_fraction=5000)
        >>> dm.num_features, dm.num_classes, dm.classes[0]
        (784, 10, 'T-shirt/top')

    With the data present (``apt-get install dataset-fashion-mnist``)::

        dm = FashionMNISTDataModule()
        model = MyModel(IsotropicMLP([dm.num_features, 64, 64, dm.num_classes]))
        L.Trainer(max_epochs=3).fit(model, datamodule=dm)
    """

    DISPLAY_NAME = "Fashion-MNIST"
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
    _TORCHVISION = "FashionMNIST"

    @classmethod
    def _default_data_dir(cls) -> Path:
        return DEFAULT_FASHION_MNIST if DEFAULT_FASHION_MNIST.is_dir() else Path("./data")

    def _remedy(self) -> str:
        return (f"on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (it installs into {DEFAULT_FASHION_MNIST},"
                f" the default `data_dir`), or {super()._remedy()}")


class MNISTDataModule(_IDXDataModule):
    """MNIST: 60,000 training and 10,000 test images of 28 x 28 grey levels, the digits 0-9.

    The IDX files are searched in ``data_dir`` (default ``./data``) itself and in ``data_dir/MNIST/raw``
    (where ``torchvision.datasets.MNIST(data_dir, download=True)`` puts them). Arguments: see
    :class:`ImageDataModule`.

    Example:
        >>> dm = MNISTDataModule(data_dir="./data", flatten=False)
        >>> dm.image_shape, dm.num_classes
        ((1, 28, 28), 10)
    """

    DISPLAY_NAME = "MNIST"
    CLASSES = tuple(str(digit) for digit in range(10))
    _TORCHVISION = "MNIST"


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test colour images of 32 x 32 pixels, 10 classes.

    Reads the python version, ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
    (what ``torchvision.datasets.CIFAR10(data_dir, download=True)`` leaves), with
    :func:`~iso_lightning.data.load_cifar_dataset`: no checksum is required. The statistics are per
    pixel *and* channel (3072 means). Arguments: see :class:`ImageDataModule`.

    Example:
        >>> dm = CIFAR10DataModule(flatten=False)
        >>> dm.image_shape, dm.num_features, dm.num_classes
        ((3, 32, 32), 3072, 10)
    """

    IMAGE_SHAPE = (3, 32, 32)
    NUM_CLASSES = 10
    DISPLAY_NAME = "CIFAR-10"
    CLASSES: ClassVar[Optional[Tuple[str, ...]]] = (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    )
    _TORCHVISION: ClassVar[str] = "CIFAR10"
    label: str = "fine"

    def _files_present(self) -> bool:
        return cifar_files_present(self.data_dir, self.NUM_CLASSES)

    def _missing_hint(self) -> str:
        folder, train_files, test_files, _ = CIFAR_FILES[self.NUM_CLASSES]
        return f"expected {', '.join(train_files + test_files)} in {self.data_dir / folder}"

    def _download(self) -> None:
        datasets = _torchvision_datasets()
        getattr(datasets, self._TORCHVISION)(str(self.data_dir), train=True, download=True)

    def _load(self, train: bool) -> Tuple[Tensor, Tensor]:
        names = load_cifar_label_names(self.data_dir, self.NUM_CLASSES, self.label)
        if names is not None:
            self._classes = names
        return load_cifar_dataset(self.data_dir, train=train, num_classes=self.NUM_CLASSES, label=self.label)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 training and 10,000 test colour images of 32 x 32 pixels, 100 classes in 20 superclasses.

    Reads ``data_dir/cifar-100-python/{train, test, meta}`` (what
    ``torchvision.datasets.CIFAR100(data_dir, download=True)`` leaves). Class names come from ``meta``
    after :meth:`setup`.

    Args:
        label: ``"fine"`` for the 100 classes or ``"coarse"`` for the 20 superclasses.
        The other arguments: see :class:`ImageDataModule`.

    Example:
        >>> CIFAR100DataModule().num_classes, CIFAR100DataModule(label="coarse").num_classes
        (100, 20)
    """

    NUM_CLASSES = 100
    DISPLAY_NAME = "CIFAR-100"
    CLASSES = None
    _TORCHVISION = "CIFAR100"

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, batch_size: int = 48,
                 val_fraction: Union[int, float] = 0.1, num_workers: int = 0, flatten: bool = True,
                 train_subset: Optional[int] = None, download: bool = True, seed: int = 0,
                 std_floor: float = DEFAULT_STD_FLOOR, label: str = "fine") -> None:
        if label not in ("fine", "coarse"):
            raise ValueError(f"Expected argument `label` to be 'fine' or 'coarse', but got {label!r}.")
        super().__init__(data_dir, batch_size, val_fraction, num_workers, flatten, train_subset, download, seed,
                         std_floor)
        self.label = label

    @property
    def num_classes(self) -> int:
        return 100 if self.label == "fine" else 20

    def _split_config(self) -> Dict[str, Any]:
        return {**super()._split_config(), "label": self.label}


def _torchvision_datasets() -> Any:
    try:
        from torchvision import datasets
    except ImportError as err:  # torchvision is a dependency, but a trimmed environment may lack it
        raise ImportError("Downloading needs torchvision: `pip install torchvision`.") from err
    return datasets


DATAMODULES: Dict[str, Type[ImageDataModule]] = {
    "fashion-mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}
"""Datamodule classes by name, e.g. for a ``--dataset`` command-line option."""
