"""Datamodules on small generated files in the real formats (IDX, CIFAR pickles), and on the real Fashion-MNIST."""

import gzip
import pickle
import struct
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn

from iso_lightning.data import DEFAULT_FASHION_MNIST
from iso_lightning.datamodules import (
    DATAMODULES,
    DEFAULT_STD_FLOOR,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
)

N_TRAIN, N_TEST = 120, 30
CONSTANT_PIXEL = 7  # value of pixel 0 in every training image: its std is 0, so the floor is used


# -- file writers ------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(header + array.tobytes())
    else:
        path.write_bytes(header + array.tobytes())


def _images(rng, n, shape, train):
    # Test images come from another distribution (brighter): statistics taken from them would show.
    images = rng.integers(0 if train else 100, 256, (n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = CONSTANT_PIXEL if train else rng.integers(0, 256, n)
    return images


def make_idx(root: Path, layout: str = "flat", compress: bool = True, seed: int = 0):
    """MNIST-format files in ``root`` (flat) or ``root/MNIST/raw`` and ``root/FashionMNIST/raw`` (torchvision)."""
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n, train in (("train", N_TRAIN, True), ("t10k", N_TEST, False)):
        written[prefix] = (_images(rng, n, (28, 28), train), rng.integers(0, 10, n).astype(np.uint8))
    folders = [root] if layout == "flat" else [root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for prefix, (images, labels) in written.items():
            _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
            _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return {key: (images[:, None], labels.astype(np.int64)) for key, (images, labels) in written.items()}


def _pickle(path: Path, content: dict, bytes_keys: bool) -> None:
    if not bytes_keys:
        content = {key.decode(): value for key, value in content.items()}
    path.write_bytes(pickle.dumps(content, protocol=2))


def make_cifar(root: Path, num_classes: int = 10, bytes_keys: bool = True, seed: int = 0):
    """The python version of CIFAR-10 (5 training batches) or CIFAR-100 (one ``train`` file), with metadata."""
    rng = np.random.default_rng(seed)
    train = _images(rng, N_TRAIN, (3072,), True)
    test = _images(rng, N_TEST, (3072,), False)
    fine = {"train": rng.integers(0, num_classes, N_TRAIN), "test": rng.integers(0, num_classes, N_TEST)}
    coarse = {key: value // 5 for key, value in fine.items()}
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        chunks = np.array_split(np.arange(N_TRAIN), 5)
        for i, chunk in enumerate(chunks, start=1):
            _pickle(folder / f"data_batch_{i}", {b"batch_label": b"training batch", b"data": train[chunk],
                                                 b"labels": fine["train"][chunk].tolist(),
                                                 b"filenames": [b"x.png"] * len(chunk)}, bytes_keys)
        _pickle(folder / "test_batch", {b"batch_label": b"testing batch", b"data": test,
                                        b"labels": fine["test"].tolist()}, bytes_keys)
        _pickle(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"num_vis": 3072,
                                          b"label_names": [f"class{i}".encode() for i in range(10)]}, bytes_keys)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, data in (("train", train), ("test", test)):
            _pickle(folder / name, {b"filenames": [b"x.png"] * len(data), b"batch_label": name.encode(),
                                    b"fine_labels": fine[name].tolist(), b"coarse_labels": coarse[name].tolist(),
                                    b"data": data}, bytes_keys)
        _pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, bytes_keys)
    shaped = {"train": train.reshape(-1, 3, 32, 32), "test": test.reshape(-1, 3, 32, 32)}
    return {"fine": {key: (shaped[key], fine[key]) for key in shaped},
            "coarse": {key: (shaped[key], coarse[key]) for key in shaped}}


# One case per datamodule and file layout: (class, extra arguments, writer)
CASES = {
    "fashion-flat": (FashionMNISTDataModule, {}, lambda root: make_idx(root, "flat", compress=True)),
    "mnist-flat-raw": (MNISTDataModule, {}, lambda root: make_idx(root, "flat", compress=False)),
    "fashion-torchvision": (FashionMNISTDataModule, {}, lambda root: make_idx(root, "torchvision")),
    "mnist-torchvision": (MNISTDataModule, {}, lambda root: make_idx(root, "torchvision")),
    "cifar10": (CIFAR10DataModule, {}, lambda root: make_cifar(root, 10)["fine"]),
    "cifar10-str-keys": (CIFAR10DataModule, {}, lambda root: make_cifar(root, 10, bytes_keys=False)["fine"]),
    "cifar100-fine": (CIFAR100DataModule, {"label": "fine"}, lambda root: make_cifar(root, 100)["fine"]),
    "cifar100-coarse": (CIFAR100DataModule, {"label": "coarse"}, lambda root: make_cifar(root, 100)["coarse"]),
}


def _files(written):
    """(train images, train labels, test images, test labels) whatever the writer's keys."""
    train = written.get("train")
    test = written.get("t10k", written.get("test"))
    return train[0], np.asarray(train[1], dtype=np.int64), test[0], np.asarray(test[1], dtype=np.int64)


def _reference(images_train, train_indices, images):
    """Independent numpy standardisation: float64, population std floored at one grey level."""
    x = images_train[train_indices].reshape(len(train_indices), -1).astype(np.float64) / 255.0
    mean, std = x.mean(0), np.maximum(x.std(0), DEFAULT_STD_FLOOR)
    return (images.reshape(len(images), -1).astype(np.float64) / 255.0 - mean) / std


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    cls, kwargs, writer = CASES[request.param]
    written = writer(tmp_path)
    return cls, kwargs, tmp_path, _files(written)


# -- shapes, labels, splits, standardisation ----------------------------------------------------------
def test_shapes_dtypes_and_labels(case):
    cls, kwargs, root, (x_train, y_train, x_test, y_test) = case
    dm = cls(root, val_fraction=20, download=False, **kwargs)
    dm.prepare_data()
    dm.setup(None)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (N_TRAIN - 20, 20, N_TEST)
    assert dm.num_features == int(np.prod(dm.image_shape)) == x_train[0].size
    assert dm.image_shape == x_train.shape[1:]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (48, dm.num_features) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Labels: the splits hold the file's labels at their indices, the test set all of them.
    np.testing.assert_array_equal(dm.train_dataset.labels.numpy(), y_train[dm.train_indices.numpy()])
    np.testing.assert_array_equal(dm.val_dataset.labels.numpy(), y_val := y_train[dm.val_indices.numpy()])
    np.testing.assert_array_equal(torch.cat([b[1] for b in dm.val_dataloader()]).numpy(), y_val)
    np.testing.assert_array_equal(torch.cat([b[1] for b in dm.test_dataloader()]).numpy(), y_test)
    assert int(y_test.max()) < dm.num_classes
    if dm.classes is not None:
        assert len(dm.classes) == dm.num_classes


def test_standardisation_uses_training_statistics_only(case):
    cls, kwargs, root, (x_train, _, x_test, _) = case
    dm = cls(root, val_fraction=0.25, download=False, **kwargs)
    dm.setup(None)
    train_idx, val_idx = dm.train_indices.numpy(), dm.val_indices.numpy()
    # Values reach (255 - 7) / (1/255) / 255 = 248 at the floored pixel: float32 keeps 1e-5 relative.
    for dataset, images in ((dm.train_dataset, x_train[train_idx]), (dm.val_dataset, x_train[val_idx]),
                            (dm.test_dataset, x_test)):
        np.testing.assert_allclose(dataset.tensors()[0].numpy(), _reference(x_train, train_idx, images),
                                   rtol=1e-5, atol=1e-5)
    x = dm.train_dataset.tensors()[0].double()
    assert x.mean(0).abs().max() < 1e-5
    std = x.std(0, unbiased=False)
    assert std[0] == 0 and dm.std.flatten()[0] == pytest.approx(DEFAULT_STD_FLOOR)  # the constant pixel
    assert (std[1:] - 1).abs().max() < 1e-5
    # The test set is brighter: with the training statistics its mean is far from 0.
    assert dm.test_dataset.tensors()[0][:, 1:].mean() > 0.5


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    make_idx(tmp_path)
    splits = []
    for seed in (0, 0, 1):
        dm = MNISTDataModule(tmp_path, val_fraction=0.25, seed=seed, download=False)
        dm.setup("fit")
        splits.append((dm.train_indices, dm.val_indices))
    (train, val), (train_again, val_again), (train_other, val_other) = splits
    assert torch.equal(train, train_again) and torch.equal(val, val_again)
    assert not torch.equal(val, val_other)
    assert len(val) == 30 and not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(N_TRAIN))


def test_training_order_is_seeded_per_epoch(tmp_path):
    make_idx(tmp_path)

    def orders(seed, epochs):
        dm = MNISTDataModule(tmp_path, batch_size=1000, val_fraction=0, seed=seed, download=False)
        dm.setup("fit")
        loader = dm.train_dataloader()
        result = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            result.append(next(iter(loader))[0])
        return result

    first, second = orders(0, [0, 1])
    assert not torch.equal(first, second)
    # A resumed run (fresh datamodule, set_epoch(1)) sees the order of epoch 1.
    assert torch.equal(orders(0, [1])[0], second)
    assert not torch.equal(orders(1, [0])[0], first)
    # Every epoch is a permutation of the training split.
    reference = MNISTDataModule(tmp_path, val_fraction=0, download=False)
    reference.setup("fit")
    all_rows = reference.train_dataset.tensors()[0]
    assert sorted(map(tuple, second.tolist())) == sorted(map(tuple, all_rows.tolist()))


def test_flatten_false_gives_images(tmp_path):
    make_cifar(tmp_path, 10)
    flat = CIFAR10DataModule(tmp_path, flatten=True, download=False)
    images = CIFAR10DataModule(tmp_path, flatten=False, download=False)
    for dm in (flat, images):
        dm.setup("test")
    x, _ = next(iter(images.test_dataloader()))
    assert x.shape == (N_TEST, 3, 32, 32)
    torch.testing.assert_close(x.flatten(1), next(iter(flat.test_dataloader()))[0], rtol=0, atol=0)


def test_train_subset_uses_first_samples(tmp_path):
    x_train = make_idx(tmp_path)["train"][0]
    dm = FashionMNISTDataModule(tmp_path, train_subset=40, val_fraction=10, download=False)
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10
    assert max(dm.train_indices.max(), dm.val_indices.max()) < 40
    expected = _reference(x_train, dm.train_indices.numpy(), x_train[dm.train_indices.numpy()])
    np.testing.assert_allclose(dm.train_dataset.tensors()[0].numpy(), expected, rtol=1e-5, atol=1e-5)


# -- checkpoints --------------------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path):
    make_cifar(tmp_path, 100)
    source = CIFAR100DataModule(tmp_path, train_subset=60, download=False)
    assert source.state_dict() == {}  # nothing to save before setup
    source.setup("fit")
    torch.save(source.state_dict(), tmp_path / "dm.pt")
    state = torch.load(tmp_path / "dm.pt", weights_only=True)  # plain tensors and numbers only
    assert set(state) == {"mean", "std", "seed", "val_fraction", "train_subset", "label"}

    # Loaded before setup: setup keeps the loaded statistics instead of computing its own.
    before = CIFAR100DataModule(tmp_path, train_subset=60, download=False)
    before.load_state_dict(state)
    before.setup(None)
    # Loaded after setup (a Trainer's order): the dataloaders use the loaded statistics.
    after = CIFAR100DataModule(tmp_path, train_subset=60, download=False)
    after.setup(None)
    after.mean, after.std = after.mean + 1, after.std * 2
    after.load_state_dict(state)
    for dm in (before, after):
        torch.testing.assert_close(dm.mean, source.mean, rtol=0, atol=0)
        torch.testing.assert_close(dm.std, source.std, rtol=0, atol=0)
        torch.testing.assert_close(next(iter(dm.val_dataloader()))[0], next(iter(source.val_dataloader()))[0],
                                   rtol=0, atol=0)
    # A different split is allowed, with a warning naming what changed; a wrong shape is refused.
    with pytest.warns(UserWarning, match="train_subset: checkpoint 60, now None"):
        CIFAR100DataModule(tmp_path, download=False).load_state_dict(state)
    with pytest.raises(ValueError, match=r"`mean` to be a tensor of shape \(1, 28, 28\)"):
        MNISTDataModule(tmp_path).load_state_dict(state)


class _Linear(L.LightningModule):
    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(num_features, num_classes)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # each run writes to its own directory
def test_trainer_fit_and_resume_use_checkpoint_statistics(tmp_path):
    make_idx(tmp_path / "data")

    def fit(dm, epochs, ckpt_path=None):
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path / f"run{epochs}", limit_train_batches=2, limit_val_batches=1)
        trainer.fit(_Linear(dm.num_features, dm.num_classes), datamodule=dm, ckpt_path=ckpt_path)
        return trainer

    first = MNISTDataModule(tmp_path / "data", download=False)
    trainer = fit(first, 2)
    assert trainer.train_dataloader.sampler.epoch == 2  # Lightning called set_epoch(0), set_epoch(1)
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert "MNISTDataModule" in torch.load(checkpoint, weights_only=True)

    # A resumed run whose own training split differs still standardises with the original statistics.
    resumed = MNISTDataModule(tmp_path / "data", train_subset=50, download=False)
    with pytest.warns(UserWarning, match="split differs"):
        fit(resumed, 3, ckpt_path=checkpoint)
    assert torch.equal(resumed.mean, first.mean) and torch.equal(resumed.std, first.std)


# -- download and missing data ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "remedy"),
    [
        (FashionMNISTDataModule, "apt-get install dataset-fashion-mnist"),
        (MNISTDataModule, "download=True"),
        (CIFAR10DataModule, "download=True"),
        (CIFAR100DataModule, "download=True"),
    ],
)
def test_missing_data_names_directory_and_remedy(tmp_path, cls, remedy):
    dm = cls(tmp_path / "empty", download=False)
    for call in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(FileNotFoundError, match="empty") as info:
            call()
        assert str(tmp_path / "empty") in str(info.value) and remedy in str(info.value)


@pytest.mark.parametrize(("cls", "name"), [(MNISTDataModule, "MNIST"), (CIFAR10DataModule, "CIFAR10")])
def test_prepare_data_downloads_through_torchvision(tmp_path, monkeypatch, cls, name):
    import torchvision

    calls = []

    def fake_download(root, train=True, download=False):  # what torchvision leaves on disk
        calls.append((root, train, download))
        make_idx(Path(root), "torchvision") if name == "MNIST" else make_cifar(Path(root), 10)

    monkeypatch.setattr(torchvision.datasets, name, fake_download)
    dm = cls(tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()  # the files are there now: no second download
    assert calls == [(str(tmp_path), True, True)]
    dm.setup(None)
    assert len(dm.test_dataset) == N_TEST

    def no_network(root, train=True, download=False):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, name, no_network)
    with pytest.raises(RuntimeError, match="Could not download .* network unreachable") as info:
        cls(tmp_path / "other", download=True).prepare_data()
    assert str(tmp_path / "other") in str(info.value)


def test_bad_files_are_refused(tmp_path):
    make_idx(tmp_path / "idx")
    labels = np.full(N_TRAIN, 12, dtype=np.uint8)  # MNIST has 10 classes
    _write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte", labels, compress=True)
    with pytest.raises(ValueError, match=r"labels of MNIST .* to lie in \[0, 10\), but got values from 12"):
        MNISTDataModule(tmp_path / "idx", download=False).setup("fit")
    make_cifar(tmp_path / "cifar", 10)
    _pickle(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3",
            {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0] * 4}, bytes_keys=True)
    with pytest.raises(ValueError, match=r"data_batch_3: expected 'data' to be uint8 of shape \(N, 3072\)"):
        CIFAR10DataModule(tmp_path / "cifar", download=False).setup("fit")


# -- arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"data_dir": 3}, "data_dir"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 4.0}, "batch_size"),
        ({"val_fraction": -1}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": True}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"flatten": 1}, "flatten"),
        ({"train_subset": 0}, "train_subset"),
        ({"train_subset": 10.0}, "train_subset"),
        ({"download": "yes"}, "download"),
        ({"seed": -1}, "seed"),
        ({"seed": None}, "seed"),
        ({"std_floor": 0.0}, "std_floor"),
        ({"std_floor": float("nan")}, "std_floor"),
        ({"label": "medium"}, "label"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    cls = CIFAR100DataModule if name == "label" else MNISTDataModule
    with pytest.raises(ValueError, match=f"Expected argument `{name}` to be .*, but got"):
        cls(**kwargs)


def test_split_and_stage_errors_need_data(tmp_path):
    make_idx(tmp_path)
    with pytest.raises(ValueError, match="`val_fraction` to leave training samples, but got 120"):
        MNISTDataModule(tmp_path, val_fraction=N_TRAIN, download=False).setup("fit")
    with pytest.raises(ValueError, match="`stage`"):
        MNISTDataModule(tmp_path, download=False).setup("train")
    with pytest.raises(RuntimeError, match="call `setup\\(\\)` first"):
        MNISTDataModule(tmp_path, download=False).train_dataloader()


def test_constants_and_registry():
    assert set(DATAMODULES) == {"fashion-mnist", "mnist", "cifar10", "cifar100"}
    expected = {"fashion-mnist": (784, 10, (1, 28, 28)), "mnist": (784, 10, (1, 28, 28)),
                "cifar10": (3072, 10, (3, 32, 32)), "cifar100": (3072, 100, (3, 32, 32))}
    for name, cls in DATAMODULES.items():
        assert issubclass(cls, ImageDataModule)
        dm = cls(data_dir="unused")
        assert (dm.num_features, dm.num_classes, dm.image_shape) == expected[name]
    assert CIFAR100DataModule(label="coarse").num_classes == 20
    default = FashionMNISTDataModule().data_dir
    assert default == (DEFAULT_FASHION_MNIST if DEFAULT_FASHION_MNIST.is_dir() else Path("./data"))
    assert MNISTDataModule().data_dir == Path("./data")


# -- the real data ------------------------------------------------------------------------------------
@pytest.mark.skipif(not (DEFAULT_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEFAULT_FASHION_MNIST} "
                           "(`apt-get install dataset-fashion-mnist`)")
def test_real_fashion_mnist():
    dm = FashionMNISTDataModule(val_fraction=5000, download=False)
    dm.prepare_data()
    dm.setup(None)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (55000, 5000, 10000)
    labels = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels])
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))  # balanced: 6,000 per class
    assert torch.equal(dm.test_dataset.labels.bincount(), torch.full((10,), 1000))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (48, 784) and dm.num_classes == 10 and int(y.max()) < 10
    assert dm.train_dataset.tensors()[0].mean(0).abs().max() < 1e-4
