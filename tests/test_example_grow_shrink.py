"""The grow/shrink grid (examples/grow_shrink_grid.py) end to end on generated IDX data."""

import argparse
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("grow_shrink_grid_example", ROOT / "examples" / "grow_shrink_grid.py")
make_dataset = _load("grow_shrink_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_every_pair_reaches_its_target_and_the_diagonal_is_static(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=96, n_test=40)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--widths", "3", "5", "--seeds", "2", "--pretrain-epochs", "1", "--epochs", "3",
            "--train-subset", "80", "--batch-size", "16", "--workers", "1", "--out", str(out)]
    result = example.main(argv)
    saved = json.loads((out / "grow_shrink.json").read_text())
    assert saved["meta"]["train_size"] == 80 and saved["meta"]["pretrain_epochs"] == 1
    keys = {(r["model"], r["start"], r["target"], r["seed"]) for r in saved["runs"]}
    expected = {("isotropic", s, t, seed) for s in (3, 5) for t in (3, 5) for seed in (0, 1)}
    expected |= {("tanh", s, s, seed) for s in (3, 5) for seed in (0, 1)}
    assert keys == expected and len(saved["runs"]) == len(expected) == len(result["runs"])
    for run in saved["runs"]:
        assert run["widths"] == [run["target"]] * 2
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["train_accuracy"] <= 1.0
        assert len(run["history"]) == 4 and all(0.0 <= h["test_accuracy"] <= 1.0 for h in run["history"])
        if run["model"] == "isotropic":
            # One neuron per epoch and layer: the width moves by at most 1 per epoch.
            ws = [run["start"]] + [h["widths"][0] for h in run["history"]]
            assert all(abs(a - b) <= 1 for a, b in zip(ws, ws[1:]))
            assert len(run["changes"]) == 2 * abs(run["target"] - run["start"])
    # The pair start == target is the static run: same numbers as one uninterrupted training.
    args = example.parse_args(argv)
    prepared, classes = example.prepare(args.dataset, args.data, args.train_subset)
    for width in (3, 5):
        static = example.train_static(width, 1, prepared, classes, args)
        pair = next(r for r in saved["runs"] if r["model"] == "isotropic" and r["start"] == r["target"] == width
                    and r["seed"] == 1)
        assert [h["test_accuracy"] for h in static["history"]] == [h["test_accuracy"] for h in pair["history"]]
        assert static["test_accuracy"] == pair["test_accuracy"] and static["train_loss"] == pair["train_loss"]
    table = (out / "grow_shrink.md").read_text()
    assert "| 3 → 5 |" in table and "tanh (start width)" in table
    assert (out / "grow_shrink.png").stat().st_size > 10_000


def test_parse_args_rejects_unreachable_targets():
    try:
        example.parse_args(["--widths", "8", "32", "--epochs", "5"])
    except SystemExit:
        pass
    else:  # pragma: no cover
        raise AssertionError("expected an error")
    assert isinstance(example.parse_args(["--full"]), argparse.Namespace)
