"""The `iso-lightning` command (LightningCLI) end to end on generated Fashion-MNIST-format files."""

import csv
import glob
import os
from pathlib import Path

import pytest
from test_data import make_dataset

from iso_lightning.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "fashion_mnist_scaffold.yaml")


def args(tmp_path, data_dir, *extra):
    return [
        "--config", CONFIG,
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.val_fraction", "0.2",
        "--trainer.max_epochs", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "root"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        *extra,
    ]


@pytest.mark.slow
def test_fit_then_test_then_resume_from_the_resized_checkpoint(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    make_dataset(data, n_train=600, n_test=100)
    caplog.set_level("INFO")
    main(["fit", *args(tmp_path, data), "--model.init_args.lr", "0.01"])
    out = capsys.readouterr().out
    assert "[iso_lightning] epoch 1 step" in caplog.text  # topology changes reported as they happen
    assert "test of the checkpoint" in out  # the best (here: newest) checkpoint is tested after fit
    accuracy = float(out.split("test_acc ")[1].split()[0])
    assert 0.3 < accuracy <= 1.0  # ten separable blobs; chance is 0.1
    version = sorted(glob.glob(str(tmp_path / "logs" / "fashion_mnist_scaffold" / "version_*")))[-1]
    rows = list(csv.DictReader(open(os.path.join(version, "topology_events.csv"))))
    assert rows and {r["space"] for r in rows} <= {"net.hidden.0", "net.hidden.1"}
    assert open(os.path.join(version, "topology.png"), "rb").read(4) == b"\x89PNG"
    assert os.path.exists(os.path.join(version, "config.yaml"))

    # The checkpoint holds changed widths; `test` rebuilds the model at the starting widths and
    # the checkpoint resizes it before the weights are loaded.
    last = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    assert last
    main(["test", *args(tmp_path, data), "--ckpt_path", last[0]])
    # Resume fit for one more epoch from the same checkpoint.
    main(["fit", *args(tmp_path, data, "--trainer.max_epochs", "4"), "--ckpt_path", last[0]])
    out = capsys.readouterr().out
    assert "test_acc" in out
    # Predictions of the resized checkpoint.
    main(["predict", *args(tmp_path, data), "--ckpt_path", last[0]])


@pytest.mark.slow
def test_topology_flags_own_module_and_test_choice(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    make_dataset(data, n_train=300, n_test=60)
    caplog.set_level("INFO")
    # A flag of the callback's policy reaches it (it used to go to the last callback of the list).
    main(["fit", *args(tmp_path, data, "--trainer.max_epochs", "2"), "--topology.policy.threshold", "0.5",
          "--test_after_fit", "last"])
    out = capsys.readouterr().out
    assert "test of the final weights" in out
    config = open(glob.glob(str(tmp_path / "logs" / "**" / "config.yaml"), recursive=True)[-1]).read()
    assert "threshold: 0.5" in config
    # A user's own LightningModule with the mixin; its `in_features` and `num_classes` come from the data.
    main(["fit", *args(tmp_path, data, "--trainer.max_epochs", "2"), "--model", "_helpers.FlatClassifier",
          "--model.init_args.width", "5", "--test_after_fit", "none"])
    out = capsys.readouterr().out
    assert "test of the" not in out
    assert "net.hidden.0" in caplog.text
    with pytest.raises(ValueError, match="`test_after_fit`.*'best', 'last', 'none'"):
        main(["fit", *args(tmp_path, data), "--test_after_fit", "always"])


def test_threads_option_is_checked_and_applied(tmp_path):
    import torch

    data = tmp_path / "data"
    data.mkdir()
    make_dataset(data, n_train=60, n_test=20)
    with pytest.raises(ValueError, match="`threads`"):
        main(["fit", *args(tmp_path, data), "--threads", "0"])
    previous = torch.get_num_threads()
    try:
        main(["validate", *args(tmp_path, data), "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
