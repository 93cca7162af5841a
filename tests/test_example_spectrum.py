"""The spectrum-evolution experiment (examples/spectrum_evolution.py) end to end on generated IDX data."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("spectrum_evolution_example", ROOT / "examples" / "spectrum_evolution.py")
make_dataset = _load("spectrum_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_records_spectra_every_epoch(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=120, n_test=40)
    out = tmp_path / "out"
    result = example.main(["--data", str(data), "--width", "8", "--depth", "2", "--seeds", "2", "--epochs", "2",
                           "--train-subset", "96", "--batch-size", "16", "--workers", "1", "--out", str(out)])
    saved = json.loads((out / "spectrum.json").read_text())
    assert saved["meta"]["train_size"] == 96 and saved["meta"]["test_size"] == 40
    assert saved["meta"]["sizes"] == [784, 8, 8, 10]
    assert {(r["model"], r["seed"]) for r in saved["runs"]} == {(m, s) for m in ("isotropic", "tanh") for s in (0, 1)}
    assert len(result["runs"]) == 4
    for run in saved["runs"]:
        assert [h["epoch"] for h in run["history"]] == [0, 1, 2]
        for h in run["history"]:
            assert [len(s) for s in h["sigma"]] == [8, 8, 8] and len(h["bias_norm"]) == 3
            assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in run["history"])
        first = run["history"][0]
        # Orthogonal init: every singular value is 1 (the square layer and the rectangular ones), biases 0.
        for sigma in first["sigma"]:
            assert max(abs(s - 1.0) for s in sigma) < 1e-5
        assert first["bias_norm"] == [0.0, 0.0, 0.0]
        # Training moved them.
        assert any(abs(s - 1.0) > 1e-4 for s in run["history"][-1]["sigma"][1])
        assert 0.0 <= run["test_accuracy"] <= 1.0 and math.isfinite(run["train_loss"])
    # Same seed: identical epoch-0 spectra across the two models.
    by = {(r["model"], r["seed"]): r for r in saved["runs"]}
    for seed in (0, 1):
        assert by[("isotropic", seed)]["history"][0]["sigma"] == by[("tanh", seed)]["history"][0]["sigma"]
    layer1 = saved["summary"]["isotropic"]["layers"][1]
    assert len(layer1) == 3 and layer1[0]["eff_rank"][0] == pytest.approx(8.0)
    table = (out / "spectrum.md").read_text()
    assert table.count("| isotropic | layer") == 3 and table.count("| tanh | layer") == 3
    for png in ("spectrum_ridgeline.png", "spectrum_stats.png"):
        assert (out / png).stat().st_size > 10_000


def test_identical_initial_weights_and_data_order():
    sizes, seed = [20, 8, 8, 5], 3
    iso = example.build_model("isotropic", sizes, seed)
    tanh = example.build_model("tanh", sizes, seed)
    pairs = list(zip(example.linear_layers(iso), example.linear_layers(tanh)))
    assert len(pairs) == 3
    for a, b in pairs:
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert iso.psi_mode == "decay" and iso.activation(0).length_mode == "trainable"
    other = example.build_model("tanh", sizes, seed + 1)
    assert not torch.equal(example.linear_layers(other)[0].weight, pairs[0][1].weight)
    assert all(torch.equal(a, b) for a, b in zip(example.data_order(seed, 50, 3), example.data_order(seed, 50, 3)))
    snap = example.snapshot(iso)
    assert all(abs(s - 1.0) < 1e-5 for sigma in snap["sigma"] for s in sigma)
    assert example.effective_rank([1.0] * 4) == pytest.approx(4.0)
