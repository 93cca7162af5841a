"""The isotropic-vs-tanh experiment (examples/isotropic_vs_tanh.py) end to end on generated IDX data."""

import importlib.util
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("isotropic_vs_tanh_example", ROOT / "examples" / "isotropic_vs_tanh.py")
make_dataset = _load("iso_vs_tanh_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_runs_every_depth_width_seed(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=120, n_test=40)
    out = tmp_path / "out"
    result = example.main(["--data", str(data), "--depths", "1", "3", "--widths", "4", "8", "--seeds", "2",
                           "--epochs", "1", "--train-subset", "96", "--batch-size", "16", "--workers", "1",
                           "--out", str(out)])
    saved = json.loads((out / "iso_vs_tanh.json").read_text())
    assert saved["meta"]["train_size"] == 96 and saved["meta"]["epochs"] == 1
    keys = {(r["model"], r["depth"], r["width"], r["seed"]) for r in saved["runs"]}
    expected = {(m, d, w, s) for m in ("isotropic", "tanh") for d in (1, 3) for w in (4, 8) for s in (0, 1)}
    assert keys == expected and len(saved["runs"]) == len(expected) == len(result["runs"])
    for run in saved["runs"]:
        assert run["sizes"] == [784, *[run["width"]] * run["depth"], 10]
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["train_accuracy"] <= 1.0
        assert math.isfinite(run["train_loss"]) and run["train_loss"] > 0
        assert len(run["running_loss"]) == 1
    assert [(e["depth"], e["width"]) for e in saved["summary"]] == [(1, 4), (1, 8), (3, 4), (3, 8)]
    by = {(r["model"], r["depth"], r["width"], r["seed"]): r for r in saved["runs"]}
    for e in saved["summary"]:
        assert e["seeds"] == 2
        deltas = [by[("isotropic", e["depth"], e["width"], s)]["test_accuracy"]
                  - by[("tanh", e["depth"], e["width"], s)]["test_accuracy"] for s in (0, 1)]
        assert abs(e["delta_test_accuracy"][0] - sum(deltas) / 2) < 1e-12
    table = (out / "iso_vs_tanh.md").read_text()
    assert table.count("\n| 1 |") + table.count("\n| 3 |") == 4
    assert (out / "iso_vs_tanh.png").stat().st_size > 10_000


def test_identical_initial_weights_across_models():
    for depth in (1, 4):
        sizes = [20, *[8] * depth, 5]
        iso = example.build_model("isotropic", sizes, 0)
        tanh = example.build_model("tanh", sizes, 0)
        iso_layers = list(iso.layers)
        tanh_layers = [m for m in tanh.modules() if isinstance(m, torch.nn.Linear)]
        assert len(iso_layers) == len(tanh_layers) == depth + 1
        for a, b in zip(iso_layers, tanh_layers):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
