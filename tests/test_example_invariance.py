"""examples/invariance_table.py end to end on generated Fashion-MNIST-format data."""

import importlib.util
import math
from pathlib import Path

from test_data import make_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "invariance_table.py"


def load():
    import sys

    sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location("invariance_table", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_invariance_table_runs_and_exact_rows_are_exact(tmp_path):
    make_dataset(tmp_path, n_train=300, n_test=80)
    module = load()
    result = module.main(["--data", str(tmp_path), "--width", "80", "--epochs", "1", "--seeds", "2",
                          "--train-subset", "300", "--fold-batch", "100", "--out", str(tmp_path / "out")])
    rows = result["rows"]
    # Every setting x (diagonalisation + 5 grow + 5 shrink) x seed.
    assert len(rows) == len(module.SETTINGS) * (1 + 2 * len(module.KS)) * 2
    for row in rows:
        assert math.isfinite(row["kl"]) and math.isfinite(row["rel_logits"])
        if row["op"] in ("grow", "full diagonalisation"):
            # Function-preserving operations: float64 round-off only.
            assert row["rel_logits"] <= 1e-10 and abs(row["kl"]) <= 1e-12 and row["delta_acc"] == 0.0
        else:
            assert row["rel_logits"] > 0  # trained layers have no exactly removable neurons
    # Removing more neurons never changes the outputs less, on average (same setting and seed).
    for setting, *_ in module.SETTINGS:
        for seed in range(2):
            kl = [r["kl"] for r in rows if r["setting"] == setting and r["seed"] == seed and r["op"] == "shrink"]
            assert kl[-1] >= kl[0]
    for name in ("invariance.json", "invariance.md", "invariance.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
