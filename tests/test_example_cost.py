"""The cost experiment (examples/cost.py) end to end on generated IDX data."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("cost_example", ROOT / "examples" / "cost.py")
make_dataset = _load("cost_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_times_interleaved_rounds(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=96, n_test=20)
    out = tmp_path / "out"
    example.main(["--data", str(data), "--widths", "6", "10", "--epochs", "3", "--warmup", "1",
                  "--op-repeats", "2", "--batch-size", "16", "--out", str(out)])
    saved = json.loads((out / "cost.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    assert saved["summary"]["rounds_used"] == [1, 2] and saved["meta"]["steps_per_epoch"] == 6
    for w in ("6", "10"):
        s = saved["summary"][w]
        for key in ("growing_over_static", "shrinking_over_static", "static_epoch_seconds", "grow_over_epoch",
                    "shrink_over_epoch", "diagonalise-left_seconds", "diagonalise-full_seconds", "sparsify_seconds"):
            assert s[key]["n"] == 2 and math.isfinite(s[key]["mean"]) and s[key]["min"] > 0, key
        width = int(w)
        assert s["final_hidden_widths"] == {"static": [width] * 2, "growing": [width + 3] * 2,
                                            "shrinking": [width - 3] * 2}
    table = (out / "cost.md").read_text()
    assert "growing / static" in table and "| 10 | sparsify |" in table
    assert (out / "cost.png").stat().st_size > 10_000
