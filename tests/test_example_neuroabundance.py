"""The neuroabundance experiment (examples/neuroabundance.py) end to end on generated IDX data."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("neuroabundance_example", ROOT / "examples" / "neuroabundance.py")
make_dataset = _load("neuroabundance_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_every_schedule_reaches_its_end_width(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=96, n_test=40)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--widths", "2", "4", "6", "--seeds", "2", "--warmup", "1", "--schedule", "2",
            "--settle", "1", "--train-subset", "64", "--batch-size", "16", "--workers", "1", "--out", str(out)]
    result = example.main(argv)
    saved = json.loads((out / "neuroabundance.json").read_text())
    assert saved["meta"]["train_size"] == 64
    keys = {(r["start"], r["end"], r["seed"]) for r in saved["runs"]}
    expected = {(s, e, seed) for s in (2, 4, 6) for e in (2, 4, 6) for seed in (0, 1)}
    assert keys == expected and len(saved["runs"]) == len(expected) == len(result["runs"])
    for run in saved["runs"]:
        assert run["widths"] == [run["end"]] * 2
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["train_accuracy"] <= 1.0
        widths = [h["widths"][0] for h in run["history"]]
        assert len(widths) == 4 and widths[0] == run["start"]  # warm-up: held
        assert widths[2] == widths[3] == run["end"]  # linear schedule reaches the end, then settles
        if run["start"] != run["end"]:
            assert widths[1] == (run["start"] + run["end"]) // 2  # halfway after one of two schedule epochs
    # start == end is the static net: same numbers as a run of the same net with no policy at all.
    args = example.parse_args(argv)
    prepared, classes = example.prepare(args.dataset, args.data, args.train_subset)
    import torch
    from torch import nn

    model = example.build_model([prepared[0].shape[1], 4, 4, classes], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    for order in example.data_order(1, prepared[0].shape[0], 4):
        for i in range(0, order.numel(), 16):
            idx = order[i : i + 16]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(prepared[0][idx]), prepared[1][idx]) + model.regularisation()
            loss.backward()
            opt.step()
    static = next(r for r in saved["runs"] if r["start"] == r["end"] == 4 and r["seed"] == 1)
    assert example.evaluate(model, prepared[2], prepared[3])[1] == static["test_accuracy"]
    assert example.evaluate(model, prepared[0], prepared[1])[0] == static["train_loss"]
    assert len(saved["prune_vs_grow"]) == 1 and saved["prune_vs_grow"][0]["end"] == 4
    table = (out / "neuroabundance.md").read_text()
    assert "Pruned minus grown" in table and "| 4 | 6 | prune |" in table
    assert (out / "neuroabundance.png").stat().st_size > 10_000
