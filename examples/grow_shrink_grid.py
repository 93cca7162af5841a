"""Grow and shrink grids: pretrain an isotropic MLP at one width, then walk it one neuron per epoch to another.

The paper's first version of dynamic topology. For every start width ``S`` in ``--widths`` and seed,
an ``IsotropicMLP [in, S, S, classes]`` (``psi="decay"``, ``length="trainable"``) is pretrained for
``--pretrain-epochs`` epochs. The pretrained network and its AdamW state are then copied once per
target width ``T`` in ``--widths``; each copy keeps training for ``--epochs`` more epochs, and after
every one of the first ``|T - S|`` of them each hidden layer is moved by one neuron towards ``T``
(``net.resize(layer, w ± 1, optimizer=opt)``: the optimizer's state is remapped, not reset; growth
is exact, shrinking removes the weakest direction). The remaining epochs train at ``T``.

The pair ``S = T`` is the static isotropic net. A standard-tanh control (``nn.Linear`` + ``nn.Tanh``
at the start width, same initial weights, same data order) is trained for the same total number of
epochs. Every model of one seed sees the same sequence of mini-batches.

Setting (the paper's): AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal init, zero biases,
per-pixel standardisation. Outputs ``grow_shrink.json`` (every run with its per-epoch history),
``grow_shrink.md`` (tables) and ``grow_shrink.png`` (grid of curves) in ``--out``.

    python examples/grow_shrink_grid.py          # 10k-image subset, 3+30 epochs, 3 seeds: minutes on 2 cores
    python examples/grow_shrink_grid.py --full   # full training set, 10 + 40 epochs, 5 seeds
"""

from __future__ import annotations

import argparse
import copy
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
from _common import data_order, mean_se, prepare  # noqa: E402

DATASETS = tuple(DATAMODULES)
Data = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------- models
def reference_init(sizes: Sequence[int], seed: int) -> IsotropicMLP:
    """The initial weights of every model of this start width and seed (orthogonal, zero biases)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + sizes[1])
    return IsotropicMLP(list(sizes), init="orthogonal", generator=g)


def linear_layers(model: nn.Module) -> List[nn.Module]:
    if isinstance(model, IsotropicMLP):
        return list(model.layers)
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def build_model(name: str, sizes: Sequence[int], seed: int) -> nn.Module:
    """``"isotropic"`` (psi decay, trainable o) or ``"tanh"``, with the weights of :func:`reference_init`."""
    if name == "tanh":
        layers: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        model: nn.Module = nn.Sequential(*layers)
    elif name == "isotropic":
        model = IsotropicMLP(list(sizes), psi="decay", length="trainable")
    else:
        raise ValueError(f"Expected model 'isotropic' or 'tanh', got {name!r}.")
    with torch.no_grad():
        for a, b in zip(linear_layers(reference_init(sizes, seed)), linear_layers(model), strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return model


# ---------------------------------------------------------------------------- training
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 10_000) -> Tuple[float, float]:
    """Mean cross-entropy (without the psi penalty) and accuracy over ``(x, y)``."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            out = model(x[i : i + chunk])
            loss += float(nn.functional.cross_entropy(out, y[i : i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    return loss / x.shape[0], correct / x.shape[0]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, order: Tensor, data: Data, batch_size: int) -> float:
    x_train, y_train = data[0], data[1]
    iso = isinstance(model, IsotropicMLP)
    total = 0.0
    for i in range(0, order.numel(), batch_size):
        idx = order[i : i + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if iso:
            loss = loss + model.regularisation()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * idx.numel()
    return total / order.numel()


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def record(model: nn.Module, epoch: int, running: float, data: Data) -> Dict[str, Any]:
    out: Dict[str, Any] = {"epoch": epoch, "running_loss": running,
                           "test_accuracy": evaluate(model, data[2], data[3])[1]}
    if isinstance(model, IsotropicMLP):
        out["widths"] = model.hidden_widths
    return out


def finish(model: nn.Module, history: List[Dict[str, Any]], data: Data, seconds: float) -> Dict[str, Any]:
    train_loss, train_accuracy = evaluate(model, data[0], data[1])
    test_loss, test_accuracy = evaluate(model, data[2], data[3])
    out = {"test_accuracy": test_accuracy, "test_loss": test_loss, "train_loss": train_loss,
           "train_accuracy": train_accuracy, "seconds": seconds, "history": history,
           "parameters": sum(p.numel() for p in model.parameters())}
    if isinstance(model, IsotropicMLP):
        out["widths"] = model.hidden_widths
    return out


def run_start(start: int, targets: Sequence[int], seed: int, data: Data, classes: int,
              args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Pretrain at ``start``, then one continuation per target (copies of net + optimizer), plus the tanh control."""
    sizes = [data[0].shape[1], start, start, classes]
    total = args.pretrain_epochs + args.epochs
    orders = data_order(seed, data[0].shape[0], total)
    runs: List[Dict[str, Any]] = []
    # Pretraining (shared by every target of this start width and seed).
    t0 = time.perf_counter()
    model = build_model("isotropic", sizes, seed)
    opt = make_optimizer(model, args)
    pre_history = []
    for epoch in range(args.pretrain_epochs):
        running = train_epoch(model, opt, orders[epoch], data, args.batch_size)
        pre_history.append(record(model, epoch, running, data))
    pre_seconds = time.perf_counter() - t0
    for target in targets:
        t1 = time.perf_counter()
        net, optimizer = copy.deepcopy((model, opt))  # one memo: the copied optimizer holds the copied parameters
        growth = torch.Generator().manual_seed(7_919 * (seed + 1) + 101 * start + target)
        history = list(pre_history)
        changes: List[str] = []
        for epoch in range(args.pretrain_epochs, total):
            running = train_epoch(net, optimizer, orders[epoch], data, args.batch_size)
            for layer in reversed(range(net.num_hidden)):  # last hidden layer first
                width = net.space(layer).width
                if width != target:
                    step = 1 if target > width else -1
                    for _ in range(args.step):
                        if net.space(layer).width == target:
                            break
                        rep = net.resize(layer, net.space(layer).width + step, optimizer=optimizer,
                                         generator=growth)
                        if rep is not None:
                            changes.append(f"{epoch}:{rep.space} {rep.op} {rep.old_width}->{rep.new_width}")
            history.append(record(net, epoch, running, data))
        result = finish(net, history, data, pre_seconds + time.perf_counter() - t1)
        runs.append(dict(result, model="isotropic", start=start, target=target, seed=seed, changes=changes))
    # Control: elementwise tanh at the start width, same init and data order, static for all epochs.
    t2 = time.perf_counter()
    tanh = build_model("tanh", sizes, seed)
    opt = make_optimizer(tanh, args)
    history = []
    for epoch in range(total):
        running = train_epoch(tanh, opt, orders[epoch], data, args.batch_size)
        history.append(record(tanh, epoch, running, data))
    result = finish(tanh, history, data, time.perf_counter() - t2)
    runs.append(dict(result, model="tanh", start=start, target=start, seed=seed, widths=[start, start], changes=[]))
    return runs


def train_static(width: int, seed: int, data: Data, classes: int, args: argparse.Namespace) -> Dict[str, Any]:
    """An isotropic net trained at ``width`` for all epochs in one go (no copy): what the pair S = T must equal."""
    sizes = [data[0].shape[1], width, width, classes]
    total = args.pretrain_epochs + args.epochs
    model = build_model("isotropic", sizes, seed)
    opt = make_optimizer(model, args)
    history = []
    for epoch, order in enumerate(data_order(seed, data[0].shape[0], total)):
        running = train_epoch(model, opt, order, data, args.batch_size)
        history.append(record(model, epoch, running, data))
    return finish(model, history, data, 0.0)


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["classes"] = prepare(args.dataset, args.data, args.train_subset)
    _WORKER["args"] = args


def _worker_run(task: Tuple[int, int]) -> List[Dict[str, Any]]:
    start, seed = task
    args = _WORKER["args"]
    return run_start(start, args.widths, seed, _WORKER["data"], _WORKER["classes"], args)


# ---------------------------------------------------------------------------- summaries
def fmt(pair: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = pair
    if math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (model, start, target): mean ± s.e. over seeds, and paired differences to the static pair S = T."""
    by_key: Dict[Tuple[str, int, int], Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["model"], run["start"], run["target"]), {})[run["seed"]] = run
    out = []
    for (model, start, target), seeds in sorted(by_key.items()):
        entry: Dict[str, Any] = {"model": model, "start": start, "target": target, "seeds": len(seeds)}
        for metric in ("test_accuracy", "train_loss", "train_accuracy"):
            entry[metric] = mean_se([r[metric] for r in seeds.values()])
        pre = [r["history"][r["pretrain_epochs"] - 1]["test_accuracy"] for r in seeds.values()
               if r.get("pretrain_epochs")]
        if pre:
            entry["pretrain_accuracy"] = mean_se(pre)
        for ref_name, ref_key in (("static_start", ("isotropic", start, start)),
                                  ("static_target", ("isotropic", target, target)),
                                  ("tanh", ("tanh", start, start))):
            other = by_key.get(ref_key)
            if other is not None and ref_key != (model, start, target):
                common = sorted(set(seeds) & set(other))
                entry[f"delta_vs_{ref_name}"] = mean_se([seeds[s]["test_accuracy"] - other[s]["test_accuracy"]
                                                        for s in common])
        out.append(entry)
    return out


def markdown(summary: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    get = {(s["model"], s["start"], s["target"]): s for s in summary}
    widths = meta["widths"]
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training / {meta['test_size']} test images; "
             f"pretraining {meta['pretrain_epochs']} epochs at the start width, then {meta['epochs']} epochs moving "
             f"{meta['step']} neuron(s) per epoch and hidden layer towards the target, then training at the target; "
             f"seeds {meta['seeds']}, mean ± standard error. Final test accuracy in %.", "",
             "**Final test accuracy** (rows: start width, columns: target width; the diagonal is the static "
             "isotropic net; last column the static `nn.Tanh` net at the start width)", "",
             "| start \\ target | " + " | ".join(str(t) for t in widths) + " | tanh (start width) |",
             "| --- | " + " | ".join("---" for _ in widths) + " | --- |"]
    for s in widths:
        cells = [fmt(get[("isotropic", s, t)]["test_accuracy"]) if ("isotropic", s, t) in get else "–" for t in widths]
        tanh = get.get(("tanh", s, s))
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {fmt(tanh['test_accuracy']) if tanh else '–'} |")
    lines += ["", "**Paired differences** (percentage points; same seed = same data order; Δ vs static start "
              "also shares the initial weights and the pretraining)", "",
              "| start → target | final acc. (%) | Δ vs static at start width | Δ vs static at target width | "
              "Δ vs tanh (start width) | final train loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in widths:
        for t in widths:
            e = get.get(("isotropic", s, t))
            if e is None:
                continue
            cols = [fmt(e[k]) if k in e else "–" for k in ("delta_vs_static_start", "delta_vs_static_target",
                                                          "delta_vs_tanh")]
            lines.append(f"| {s} → {t} | {fmt(e['test_accuracy'])} | " + " | ".join(cols)
                         + f" | {fmt(e['train_loss'], 1, 4)} |")
    lines.append("")
    return "\n".join(lines)


def plot(runs: List[Dict[str, Any]], meta: Dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = meta["widths"]
    n = len(widths)
    fig, axes = plt.subplots(n, n, figsize=(3.1 * n + 0.6, 2.5 * n + 0.8), sharex=True, sharey=True, squeeze=False)
    pre = meta["pretrain_epochs"]
    accs = [h["test_accuracy"] for r in runs for h in r["history"][pre:]]
    low = max(0.0, min(accs) * 100 - 1)
    high = min(100.0, max(accs) * 100 + 0.5)
    for i, s in enumerate(widths):
        for j, t in enumerate(widths):
            ax = axes[i][j]
            ax2 = ax.twinx()
            for kind, colour, style in (("isotropic", "C0", "-"), ("tanh", "C3", "--"), ("static_t", "0.5", ":")):
                if kind == "isotropic":
                    sel = [r for r in runs if r["model"] == "isotropic" and r["start"] == s and r["target"] == t]
                elif kind == "tanh":
                    sel = [r for r in runs if r["model"] == "tanh" and r["start"] == s]
                else:
                    if s == t:
                        continue
                    sel = [r for r in runs if r["model"] == "isotropic" and r["start"] == t and r["target"] == t]
                if not sel:
                    continue
                epochs = [h["epoch"] + 1 for h in sel[0]["history"]]
                mean = [100 * sum(r["history"][k]["test_accuracy"] for r in sel) / len(sel) for k in range(len(epochs))]
                label = {"isotropic": f"isotropic {s}→{t}", "tanh": f"tanh {s} (static)",
                         "static_t": f"isotropic {t} (static)"}[kind]
                ax.plot(epochs, mean, style, color=colour, linewidth=1.3, label=label)
            sel = [r for r in runs if r["model"] == "isotropic" and r["start"] == s and r["target"] == t]
            if sel:
                ax2.plot([h["epoch"] + 1 for h in sel[0]["history"]], [h["widths"][0] for h in sel[0]["history"]],
                         color="C2", alpha=0.45, linewidth=1.0)
            ax2.set_ylim(0, max(widths) * 1.05)
            if j < n - 1:
                ax2.set_yticklabels([])
            else:
                ax2.set_ylabel("width", color="C2", fontsize=8)
            ax.axvline(pre + 0.5, color="0.7", linewidth=0.8)
            ax.set_ylim(low, high)
            ax.grid(alpha=0.3)
            ax.set_title(f"{s} → {t}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"start {s}\ntest acc. (%)", fontsize=8)
            if i == n - 1:
                ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax2.tick_params(labelsize=7, colors="C2")
    handles = [plt.Line2D([], [], color="C0", label="isotropic, start→target (mean over seeds)"),
               plt.Line2D([], [], color="0.5", linestyle=":", label="isotropic static at target width"),
               plt.Line2D([], [], color="C3", linestyle="--", label="nn.Tanh static at start width"),
               plt.Line2D([], [], color="C2", alpha=0.45, label="hidden width (right axis)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{meta['dataset']}: grow/shrink one neuron per epoch after {pre} pretraining epochs "
                 f"(vertical line), {len(meta['seeds'])} seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = out / "grow_shrink.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (fashion-mnist: default Debian's location)")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0 .. n-1); default 3, 5 with --full")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default 3, or 10 with --full")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs after pretraining (moving + settling); default 30, or 40 with --full")
    parser.add_argument("--step", type=int, default=1, help="neurons moved per epoch and hidden layer")
    parser.add_argument("--full", action="store_true", help="paper-like: full training set, 10 + 40 epochs, 5 seeds")
    parser.add_argument("--train-subset", type=int, default=10_000, help="train on the first N training images")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: in-process)")
    parser.add_argument("--out", default="build/grow_shrink", help="output directory")
    args = parser.parse_args(argv)
    if args.full:
        args.train_subset = None
    args.seeds = args.seeds if args.seeds is not None else (5 if args.full else 3)
    args.pretrain_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (10 if args.full else 3)
    args.epochs = args.epochs if args.epochs is not None else (40 if args.full else 30)
    args.widths = sorted(set(args.widths))
    if min(args.widths) < 1 or args.seeds < 1 or args.epochs < 1 or args.pretrain_epochs < 0 or args.step < 1:
        parser.error("widths, seeds, epochs and step must be positive")
    if args.epochs * args.step < max(args.widths) - min(args.widths):
        parser.error("--epochs x --step must cover the largest width difference so that every target is reached")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, classes = prepare(args.dataset, args.data, args.train_subset)
    tasks = [(start, seed) for seed in range(args.seeds) for start in args.widths]
    print(f"{args.dataset}: {data[0].shape[0]} train / {data[2].shape[0]} test, {len(tasks)} pretrainings, "
          f"{len(tasks) * (len(args.widths) + 1)} runs, {args.pretrain_epochs} + {args.epochs} epochs, "
          f"{args.workers} worker(s)", flush=True)
    runs: List[Dict[str, Any]] = []

    def report(batch: List[Dict[str, Any]]) -> None:
        for run in batch:
            run["pretrain_epochs"] = args.pretrain_epochs
            runs.append(run)
            print(f"seed {run['seed']} {run['model']} {run['start']}→{run['target']}: test "
                  f"{100 * run['test_accuracy']:.2f} %, widths {run['widths']}, {run['seconds']:.1f} s", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for batch in pool.map(_worker_run, tasks):
                report(batch)
    else:
        for start, seed in tasks:
            report(run_start(start, args.widths, seed, data, classes, args))
    wall = time.perf_counter() - started
    meta = {"dataset": args.dataset, "widths": args.widths, "seeds": list(range(args.seeds)),
            "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs, "step": args.step,
            "train_size": data[0].shape[0], "test_size": data[2].shape[0], "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "optimizer": "AdamW", "init": "orthogonal",
            "isotropic": {"psi": "decay", "length": "trainable", "hidden_depth": 2},
            "command": " ".join(["python", "examples/grow_shrink_grid.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "workers": args.workers, "nproc": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    summary = summarise(runs)
    result = {"meta": meta, "summary": summary, "runs": runs}
    (out / "grow_shrink.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, meta)
    (out / "grow_shrink.md").write_text(table + "\n")
    png = plot(runs, meta, out)
    print(table)
    print(f"wall time {wall:.1f} s ({args.workers} worker(s), nproc {meta['nproc']}, torch {meta['torch']}); "
          f"wrote {out / 'grow_shrink.json'}, {out / 'grow_shrink.md'}, {png}")
    return result


if __name__ == "__main__":
    main()
