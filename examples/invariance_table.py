"""Invariance table: how much do diagonalisation, growth and shrinking change a trained network?

For seven intrinsic-length / linear-correction settings, train an isotropic MLP, then apply to
copies of it: full diagonalisation alone (``sparsify``), growth of every hidden layer by ``k``
neurons and shrinking of every hidden layer by ``k`` neurons, for ``k`` in {1, 5, 25, 50, 75}.
Report the change of test accuracy, the mean relative change of the logits and the mean KL
divergence between the output distributions before and after.

    python examples/invariance_table.py                      # fast default (~2-3 minutes on 2 cores)
    python examples/invariance_table.py --full               # 30 epochs on the full training set
    python examples/invariance_table.py --dataset mnist --data DIR

Settings (o = intrinsic length, psi = linear correction): the paper's o trainable + psi decay;
o none / constant / trainable with psi none (plain truncation); o trainable with psi constant and
trainable; and o trainable with psi none plus the *expectation fold* (the removed neurons' mean
output over a training batch folded into the next bias, ``shrink(..., expectation=batch)``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spectrum_evolution import DATASETS, data_order, prepare  # noqa: E402

from iso_lightning import IsotropicMLP  # noqa: E402

SETTINGS: Tuple[Tuple[str, str, str, bool], ...] = (
    ("o trainable, psi decay (paper)", "trainable", "decay", False),
    ("o none, psi none", "none", "none", False),
    ("o constant, psi none", "constant", "none", False),
    ("o trainable, psi none", "trainable", "none", False),
    ("o trainable, psi constant", "trainable", "constant", False),
    ("o trainable, psi trainable", "trainable", "trainable", False),
    ("o trainable, psi none + expectation fold", "trainable", "none", True),
)
KS = (1, 5, 25, 50, 75)


def train(net: IsotropicMLP, data: Tuple, orders: List[torch.Tensor], batch: int) -> None:
    x, y = data[0], data[1]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    for order in orders:
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(net(x[idx]), y[idx]) + net.regularisation()).backward()
            opt.step()


def compare(before: torch.Tensor, after: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    rel = ((after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)).mean()
    logp, logq = F.log_softmax(before, dim=1), F.log_softmax(after, dim=1)
    kl = (logp.exp() * (logp - logq)).sum(dim=1).mean()
    acc_change = (after.argmax(1) == y).double().mean() - (before.argmax(1) == y).double().mean()
    return {"delta_acc": 100.0 * float(acc_change), "rel_logits": float(rel), "kl": float(kl)}


def run_seed(seed: int, data: Tuple, classes: int, width: int, epochs: int, batch: int,
             fold_batch: int) -> List[Dict[str, Any]]:
    torch.manual_seed(seed)
    orders = data_order(seed, data[0].shape[0], epochs)
    sizes = [data[0].shape[1], width, width, classes]
    init = IsotropicMLP(sizes, generator=torch.Generator().manual_seed(seed))
    rows = []
    for name, length, psi, expectation in SETTINGS:
        net = IsotropicMLP(sizes, length=length, psi=psi)
        net.load_state_dict(init.state_dict(), strict=False)  # identical weights and biases
        train(net, data, orders, batch)
        net = net.double()
        x_test, y_test = data[2].double(), data[3]
        with torch.no_grad():
            before = net(x_test)
        fold = data[0][:fold_batch].double() if expectation else None
        probe = x_test[:256]
        ops: List[Tuple[str, int, Any]] = [("full diagonalisation", 0, lambda m, p=probe: m.sparsify(probe=p))]
        for k in KS:
            ops.append(("grow", k, lambda m, k=k: m.set_widths([w + k for w in m.hidden_widths],
                                                               generator=torch.Generator().manual_seed(seed))))
            ops.append(("shrink", k, lambda m, k=k, f=fold: [m.shrink(layer, k, expectation=f)
                                                             for layer in reversed(range(m.num_hidden))]))
        for op, k, apply in ops:
            copy_ = copy.deepcopy(net)
            start = time.perf_counter()
            apply(copy_)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                after = copy_(x_test)
            rows.append({"setting": name, "op": op, "k": k, "seed": seed, "seconds": seconds,
                         "accuracy": 100.0 * float((before.argmax(1) == y_test).double().mean()),
                         **compare(before, after, y_test)})
    return rows


def summarise(rows: List[Dict[str, Any]]) -> str:
    def fmt(values: Sequence[float], digits: str) -> str:
        mean = statistics.fmean(values)
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        return f"{mean:{digits}} ± {se:{digits}}"

    lines = ["| setting | operation | k | Δ accuracy (pp) | mean relative change of logits | KL(before ‖ after) |",
             "| --- | --- | --- | --- | --- | --- |"]
    keys = []
    for r in rows:
        key = (r["setting"], r["op"], r["k"])
        if key not in keys:
            keys.append(key)
    for setting, op, k in keys:
        group = [r for r in rows if (r["setting"], r["op"], r["k"]) == (setting, op, k)]
        lines.append(f"| {setting} | {op} | {k or '–'} | {fmt([r['delta_acc'] for r in group], '.2f')} | "
                     f"{fmt([r['rel_logits'] for r in group], '.2e')} | {fmt([r['kl'] for r in group], '.2e')} |")
    accuracy = {s[0]: fmt([r["accuracy"] for r in rows if r["setting"] == s[0] and r["op"] == "grow"
                           and r["k"] == 1], ".2f") for s in SETTINGS}
    lines += ["", "Test accuracy of the trained networks (%): "
              + "; ".join(f"{name}: {value}" for name, value in accuracy.items()) + "."]
    return "\n".join(lines)


def figure(rows: List[Dict[str, Any]], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for col, metric in enumerate(("kl", "delta_acc")):
        ax = fig.add_subplot(1, 2, col + 1)
        for setting, *_ in SETTINGS:
            ks = list(KS)
            values = [statistics.fmean(r[metric] for r in rows if r["setting"] == setting and r["op"] == "shrink"
                                       and r["k"] == k) for k in ks]
            if metric == "kl":
                values = [max(v, 1e-18) for v in values]
            ax.plot(ks, values, marker="o", label=setting)
        ax.set_xscale("log")
        if metric == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("neurons removed per hidden layer (k)")
        ax.set_ylabel("KL(before ‖ after)" if metric == "kl" else "Δ test accuracy (pp)")
        ax.set_title("Shrinking: " + ("output divergence" if metric == "kl" else "accuracy change"))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (default: the datamodule's)")
    parser.add_argument("--width", type=int, default=100, help="hidden width (must exceed the largest k)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--fold-batch", type=int, default=2048, help="training inputs of the expectation fold")
    parser.add_argument("--full", action="store_true", help="30 epochs on the whole training set")
    parser.add_argument("--out", default="build/invariance")
    args = parser.parse_args(argv)
    if args.full:
        args.epochs, args.train_subset = 30, None
    if args.width <= max(KS):
        parser.error(f"--width must exceed the largest k ({max(KS)}), got {args.width}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    data, classes = prepare(args.dataset, args.data, args.train_subset)
    rows: List[Dict[str, Any]] = []
    for seed in range(args.seeds):
        rows += run_seed(seed, data, classes, args.width, args.epochs, args.batch_size, args.fold_batch)
    os.makedirs(args.out, exist_ok=True)
    table = summarise(rows)
    header = (f"Dataset {args.dataset}, [in, {args.width}, {args.width}, classes], {args.epochs} epochs on "
              f"{data[0].shape[0]} training images, {args.seeds} seeds; changes measured on the "
              f"{data[2].shape[0]} test images in float64; mean ± standard error over seeds.\n\n")
    with open(os.path.join(args.out, "invariance.md"), "w") as fh:
        fh.write(header + table + "\n")
    result = {"meta": {**vars(args), "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
                       "nproc": os.cpu_count()}, "rows": rows}
    with open(os.path.join(args.out, "invariance.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    figure(rows, os.path.join(args.out, "invariance.png"))
    print(header + table)
    print(f"wall time {result['meta']['wall_seconds']:.1f} s; wrote {args.out}/invariance.{{json,md,png}}")
    return result


if __name__ == "__main__":
    main()
