"""The sparsification experiment (examples/sparsification.py) end to end on generated IDX data."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("sparsification_example", ROOT / "examples" / "sparsification.py")
make_dataset = _load("sparsification_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_sparsifies_every_depth(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=120, n_test=40)
    out = tmp_path / "out"
    example.main(["--data", str(data), "--depths", "2", "3", "4", "5", "6", "--width", "8", "--seeds", "2",
                  "--epochs", "1", "--batch-size", "16", "--workers", "1", "--out", str(out)])
    saved = json.loads((out / "sparsification.json").read_text())
    assert {(r["depth"], r["seed"]) for r in saved["runs"]} == {(d, s) for d in range(2, 7) for s in (0, 1)}
    for r in saved["runs"]:
        assert r["dtype"] == "torch.float32"
        assert 0.0 < r["zero_fraction"] < 1.0 and 0.0 < r["hidden_zero_fraction"] < 1.0
        assert r["max_rel_error"] <= 1e-4 and r["max_abs_error"] >= 0.0
        assert r["diagonalised_layers"] == list(range(1, r["depth"], 2))
        # Exactly the zeros of the diagonalised square blocks (a trained net has no other exact zeros).
        assert r["zero_weights"] == r["predicted_zero_weights"] == r["all_exact_zeros"]
        assert abs(r["accuracy_after"] - r["accuracy_before"]) <= 1.0 / 40
    summary = {s["depth"]: s for s in saved["summary"]}
    for d in (2, 3, 4):  # monotone non-decreasing in steps of two
        assert summary[d + 2]["zero_fraction"][0] >= summary[d]["zero_fraction"][0]
    # Odd depths: exactly (W - 1) / (2W) of the hidden-to-hidden weights.
    for d in (3, 5):
        assert abs(summary[d]["hidden_zero_fraction"][0] - 7 / 16) < 1e-12
    table = (out / "sparsification.md").read_text()
    assert table.count("\n| ") >= 1 + 5 and "Worst relative error" in table
    assert (out / "sparsification.png").stat().st_size > 10_000
