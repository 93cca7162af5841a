"""Neuroabundance: does starting over-wide and pruning beat growing to the same final width?

For every ordered pair ``(start, end)`` of ``--widths`` and every seed, an ``IsotropicMLP
[in, start, start, classes]`` (``psi="decay"``, ``length="trainable"``) trains for ``--warmup``
epochs at ``start``, then follows a linear width schedule to ``end`` over ``--schedule`` epochs
(``WidthSchedulePolicy(targets=end, start_epoch=warmup, end_epoch=warmup + schedule)``, decided
after every epoch and applied with ``apply_decision(net, decision, optimizer=opt)``, so the AdamW
state is remapped), then settles for ``--settle`` epochs at ``end``. ``start == end`` is the static
net. Every run of one seed sees the same sequence of mini-batches; runs with the same start width
share their initial weights (so "same start, other end" differences are fully paired, while
"same end, other start" differences share the data order only).

Setting (the paper's): AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal init, zero biases,
per-pixel standardisation. Outputs ``neuroabundance.json``, ``neuroabundance.md`` and
``neuroabundance.png`` in ``--out``.

    python examples/neuroabundance.py          # 10k-image subset, 2 + 6 + 4 epochs, 3 seeds: minutes on 2 cores
    python examples/neuroabundance.py --full   # full training set, 5 + 15 + 10 epochs, 5 seeds
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

from iso_lightning import IsotropicMLP, PolicyContext, WidthSchedulePolicy, apply_decision, describe
from iso_lightning.datamodules import DATAMODULES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import data_order, mean_se, prepare  # noqa: E402

DATASETS = tuple(DATAMODULES)
Data = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------- data
def build_model(sizes: Sequence[int], seed: int) -> IsotropicMLP:
    """The isotropic net (psi decay, trainable o) with seeded orthogonal weights, zero biases."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + sizes[1])
    reference = IsotropicMLP(list(sizes), init="orthogonal", generator=g)
    model = IsotropicMLP(list(sizes), psi="decay", length="trainable")
    with torch.no_grad():
        for a, b in zip(reference.layers, model.layers, strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return model


def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 10_000) -> Tuple[float, float]:
    """Mean cross-entropy (without the psi penalty) and accuracy over ``(x, y)``."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            out = model(x[i : i + chunk])
            loss += float(nn.functional.cross_entropy(out, y[i : i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    return loss / x.shape[0], correct / x.shape[0]


# ---------------------------------------------------------------------------- training
def train_run(start: int, end: int, seed: int, data: Data, classes: int, args: argparse.Namespace) -> Dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    model = build_model([x_train.shape[1], start, start, classes], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    policy = WidthSchedulePolicy(targets=end, start_epoch=args.warmup, end_epoch=args.warmup + args.schedule)
    growth = torch.Generator().manual_seed(7_919 * (seed + 1) + 101 * start + end)
    total = args.warmup + args.schedule + args.settle
    history: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for epoch, order in enumerate(data_order(seed, x_train.shape[0], total)):
        running = 0.0
        for i in range(0, order.numel(), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]) + model.regularisation()
            loss.backward()
            opt.step()
            running += float(loss.detach()) * idx.numel()
        # Decision after epoch `epoch` (context = completed epochs): held during warm-up, linear over the schedule.
        decision = policy.decide(describe(model), PolicyContext(epoch=epoch + 1))
        reports = apply_decision(model, decision, optimizer=opt, generator=growth)
        history.append({"epoch": epoch, "running_loss": running / order.numel(), "widths": model.hidden_widths,
                        "changes": [f"{r.space} {r.op} {r.old_width}->{r.new_width}" for r in reports],
                        "test_accuracy": evaluate(model, x_test, y_test)[1]})
    seconds = time.perf_counter() - t0
    train_loss, train_accuracy = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    return {"start": start, "end": end, "seed": seed, "test_accuracy": test_accuracy, "test_loss": test_loss,
            "train_loss": train_loss, "train_accuracy": train_accuracy, "widths": model.hidden_widths,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds, "history": history}


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["classes"] = prepare(args.dataset, args.data, args.train_subset)
    _WORKER["args"] = args


def _worker_run(task: Tuple[int, int, int]) -> Dict[str, Any]:
    start, end, seed = task
    return train_run(start, end, seed, _WORKER["data"], _WORKER["classes"], _WORKER["args"])


# ---------------------------------------------------------------------------- summaries
def fmt(pair: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = pair
    if math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (start, end): mean ± s.e. over seeds; paired (same seed) differences to the static net at ``end``."""
    by_key: Dict[Tuple[int, int], Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["start"], run["end"]), {})[run["seed"]] = run
    out = []
    for (start, end), seeds in sorted(by_key.items()):
        entry: Dict[str, Any] = {"start": start, "end": end, "seeds": len(seeds)}
        for metric in ("test_accuracy", "train_loss", "train_accuracy"):
            entry[metric] = mean_se([r[metric] for r in seeds.values()])
        static = by_key.get((end, end))
        if static is not None and start != end:
            common = sorted(set(seeds) & set(static))
            entry["delta_vs_static_end"] = mean_se([seeds[s]["test_accuracy"] - static[s]["test_accuracy"]
                                                    for s in common])
        out.append(entry)
    return out


def prune_vs_grow(runs: List[Dict[str, Any]], widths: Sequence[int]) -> List[Dict[str, Any]]:
    """For every end width with both a wider and a narrower start: pruned (start > end) − grown (start < end)."""
    acc = {(r["start"], r["end"], r["seed"]): r["test_accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for end in widths:
        for hi in (w for w in widths if w > end):
            for lo in (w for w in widths if w < end):
                diffs = [acc[(hi, end, s)] - acc[(lo, end, s)] for s in seeds
                         if (hi, end, s) in acc and (lo, end, s) in acc]
                if diffs:
                    out.append({"end": end, "pruned_from": hi, "grown_from": lo, "delta": mean_se(diffs),
                                "wins": sum(d > 0 for d in diffs), "n": len(diffs)})
    return out


def markdown(summary: List[Dict[str, Any]], comparisons: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    get = {(s["start"], s["end"]): s for s in summary}
    widths = meta["widths"]
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training / {meta['test_size']} test images; "
             f"{meta['warmup']} warm-up epochs at the start width, {meta['schedule']} epochs of linear schedule, "
             f"{meta['settle']} settling epochs at the end width; seeds {meta['seeds']}, mean ± standard error. "
             "Test accuracy in %.", "",
             "**Final test accuracy** (rows: start width, columns: end width; the diagonal is the static net)", "",
             "| start \\ end | " + " | ".join(str(w) for w in widths) + " |",
             "| --- | " + " | ".join("---" for _ in widths) + " |"]
    for s in widths:
        lines.append(f"| {s} | " + " | ".join(fmt(get[(s, e)]["test_accuracy"]) if (s, e) in get else "–"
                                              for e in widths) + " |")
    lines += ["", "**Against the static net at the end width** (Δ paired by seed: same data order; the initial "
              "weights differ unless start = end)", "",
              "| end width | start width | direction | test accuracy (%) | Δ vs static end (pp) | final train loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for e in widths:
        for s in widths:
            entry = get.get((s, e))
            if entry is None:
                continue
            direction = "static" if s == e else ("prune" if s > e else "grow")
            delta = fmt(entry["delta_vs_static_end"]) if "delta_vs_static_end" in entry else "–"
            lines.append(f"| {e} | {s} | {direction} | {fmt(entry['test_accuracy'])} | {delta} | "
                         f"{fmt(entry['train_loss'], 1, 4)} |")
    if comparisons:
        lines += ["", "**Pruned minus grown, same end width** (paired by seed; pp; wins = seeds where pruning is "
                  "ahead)", "", "| end width | pruned from | grown from | Δ (pp) | wins |",
                  "| --- | --- | --- | --- | --- |"]
        for c in comparisons:
            lines.append(f"| {c['end']} | {c['pruned_from']} | {c['grown_from']} | {fmt(c['delta'])} | "
                         f"{c['wins']}/{c['n']} |")
    lines.append("")
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], runs: List[Dict[str, Any]], meta: Dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = meta["widths"]
    n = len(widths)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7), squeeze=False)
    for j, end in enumerate(widths):
        ax, axw = axes[0][j], axes[1][j]
        for k, start in enumerate(widths):
            sel = [r for r in runs if r["start"] == start and r["end"] == end]
            if not sel:
                continue
            epochs = [h["epoch"] + 1 for h in sel[0]["history"]]
            mean = [100 * sum(r["history"][i]["test_accuracy"] for r in sel) / len(sel) for i in range(len(epochs))]
            style = "-" if start == end else ("--" if start > end else ":")
            label = f"{start}→{end} ({'static' if start == end else 'prune' if start > end else 'grow'})"
            ax.plot(epochs, mean, style, color=f"C{k}", marker=".", label=label)
            axw.plot([0] + epochs, [start] + [h["widths"][0] for h in sel[0]["history"]], style, color=f"C{k}",
                     marker=".", label=label)
        for a in (ax, axw):
            a.axvspan(meta["warmup"], meta["warmup"] + meta["schedule"], color="0.9")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
            a.set_xlabel("epoch")
            a.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"end width {end}")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        axw.set_ylabel("hidden width (both layers)")
    finals = [100 * h["test_accuracy"] for r in runs for h in r["history"][meta["warmup"]:]]
    for j in range(n):
        axes[0][j].set_ylim(min(finals) - 0.5, max(finals) + 0.5)
    fig.suptitle(f"{meta['dataset']}: width schedules (grey: linear schedule), {len(meta['seeds'])} seeds", fontsize=11)
    fig.tight_layout()
    path = out / "neuroabundance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (fashion-mnist: default Debian's location)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0 .. n-1); default 3, 5 with --full")
    parser.add_argument("--warmup", type=int, default=None, help="epochs at the start width; default 2, 5 with --full")
    parser.add_argument("--schedule", type=int, default=None, help="epochs of linear schedule; default 6, 15 (--full)")
    parser.add_argument("--settle", type=int, default=None, help="epochs at the end width; default 4, 10 with --full")
    parser.add_argument("--full", action="store_true", help="paper-like: full training set, 5+15+10 epochs, 5 seeds")
    parser.add_argument("--train-subset", type=int, default=10_000, help="train on the first N training images")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: in-process)")
    parser.add_argument("--out", default="build/neuroabundance", help="output directory")
    args = parser.parse_args(argv)
    if args.full:
        args.train_subset = None
    for name, fast, full in (("seeds", 3, 5), ("warmup", 2, 5), ("schedule", 6, 15), ("settle", 4, 10)):
        if getattr(args, name) is None:
            setattr(args, name, full if args.full else fast)
    args.widths = sorted(set(args.widths))
    if min(args.widths) < 1 or args.seeds < 1 or args.schedule < 1 or args.warmup < 0 or args.settle < 0:
        parser.error("widths, seeds and schedule must be positive, warm-up and settle >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, classes = prepare(args.dataset, args.data, args.train_subset)
    tasks = [(s, e, seed) for seed in range(args.seeds) for s in args.widths for e in args.widths]
    print(f"{args.dataset}: {data[0].shape[0]} train / {data[2].shape[0]} test, {len(tasks)} runs, "
          f"{args.warmup} + {args.schedule} + {args.settle} epochs, {args.workers} worker(s)", flush=True)
    runs: List[Dict[str, Any]] = []

    def report(run: Dict[str, Any]) -> None:
        runs.append(run)
        print(f"[{len(runs)}/{len(tasks)}] seed {run['seed']} {run['start']}→{run['end']}: test "
              f"{100 * run['test_accuracy']:.2f} %, widths {run['widths']}, {run['seconds']:.1f} s", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for run in pool.map(_worker_run, tasks):
                report(run)
    else:
        for s, e, seed in tasks:
            report(train_run(s, e, seed, data, classes, args))
    wall = time.perf_counter() - started
    meta = {"dataset": args.dataset, "widths": args.widths, "seeds": list(range(args.seeds)), "warmup": args.warmup,
            "schedule": args.schedule, "settle": args.settle, "train_size": data[0].shape[0],
            "test_size": data[2].shape[0], "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "optimizer": "AdamW", "init": "orthogonal",
            "isotropic": {"psi": "decay", "length": "trainable", "hidden_depth": 2},
            "command": " ".join(["python", "examples/neuroabundance.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "workers": args.workers, "nproc": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    summary = summarise(runs)
    comparisons = prune_vs_grow(runs, args.widths)
    result = {"meta": meta, "summary": summary, "prune_vs_grow": comparisons, "runs": runs}
    (out / "neuroabundance.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, comparisons, meta)
    (out / "neuroabundance.md").write_text(table + "\n")
    png = plot(summary, runs, meta, out)
    print(table)
    print(f"wall time {wall:.1f} s ({args.workers} worker(s), nproc {meta['nproc']}, torch {meta['torch']}); "
          f"wrote {out / 'neuroabundance.json'}, {out / 'neuroabundance.md'}, {png}")
    return result


if __name__ == "__main__":
    main()
