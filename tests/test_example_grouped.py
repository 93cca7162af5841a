"""The grouped-isotropy experiment (examples/grouped_isotropy.py) end to end on generated IDX data."""

import importlib.util
import json
import math
from pathlib import Path

import torch
from torch import nn

from iso_lightning import IsotropicMLP

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load("grouped_isotropy_example", ROOT / "examples" / "grouped_isotropy.py")
make_dataset = _load("grouped_isotropy_test_data", ROOT / "tests" / "test_data.py").make_dataset


def test_main_writes_every_run_table_and_figures(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_dataset(data, n_train=120, n_test=40)
    out = tmp_path / "out"
    result = example.main(["--data", str(data), "--widths", "8", "16", "--group-sizes", "1", "2", "8",
                           "--seeds", "2", "--epochs", "1", "--train-subset", "96", "--batch-size", "16",
                           "--dynamic-group-size", "2", "--workers", "1", "--out", str(out)])
    saved = json.loads((out / "grouped_isotropy.json").read_text())
    assert saved["meta"]["epochs"] == 1 and saved["meta"]["train_size"] == 96
    keys = {(r["width"], r["model"], r["seed"]) for r in saved["runs"]}
    expected = set()
    for seed in (0, 1):
        expected.add((None, "linear", seed))
        for width in (8, 16):
            expected |= {(width, "tanh", seed), (width, "iso-g1", seed), (width, "iso-g2", seed),
                         (width, "iso-full", seed)}
        expected.add((16, "iso-g8", seed))  # k = 8 is the fully isotropic net at width 8: not re-run
        expected.add((8, "dynamic", seed))
    assert keys == expected and len(saved["runs"]) == len(expected) == len(result["runs"])
    assert saved["meta"]["duplicates"] == {"8/iso-g8": "iso-full"}
    for run in saved["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["train_accuracy"] <= 1.0
        assert math.isfinite(run["train_loss"]) and run["train_loss"] > 0
        if run["model"].startswith("iso-"):
            assert run["length_mode"] == "trainable" and run["psi_mode"] == "decay"
            k = run["group_size"] or run["width"]
            assert run["groups"] == [math.ceil(run["width"] / k)] * 2
    dynamic = [r for r in saved["runs"] if r["model"] == "dynamic"]
    assert all(len(r["widths"]) == 2 and len(r["history"]) == 1 for r in dynamic)
    # The scaffold rule acted: orthogonal init puts every singular value near 1, so it grows.
    assert all(r["widths"] != [8, 8] for r in dynamic)
    table = (out / "grouped_isotropy.md").read_text()
    assert "= fully isotropic" in table and "Dynamic topology" in table and "linear classifier" in table
    for png in ("grouped_isotropy.png", "grouped_dynamic.png"):
        assert (out / png).stat().st_size > 10_000


def test_identical_initial_weights_and_group_size_one_is_tanh():
    sizes, seed = [20, 8, 8, 5], 3
    tanh = example.build_model({"model": "tanh", "group_size": None}, sizes, seed)
    nets = {k: example.build_model({"model": f"iso-g{k}", "group_size": k}, sizes, seed) for k in (1, 2, 8)}
    full = example.build_model({"model": "iso-full", "group_size": None}, sizes, seed)
    tanh_linears = [m for m in tanh.modules() if isinstance(m, nn.Linear)]
    for net in [*nets.values(), full]:
        for a, b in zip(net.layers, tanh_linears):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # Another seed gives other weights; the same seed the same weights.
    other = example.build_model({"model": "tanh", "group_size": None}, sizes, seed + 1)
    assert not torch.equal(other[0].weight, tanh[0].weight)
    assert torch.equal(example.build_model({"model": "tanh", "group_size": None}, sizes, seed)[0].weight,
                       tanh[0].weight)
    assert all(torch.equal(a, b) for a, b in zip(example.data_order(seed, 50, 3), example.data_order(seed, 50, 3)))

    # By construction, group size 1 with o and psi off is the elementwise tanh network: identical
    # outputs at the shared initialisation and after the same AdamW steps on the same batches.
    plain = example.copy_init(example.reference_init(sizes, seed), IsotropicMLP(sizes, group_size=1))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    torch.testing.assert_close(plain(x), tanh(x), rtol=1e-5, atol=1e-6)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-3) for m in (plain, tanh)]
    for order in example.data_order(seed, 64, 3):
        for model, opt in zip((plain, tanh), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[order[:16]]), y[order[:16]]).backward()
            opt.step()
    torch.testing.assert_close(plain(x), tanh(x), rtol=1e-4, atol=1e-5)
    # With the experiment's trainable o (1e-6) and psi (zero), the first outputs differ only slightly.
    torch.testing.assert_close(nets[1](x), example.build_model({"model": "tanh", "group_size": None}, sizes, seed)(x),
                               rtol=1e-3, atol=1e-3)


def test_specs_mark_duplicates_and_add_the_static_twin():
    specs = example.model_specs([4, 8], [1, 4, 16], dynamic_group_size=2)
    names = [(s["width"], s["model"]) for s in specs]
    assert (4, "iso-g4") not in names and (8, "iso-g4") in names and (8, "iso-g16") not in names
    assert names.count((4, "iso-full")) == 1 and names.count((8, "iso-full")) == 1
    assert (4, "iso-g2") in names and names[-1] == (4, "dynamic")  # static twin of the dynamic run
    assert len(names) == len(set(names))
