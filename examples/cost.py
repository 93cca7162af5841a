"""Cost of dynamic topology on the real data loop: seconds per epoch and per neuron operation.

For every width ``W`` in ``--widths`` three isotropic MLPs ``[in, W, W, classes]`` start from the
same weights and see the same data order (the datamodule's seeded sampler, through its
``DataLoader``):

* **static**: plain training;
* **growing**: after every epoch, ``net.grow(l, 1, optimizer=opt)`` on every hidden layer;
* **shrinking**: after every epoch, ``net.shrink(l, 1, optimizer=opt)`` (AdamW state remapped).

After each round of epochs, single operations are timed on a copy of the static net and its
AdamW optimizer: ``grow`` one neuron, ``shrink`` one neuron (with the AdamW remap), ``diagonalise``
(``"left"`` and ``"full"``) and ``sparsify``, each ``--op-repeats`` times on a fresh copy (the median
is kept). Everything is **interleaved**: round ``r`` trains one epoch of every run (the order of the
three rotates with ``r``) and then times the operations, so machine drift hits every case alike.
Ratios (growing / static and shrinking / static epoch time, operation time / static epoch time) are
formed within each round and reported as mean ± standard error and range over rounds; the first
``--warmup`` rounds are left out of the summary (they are in the JSON).

Setting: AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal init, ``psi="decay"``,
``length="trainable"``, one torch thread, one process. Writes ``cost.json``, ``cost.md`` and
``cost.png`` to ``--out``.

    python examples/cost.py             # 20,000 training images, 12 rounds (1 warm-up): ~2 minutes on 2 cores
    python examples/cost.py --full      # full training set, 21 rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from iso_lightning import IsotropicMLP
from iso_lightning.datamodules import DATAMODULES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import mean_se  # noqa: E402

KINDS = ("static", "growing", "shrinking")
OPS = ("grow", "shrink", "diagonalise-left", "diagonalise-full", "sparsify")


def make_datamodule(args: argparse.Namespace) -> Any:
    dm = DATAMODULES[args.dataset](data_dir=args.data, val_fraction=0, train_subset=args.train_subset,
                                   batch_size=args.batch_size, flatten=True, seed=0,
                                   download=args.data is None and args.dataset != "fashion-mnist")
    dm.prepare_data()
    dm.setup()
    return dm


def train_epoch(net: IsotropicMLP, opt: torch.optim.Optimizer, loader: Any) -> float:
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y) + net.regularisation()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def operation(name: str) -> Callable[[IsotropicMLP, torch.optim.Optimizer], Any]:
    if name == "grow":
        return lambda net, opt: net.grow(0, 1, optimizer=opt, generator=torch.Generator().manual_seed(0))
    if name == "shrink":
        return lambda net, opt: net.shrink(0, 1, optimizer=opt)
    if name == "diagonalise-left":
        return lambda net, opt: net.diagonalise(0, "left", optimizer=opt)
    if name == "diagonalise-full":
        return lambda net, opt: net.diagonalise(1, "full", optimizer=opt)
    if name == "sparsify":
        return lambda net, opt: net.sparsify(optimizer=opt)
    raise ValueError(name)


def time_op(name: str, net: IsotropicMLP, opt: torch.optim.Optimizer, repeats: int) -> float:
    """Median seconds of ``name`` on fresh deep copies of ``(net, opt)`` (copying not timed)."""
    fn, times = operation(name), []
    for _ in range(repeats):
        n2, o2 = copy.deepcopy((net, opt))  # one memo: the copied optimizer refers to the copied parameters
        with torch.no_grad():
            start = time.perf_counter()
            fn(n2, o2)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def stats(values: Sequence[float]) -> Dict[str, Any]:
    m, se = mean_se(values)
    return {"mean": m, "se": se, "min": min(values), "max": max(values), "n": len(values)}


def measure(args: argparse.Namespace, dm: Any) -> List[Dict[str, Any]]:
    """Every round's record: per width, epoch seconds per run, operation seconds per run and per op."""
    setups = {}
    for width in args.widths:
        sizes = [dm.num_features, width, width, dm.num_classes]
        base = IsotropicMLP(sizes, psi="decay", length="trainable", init="orthogonal",
                            generator=torch.Generator().manual_seed(1_000_003 + width))
        runs = {}
        for kind in KINDS:
            net = copy.deepcopy(base)
            opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            runs[kind] = {"net": net, "opt": opt, "loader": dm.train_dataloader(),
                          "growth": torch.Generator().manual_seed(width)}
        setups[width] = runs
    rounds = []
    for r in range(args.epochs):
        record: Dict[str, Any] = {"round": r, "widths": {}}
        for width, runs in setups.items():
            entry: Dict[str, Any] = {"epoch_seconds": {}, "op_seconds": {}, "hidden_widths": {}}
            order = KINDS[r % 3:] + KINDS[: r % 3]
            for kind in order:
                run = runs[kind]
                net, opt = run["net"], run["opt"]
                entry["epoch_seconds"][kind] = train_epoch(net, opt, run["loader"])
                start = time.perf_counter()
                with torch.no_grad():
                    for layer in range(net.num_hidden):
                        if kind == "growing":
                            net.grow(layer, 1, optimizer=opt, generator=run["growth"])
                        elif kind == "shrinking":
                            net.shrink(layer, 1, optimizer=opt)
                entry["op_seconds"][kind] = time.perf_counter() - start if kind != "static" else 0.0
                entry["hidden_widths"][kind] = net.hidden_widths
            static = runs["static"]
            entry["single_op_seconds"] = {op: time_op(op, static["net"], static["opt"], args.op_repeats) for op in OPS}
            record["widths"][str(width)] = entry
        rounds.append(record)
        print(f"round {r}: " + "; ".join(
            f"W={w}: " + ", ".join(f"{k} {e['epoch_seconds'][k]:.2f}+{e['op_seconds'][k]:.3f} s" for k in KINDS)
            for w, e in record["widths"].items()), flush=True)
    return rounds


def summarise(rounds: List[Dict[str, Any]], warmup: int) -> Dict[str, Any]:
    used = rounds[warmup:] if len(rounds) > warmup else rounds
    out: Dict[str, Any] = {"rounds_used": [r["round"] for r in used]}
    for width in used[0]["widths"]:
        es = [r["widths"][width] for r in used]
        s: Dict[str, Any] = {}
        for kind in KINDS:
            s[f"{kind}_epoch_seconds"] = stats([e["epoch_seconds"][kind] for e in es])
            s[f"{kind}_op_seconds"] = stats([e["op_seconds"][kind] for e in es])
        for kind in ("growing", "shrinking"):
            s[f"{kind}_over_static"] = stats([(e["epoch_seconds"][kind] + e["op_seconds"][kind])
                                              / e["epoch_seconds"]["static"] for e in es])
            s[f"{kind}_train_only_over_static"] = stats([e["epoch_seconds"][kind] / e["epoch_seconds"]["static"]
                                                         for e in es])
            s[f"{kind}_op_over_epoch"] = stats([e["op_seconds"][kind] / e["epoch_seconds"]["static"] for e in es])
        for op in OPS:
            s[f"{op}_seconds"] = stats([e["single_op_seconds"][op] for e in es])
            s[f"{op}_over_epoch"] = stats([e["single_op_seconds"][op] / e["epoch_seconds"]["static"] for e in es])
        s["final_hidden_widths"] = rounds[-1]["widths"][width]["hidden_widths"]
        out[width] = s
    return out


def ratio(st: Dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    m, se, lo, hi = (st[k] * scale for k in ("mean", "se", "min", "max"))
    core = f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"
    return f"{core} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training images per epoch, batch "
             f"{meta['batch_size']} ({meta['steps_per_epoch']} steps), `[in, W, W, classes]`, {meta['epochs']} "
             f"interleaved rounds of which {len(summary['rounds_used'])} summarised (rounds "
             f"{summary['rounds_used']}); mean ± standard error over rounds [min, max]. One process, one torch "
             "thread.", "",
             "**Epoch time.** Growing/shrinking = (training epoch + one grow/shrink of 1 neuron in every hidden "
             "layer) / static training epoch of the same round.", "",
             "| W | static epoch (s) | growing / static | shrinking / static | grow ops / static epoch | "
             "shrink ops / static epoch | final widths (growing; shrinking) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    widths = [w for w in summary if w != "rounds_used"]
    for w in widths:
        s = summary[w]
        fw = s["final_hidden_widths"]
        lines.append(f"| {w} | {ratio(s['static_epoch_seconds'], 1, 2)} | {ratio(s['growing_over_static'])} | "
                     f"{ratio(s['shrinking_over_static'])} | {ratio(s['growing_op_over_epoch'], 100, 3)} % | "
                     f"{ratio(s['shrinking_op_over_epoch'], 100, 3)} % | {fw['growing']}; {fw['shrinking']} |")
    lines += ["", f"**Single operations** on the static net and its AdamW state (median of {meta['op_repeats']} "
              "fresh copies per round): milliseconds, and as % of the static epoch of the same round. grow / "
              "shrink: 1 neuron of hidden layer 0 (AdamW moments remapped); diagonalise-left: hidden space 0 in "
              "its singular basis; diagonalise-full: W_1 made diagonal; sparsify: alternating full "
              "diagonalisation (here W_1 only) with its default 256-sample probe.", "",
              "| W | operation | time (ms) | % of a static epoch |", "| --- | --- | --- | --- |"]
    for w in widths:
        for op in OPS:
            s = summary[w]
            lines.append(f"| {w} | {op} | {ratio(s[f'{op}_seconds'], 1000, 2)} | "
                         f"{ratio(s[f'{op}_over_epoch'], 100, 3)} |")
    return "\n".join(lines)


def plot(summary: Dict[str, Any], meta: Dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [w for w in summary if w != "rounds_used"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = ["growing / static", "shrinking / static"]
    for i, w in enumerate(widths):
        s = summary[w]
        vals = [s["growing_over_static"], s["shrinking_over_static"]]
        xs = [j + 0.8 * i / max(1, len(widths)) for j in range(2)]
        axes[0].bar(xs, [v["mean"] for v in vals], width=0.8 / max(1, len(widths)),
                    yerr=[0 if math.isnan(v["se"]) else v["se"] for v in vals], capsize=3, label=f"W={w}")
        ops = [s[f"{op}_over_epoch"] for op in OPS]
        xs = [j + 0.8 * i / max(1, len(widths)) for j in range(len(OPS))]
        axes[1].bar(xs, [100 * v["mean"] for v in ops], width=0.8 / max(1, len(widths)),
                    yerr=[0 if math.isnan(v["se"]) else 100 * v["se"] for v in ops], capsize=3, label=f"W={w}")
    axes[0].axhline(1.0, color="k", linewidth=0.8)
    axes[0].set_xticks(range(2), labels)
    axes[0].set_ylabel("epoch time ratio")
    axes[0].set_title("epoch time (training + per-epoch operations)")
    axes[1].set_xticks(range(len(OPS)), OPS, rotation=15)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("% of a static epoch")
    axes[1].set_title("one operation")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{meta['dataset']}, {meta['train_size']} images/epoch, {len(summary['rounds_used'])} rounds")
    fig.tight_layout()
    path = out / "cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATAMODULES), default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (default: the datamodule's)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=None, help="interleaved rounds (one epoch of each run); "
                        "default 12, or 21 with --full")
    parser.add_argument("--warmup", type=int, default=1, help="first rounds left out of the summary")
    parser.add_argument("--seeds", type=int, default=1, help="kept for a uniform interface: timing uses seed 0")
    parser.add_argument("--full", action="store_true", help="full training set, 21 rounds")
    parser.add_argument("--train-subset", type=int, default=20_000, help="first N training images (default 20000)")
    parser.add_argument("--op-repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--out", default="build/cost", help="output directory")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (21 if args.full else 12)
    if args.full:
        args.train_subset = None
    if min(args.widths) < 2 or args.epochs < 1 or args.op_repeats < 1 or args.warmup < 0:
        parser.error("widths must be >= 2; epochs and op repeats positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    dm = make_datamodule(args)
    n = len(dm.train_dataset)
    print(f"{args.dataset}: {n} training images, widths {args.widths}, {args.epochs} rounds", flush=True)
    rounds = measure(args, dm)
    summary = summarise(rounds, args.warmup)
    wall = time.perf_counter() - started
    meta = {"dataset": args.dataset, "epochs": args.epochs, "warmup": args.warmup, "widths": args.widths,
            "train_size": n, "batch_size": args.batch_size, "steps_per_epoch": math.ceil(n / args.batch_size),
            "op_repeats": args.op_repeats, "lr": args.lr, "weight_decay": args.weight_decay,
            "isotropic": {"psi": "decay", "length": "trainable"},
            "command": " ".join(["python", "examples/cost.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    result = {"meta": meta, "summary": summary, "rounds": rounds}
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, meta)
    (out / "cost.md").write_text(table + "\n")
    png = plot(summary, meta, out)
    print(table)
    print(f"wall time {wall:.1f} s (nproc {meta['nproc']}, torch {meta['torch']}); wrote {out / 'cost.json'}, "
          f"{out / 'cost.md'}, {png}")
    return result


if __name__ == "__main__":
    main()
