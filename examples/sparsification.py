"""Sparsification: how many weights does alternating full diagonalisation make structurally zero?

``net.sparsify(probe=...)`` makes every other hidden-to-hidden weight matrix ``W_1, W_3, ...``
diagonal by rotating the neuron spaces on both sides (isotropic activations commute with
rotations, so the function is unchanged up to round-off). The paper claims that in a deep dense
network about half of the hidden-to-hidden weights become structurally zero at no cost in
function. This script trains isotropic MLPs ``[in, W, ..., W, classes]`` with 2 .. 6 hidden layers,
then sparsifies them, and reports per depth (mean ± standard error over seeds):

* the fraction of structurally zero weights (exact zeros), of all weight matrices and of the
  hidden-to-hidden ones, against the count predicted for square diagonal blocks
  (``floor(L / 2) * (W^2 - W)`` zeros for ``L`` hidden layers);
* test accuracy before and after; the maximum absolute and relative output change on the test
  inputs (from the :class:`~iso_lightning.surgery.SparsifyReport`); the time of the operation.

Setting (the paper's): AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal initialisation, zero
biases, ``psi="decay"``, ``length="trainable"``, float32; per-pixel standardisation from the
training set (the library's datamodules, no validation split). Writes ``sparsification.json``,
``sparsification.md`` and ``sparsification.png`` to ``--out``.

    python examples/sparsification.py              # 3 epochs, 3 seeds, full training set: minutes on 2 cores
    python examples/sparsification.py --full       # 30 epochs, 5 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from iso_lightning import IsotropicMLP
from iso_lightning.datamodules import DATAMODULES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import data_order, mean_se  # noqa: E402

Data = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------- data
def prepare(args: argparse.Namespace) -> Tuple[Data, int]:
    """Standardised float32 ``(x_train, y_train, x_test, y_test)`` (flattened) and the number of classes."""
    dm = DATAMODULES[args.dataset](data_dir=args.data, val_fraction=0, train_subset=args.train_subset,
                                   flatten=True, download=args.data is None and args.dataset != "fashion-mnist")
    dm.prepare_data()
    dm.setup()
    x_train, y_train = dm.train_dataset.tensors()
    x_test, y_test = dm.test_dataset.tensors()
    return (x_train.contiguous(), y_train, x_test.contiguous(), y_test), dm.num_classes


def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 10_000) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    return correct / x.shape[0]


def predicted_zeros(depth: int, width: int) -> int:
    """Zeros of ``floor(depth / 2)`` diagonal ``width x width`` matrices."""
    return (depth // 2) * (width * width - width)


# ---------------------------------------------------------------------------- one run
def run(depth: int, seed: int, data: Data, classes: int, args: argparse.Namespace) -> Dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    sizes = [x_train.shape[1], *([args.width] * depth), classes]
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + depth)
    net = IsotropicMLP(sizes, psi="decay", length="trainable", init="orthogonal", generator=g)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = time.perf_counter()
    for order in data_order(seed, x_train.shape[0], args.epochs):
        for i in range(0, order.numel(), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]) + net.regularisation()
            loss.backward()
            opt.step()
    train_seconds = time.perf_counter() - start
    before = accuracy(net, x_test, y_test)
    with torch.no_grad():
        report = net.sparsify(optimizer=opt, probe=x_test)
    after = accuracy(net, x_test, y_test)
    hh_total = sum(net.layers[i].weight.numel() for i in range(1, depth))
    # Every exact zero of every weight matrix (not only those sparsify reports on), as a cross-check.
    all_zero = sum(int((layer.weight == 0).sum()) for layer in net.layers)
    return {"depth": depth, "seed": seed, "width": args.width, "sizes": sizes,
            "diagonalised_layers": report.layers, "zero_weights": report.zero_weights,
            "all_exact_zeros": all_zero, "total_weights": report.total_weights, "hidden_weights": hh_total,
            "zero_fraction": report.zero_fraction, "hidden_zero_fraction": report.zero_weights / max(1, hh_total),
            "predicted_zero_weights": predicted_zeros(depth, args.width),
            "accuracy_before": before, "accuracy_after": after, "max_abs_error": report.max_abs_error,
            "max_rel_error": report.max_rel_error, "sparsify_seconds": report.seconds,
            "train_seconds": train_seconds, "dtype": str(net.layers[0].weight.dtype)}


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["classes"] = prepare(args)
    _WORKER["args"] = args


def _worker_run(task: Tuple[int, int]) -> Dict[str, Any]:
    return run(task[0], task[1], _WORKER["data"], _WORKER["classes"], _WORKER["args"])


# ---------------------------------------------------------------------------- summaries
METRICS = ("zero_fraction", "hidden_zero_fraction", "accuracy_before", "accuracy_after", "max_abs_error",
           "max_rel_error", "sparsify_seconds", "train_seconds")


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for depth in sorted({r["depth"] for r in runs}):
        rs = [r for r in runs if r["depth"] == depth]
        entry: Dict[str, Any] = {"depth": depth, "seeds": len(rs), "width": rs[0]["width"],
                                 "total_weights": rs[0]["total_weights"], "hidden_weights": rs[0]["hidden_weights"],
                                 "zero_weights": sorted({r["zero_weights"] for r in rs}),
                                 "predicted_zero_weights": rs[0]["predicted_zero_weights"],
                                 "diagonalised_layers": rs[0]["diagonalised_layers"]}
        for m in METRICS:
            entry[m] = mean_se([r[m] for r in rs])
        entry["max_rel_error_worst"] = max(r["max_rel_error"] for r in rs)
        entry["accuracy_change"] = mean_se([r["accuracy_after"] - r["accuracy_before"] for r in rs])
        out.append(entry)
    return out


def fmt(pair: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = pair
    if math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def sci(pair: Sequence[float]) -> str:
    mean, se = pair
    return f"{mean:.1e}" if math.isnan(se) else f"{mean:.1e} ± {se:.1e}"


def markdown(summary: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    w = meta["width"]
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training / {meta['test_size']} test images, "
             f"`[in, {w} × L, classes]`, {meta['epochs']} epochs, seeds {meta['seeds']}; mean ± standard error "
             "over seeds. Zero = structurally (exactly) zero weight after `net.sparsify(probe=test inputs)`; "
             "\"predicted\" = floor(L/2)·(W² − W). Errors are the max |Δ output| over the test inputs, "
             f"absolute and relative to max |output| ({meta['dtype']}).", "",
             "| hidden layers L | diagonalised W_l | zero weights (predicted) | zero, all weights (%) | "
             "zero, hidden-to-hidden (%) | test acc. before (%) | test acc. after (%) | max abs. error | "
             "max rel. error | sparsify time (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        zeros = "/".join(str(z) for z in s["zero_weights"])
        lines.append(f"| {s['depth']} | {', '.join(str(i) for i in s['diagonalised_layers'])} | "
                     f"{zeros} ({s['predicted_zero_weights']}) | {fmt(s['zero_fraction'])} | "
                     f"{fmt(s['hidden_zero_fraction'])} | {fmt(s['accuracy_before'])} | {fmt(s['accuracy_after'])} | "
                     f"{sci(s['max_abs_error'])} | {sci(s['max_rel_error'])} | "
                     f"{fmt(s['sparsify_seconds'], 1000.0, 1)} |")
    lines += ["", f"Worst relative error over all runs: {max(s['max_rel_error_worst'] for s in summary):.1e}. "
              f"Limit for deep nets (L → ∞): hidden-to-hidden zero fraction (W − 1)/(2W) = "
              f"{100 * (w - 1) / (2 * w):.2f} %."]
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], meta: Dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = meta["width"]
    depths = [s["depth"] for s in summary]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label, marker in (("zero_fraction", "of all weights", "o"),
                               ("hidden_zero_fraction", "of hidden-to-hidden weights", "s")):
        ax.errorbar(depths, [100 * s[key][0] for s in summary],
                    yerr=[0 if math.isnan(s[key][1]) else 100 * s[key][1] for s in summary],
                    marker=marker, capsize=3, label=f"measured, {label}")
    fine = list(range(min(depths), max(depths) + 1))
    ax.plot(fine, [100 * (L // 2) * (w - 1) / (w * (L - 1)) for L in fine], "k:", label="predicted, hidden-to-hidden")
    ax.axhline(100 * (w - 1) / (2 * w), color="0.5", linestyle="--", linewidth=1, label="deep limit (W−1)/(2W)")
    ax.set_xlabel("hidden layers L")
    ax.set_ylabel("structurally zero weights (%)")
    ax.set_xticks(fine)
    ax.set_title(f"sparsify(): {meta['dataset']}, width {w}, {meta['epochs']} epochs, {len(meta['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sparsification.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATAMODULES), default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (default: the datamodule's)")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="numbers of hidden layers")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0 .. n-1); default 3, 5 with --full")
    parser.add_argument("--epochs", type=int, default=None, help="default 3, or 30 with --full")
    parser.add_argument("--full", action="store_true", help="paper scale: 30 epochs, 5 seeds, full training set")
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (one torch thread each)")
    parser.add_argument("--out", default="build/sparsification", help="output directory")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (30 if args.full else 3)
    args.seeds = args.seeds or (5 if args.full else 3)
    if args.full:
        args.train_subset = None
    if min(args.depths) < 1 or args.width < 1 or args.seeds < 1 or args.epochs < 1:
        parser.error("depths, width, seeds and epochs must be positive")
    args.depths = sorted(set(args.depths))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(1)
    data, classes = prepare(args)
    tasks = [(depth, seed) for seed in range(args.seeds) for depth in args.depths]
    print(f"{args.dataset}: {data[0].shape[0]} train / {data[2].shape[0]} test, {len(tasks)} runs, "
          f"{args.epochs} epochs, {args.workers} worker(s)", flush=True)
    runs: List[Dict[str, Any]] = []

    def report(r: Dict[str, Any]) -> None:
        runs.append(r)
        print(f"[{len(runs)}/{len(tasks)}] L={r['depth']} seed {r['seed']}: zero {100 * r['zero_fraction']:.2f} % "
              f"(hidden {100 * r['hidden_zero_fraction']:.2f} %), acc {100 * r['accuracy_before']:.2f} -> "
              f"{100 * r['accuracy_after']:.2f} %, rel err {r['max_rel_error']:.1e}, "
              f"{1000 * r['sparsify_seconds']:.1f} ms", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for r in pool.map(_worker_run, tasks):
                report(r)
    else:
        for depth, seed in tasks:
            report(run(depth, seed, data, classes, args))
    wall = time.perf_counter() - started
    meta = {"dataset": args.dataset, "epochs": args.epochs, "seeds": list(range(args.seeds)), "depths": args.depths,
            "width": args.width, "train_size": data[0].shape[0], "test_size": data[2].shape[0],
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "optimizer": "AdamW",
            "init": "orthogonal", "isotropic": {"psi": "decay", "length": "trainable"}, "dtype": runs[0]["dtype"],
            "command": " ".join(["python", "examples/sparsification.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "workers": args.workers, "nproc": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    runs.sort(key=lambda r: (r["depth"], r["seed"]))
    summary = summarise(runs)
    result = {"meta": meta, "summary": summary, "runs": runs}
    (out / "sparsification.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, meta)
    (out / "sparsification.md").write_text(table + "\n")
    png = plot(summary, meta, out)
    print(table)
    print(f"wall time {wall:.1f} s ({args.workers} worker(s), nproc {meta['nproc']}, torch {meta['torch']}); "
          f"wrote {out / 'sparsification.json'}, {out / 'sparsification.md'}, {png}")
    return result


if __name__ == "__main__":
    main()
