"""The scheduled-tasks experiment (examples/scheduled_tasks.py) end to end on generated IDX data."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = _load("scheduled_tasks_example", ROOT / "examples" / "scheduled_tasks.py")
make_dataset = _load("scheduled_tasks_test_data", ROOT / "tests" / "test_data.py").make_dataset


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    make_dataset(root, n_train=160, n_test=40)
    return root


def test_main_follows_the_schedule(idx, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    # Three tasks of two sources (the same IDX directory registered twice), an explicit schedule.
    result = example.main(["--tasks", "A=fashion-mnist:0-3", "B=other:4-6", "C=other:7,8,9", "--source",
                           f"other={idx}", "--data", str(idx), "--schedule", "A:0-3", "B:1-", "C:3-5",
                           "--epochs", "5", "--seeds", "2", "--width", "4", "--batch-size", "16",
                           "--workers", "1", "--out", str(out)])
    assert time.perf_counter() - started < 15
    saved = json.loads((out / "scheduled_tasks.json").read_text())
    assert saved["meta"]["schedule"] == {"A": [0, 3], "B": [1, 5], "C": [3, 5]}
    assert saved["meta"]["classes"] == {"A": 4, "B": 3, "C": 3}
    assert {(r["arm"], r["seed"]) for r in saved["runs"]} == {(a, s) for a in ("dynamic", "static") for s in (0, 1)}
    assert len(result["runs"]) == 4
    expected_active = [["A"], ["A", "B"], ["A", "B"], ["B", "C"], ["B", "C"]]
    classes = {"A": 4, "B": 3, "C": 3}
    for run in saved["runs"]:
        assert len(run["history"]) == 5
        for epoch, h in enumerate(run["history"]):
            assert h["active"] == expected_active[epoch]
            # One indicator input per active task after the 784 pixels; each task's own outputs.
            assert h["in_features"] == 784 + len(expected_active[epoch])
            assert h["out_features"] == sum(classes[t] for t in expected_active[epoch])
            assert set(h["test_accuracy"]) == set(expected_active[epoch])
            assert all(0.0 <= a <= 1.0 for a in h["test_accuracy"].values())
        assert set(run["final_accuracy"]) == {"A", "B", "C"}
        assert all(0.0 <= a <= 1.0 for a in run["final_accuracy"].values())
        assert run["history"][3]["boundary"] == ["A off: -1 input, -4 outputs", "C on: +1 input, +3 outputs"]
        widths = [h["widths"] for h in run["history"]]
        if run["arm"] == "static":
            assert all(w == [4, 4] for w in widths)
        else:  # orthogonal init puts every singular value near 1: the scaffold rule grows
            assert any(w != [4, 4] for w in widths)
    # Same seed: identical initial weights and data order, and the policy first acts after epoch 0,
    # so both arms' epoch-0 training loss is identical.
    by = {(r["arm"], r["seed"]): r for r in saved["runs"]}
    for s in (0, 1):
        assert by[("dynamic", s)]["history"][0]["running_loss"] == by[("static", s)]["history"][0]["running_loss"]
    table = (out / "scheduled_tasks.md").read_text()
    assert "Δ dynamic − static" in table and "| 3 | B, C | 786 / 6 |" in table
    assert (out / "scheduled_tasks.png").stat().st_size > 10_000
    again = example.main(["--from-json", str(out / "scheduled_tasks.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "scheduled_tasks.md").read_text() == table
    assert again["summary"]["tasks"].keys() == {"A", "B", "C"}


def test_default_schedule_and_parsing():
    assert example.parse_schedule(None, ["A", "B", "C"], 12) == {"A": (0, 6), "B": (3, 9), "C": (6, 12)}
    assert example.parse_schedule(None, ["A", "B"], 9) == {"A": (0, 6), "B": (3, 9)}
    assert example.parse_schedule(None, ["A"], 4) == {"A": (0, 4)}
    task = example.parse_task("L=/data/emnist:1-10")
    assert (task.name, task.source, task.classes) == ("L", "/data/emnist", list(range(1, 11)))
    assert example.parse_task("M=mnist").classes is None
    with pytest.raises(ValueError, match="No task is on"):
        example.parse_schedule(["A:0-2", "B:3-"], ["A", "B"], 5)
    with pytest.raises(ValueError):
        example.parse_schedule(["A:0-9"], ["A"], 5)
