"""IDX reading on generated files in the MNIST format, and the example script run on them."""

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from iso_lightning.data import load_idx_dataset, read_idx

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def make_dataset(root: Path, n_train: int = 240, n_test: int = 60, compress: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # Class-dependent blobs so that a classifier can learn something.
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 6, 4:24] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dataset_round_trip(tmp_path, compress):
    written = make_dataset(tmp_path, compress=compress)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_idx_dataset(tmp_path, train=train)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), written[prefix][0])
        np.testing.assert_array_equal(labels.numpy(), written[prefix][1])


def test_read_idx_big_endian_types(tmp_path):
    values = (np.arange(12).reshape(3, 4) - 5).astype(">i4")
    write_idx(tmp_path / "ints", values, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints").numpy(), values.astype(np.int32))
    floats = (np.arange(6) / 3).astype(">f4").reshape(2, 3)
    write_idx(tmp_path / "floats", floats, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "floats.gz").numpy(), floats.astype(np.float32))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    good = np.zeros((4, 5), dtype=np.uint8)
    write_idx(tmp_path / "cut", good, compress=False)
    (tmp_path / "cut").write_bytes((tmp_path / "cut").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path)


def test_example_script_runs_on_generated_data(tmp_path, capsys):
    make_dataset(tmp_path)
    spec = importlib.util.spec_from_file_location("fashion_mnist_core", ROOT / "examples" / "fashion_mnist_core.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--data", str(tmp_path), "--epochs", "3", "--widths", "8", "8", "--batch-size", "16"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    accuracy = float(out.split("final test accuracy")[1].split(",")[0])
    assert accuracy > 0.5  # ten separable classes; chance is 0.1
