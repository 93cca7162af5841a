"""Spectrum evolution: how do the singular values of an isotropic MLP and a tanh MLP move in training?

The paper's argument for dynamic topologies rests on the spectrum of each hidden layer: orthogonal
initialisation puts every singular value at 1, and training is expected to push some of them towards
zero in the isotropic network (those directions can then be removed almost exactly). This script
trains, per seed, from the SAME initial weights and in the SAME data order:

* the isotropic MLP (``psi="decay"``, trainable intrinsic length ``o``), and
* a standard ``nn.Linear`` + ``nn.Tanh`` MLP,

and after every epoch (and at epoch 0, before training) records the singular values of every
layer's weight matrix and the norm of every bias. Setting (the paper's): AdamW lr 1e-3, weight decay
1e-3, batch 48, orthogonal initialisation, zero biases, per-pixel standardisation (the library's
datamodules). It writes ``spectrum.json`` (everything), ``spectrum.md`` (summary table at the last
epoch, mean ± s.e. over seeds), ``spectrum_ridgeline.png`` (one ridge per epoch, per layer,
isotropic vs tanh side by side; seed 0) and ``spectrum_stats.png`` (summary statistics per epoch).

Only the weight matrices are decomposed; the isotropic net's psi correction weights are not included.

    python examples/spectrum_evolution.py             # width 64, 20k images, 10 epochs, 3 seeds: ~2 min
    python examples/spectrum_evolution.py --full      # full training set, 30 epochs
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
from _common import data_order, mean_se, prepare  # noqa: E402

DATASETS = tuple(DATAMODULES)
MODELS = ("isotropic", "tanh")
THRESHOLD = 0.95

Data = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------- models
def reference_init(sizes: Sequence[int], seed: int) -> IsotropicMLP:
    """The initial weights shared by both models of this architecture and seed (orthogonal, zero biases)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + 7919 * len(sizes) + sizes[1])
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
        raise ValueError(f"Expected a model in {MODELS}, got {name!r}.")
    source, target = linear_layers(reference_init(sizes, seed)), linear_layers(model)
    if len(source) != len(target):
        raise ValueError("Expected two networks with the same affine layers.")
    with torch.no_grad():
        for a, b in zip(source, target):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return model


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Singular values (descending, float64) of every layer's weight and the norm of every bias."""
    layers = linear_layers(model)
    return {"sigma": [torch.linalg.svdvals(m.weight.detach().double()).tolist() for m in layers],
            "bias_norm": [float(m.bias.detach().double().norm()) for m in layers]}


# ---------------------------------------------------------------------------- training
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 10_000) -> Tuple[float, float]:
    """Mean cross-entropy (without any regulariser) and accuracy over ``(x, y)``."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            out = model(x[i : i + chunk])
            loss += float(nn.functional.cross_entropy(out, y[i : i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    return loss / x.shape[0], correct / x.shape[0]


def train(model: nn.Module, data: Data, seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
          on_epoch: Any = None) -> List[Dict[str, Any]]:
    """AdamW on the seed's data order; ``on_epoch(epoch, model, record)`` after each epoch (and at 0)."""
    x_train, y_train, x_test, y_test = data
    iso = isinstance(model, IsotropicMLP)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: List[Dict[str, Any]] = []
    if on_epoch is not None:
        record = {"epoch": 0, "test_accuracy": evaluate(model, x_test, y_test)[1]}
        on_epoch(model, record)
        history.append(record)
    for epoch, order in enumerate(data_order(seed, x_train.shape[0], epochs), start=1):
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
        record = {"epoch": epoch, "running_loss": total / order.numel()}
        if on_epoch is not None:
            record["test_accuracy"] = evaluate(model, x_test, y_test)[1]
            on_epoch(model, record)
        history.append(record)
    return history


def train_run(task: Tuple[str, int], data: Data, classes: int, args: argparse.Namespace) -> Dict[str, Any]:
    name, seed = task
    sizes = [data[0].shape[1], *[args.width] * args.depth, classes]
    model = build_model(name, sizes, seed)
    start = time.perf_counter()
    history = train(model, data, seed, args.epochs, args.batch_size, args.lr, args.weight_decay,
                    on_epoch=lambda m, record: record.update(snapshot(m)))
    seconds = time.perf_counter() - start
    train_loss, train_accuracy = evaluate(model, data[0], data[1])
    test_loss, test_accuracy = evaluate(model, data[2], data[3])
    return {"model": name, "seed": seed, "sizes": sizes, "history": history, "seconds": seconds,
            "train_loss": train_loss, "train_accuracy": train_accuracy, "test_loss": test_loss,
            "test_accuracy": test_accuracy}


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["classes"] = prepare(args.dataset, args.data, args.train_subset)
    _WORKER["args"] = args


def _worker_run(task: Any) -> Dict[str, Any]:
    return _WORKER["fn"](task, _WORKER["data"], _WORKER["classes"], _WORKER["args"])


def run_tasks(tasks: List[Any], fn: Any, args: argparse.Namespace, report: Any) -> List[Dict[str, Any]]:
    """Run ``fn(task, data, classes, args)`` for every task, in ``args.workers`` processes; results in order."""
    runs: List[Dict[str, Any]] = []
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_with_fn,
                                 initargs=(args, fn)) as pool:
            for run in pool.map(_worker_run, tasks):
                runs.append(run)
                report(run, len(runs), len(tasks))
    else:
        data, classes = prepare(args.dataset, args.data, args.train_subset)
        for task in tasks:
            runs.append(fn(task, data, classes, args))
            report(runs[-1], len(runs), len(tasks))
    return runs


def _init_with_fn(args: argparse.Namespace, fn: Any) -> None:
    _worker_init(args)
    _WORKER["fn"] = fn


# ---------------------------------------------------------------------------- summaries
def effective_rank(sigma: Sequence[float]) -> float:
    """``exp(entropy(s / sum s))`` (Roy & Vetterli): n for n equal singular values."""
    total = sum(sigma)
    if total <= 0:
        return 0.0
    p = [s / total for s in sigma if s > 0]
    return math.exp(-sum(q * math.log(q) for q in p))


def layer_stats(sigma: Sequence[float], bias_norm: float) -> Dict[str, float]:
    return {"sigma_max": max(sigma), "sigma_min": min(sigma), "below": float(sum(s < THRESHOLD for s in sigma)),
            "eff_rank": effective_rank(sigma), "bias_norm": bias_norm}


STATS = (("sigma_max", "largest σ", 3), ("sigma_min", "smallest σ", 3), ("below", f"# σ < {THRESHOLD}", 1),
         ("eff_rank", "effective rank", 1), ("bias_norm", "bias norm", 3))


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per model, layer and epoch: mean ± s.e. over seeds of every statistic of :data:`STATS`."""
    out: Dict[str, Any] = {}
    for name in MODELS:
        mine = [r for r in runs if r["model"] == name]
        if not mine:
            continue
        n_layers, n_epochs = len(mine[0]["history"][0]["sigma"]), len(mine[0]["history"])
        per_layer = []
        for layer in range(n_layers):
            per_epoch = []
            for e in range(n_epochs):
                stats = [layer_stats(r["history"][e]["sigma"][layer], r["history"][e]["bias_norm"][layer])
                         for r in mine]
                per_epoch.append({k: mean_se([s[k] for s in stats]) for k, _, _ in STATS})
            per_layer.append(per_epoch)
        out[name] = {"layers": per_layer, "test_accuracy": mean_se([r["test_accuracy"] for r in mine]),
                     "train_loss": mean_se([r["train_loss"] for r in mine])}
    return out


def fmt(pair: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    mean, se = pair
    if math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def layer_names(sizes: Sequence[int]) -> List[str]:
    return [f"layer {i} ({sizes[i]}→{sizes[i + 1]})" for i in range(len(sizes) - 1)]


def markdown(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    sizes = meta["sizes"]
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training / {meta['test_size']} test images, "
             f"sizes {sizes}, {meta['epochs']} epochs, seeds {meta['seeds']}; statistics of each layer's weight "
             f"matrix after the last epoch, mean ± standard error over seeds (σ: singular values; effective rank "
             f"exp(entropy(σ/Σσ)); epoch 0: every σ = 1, bias norm 0).", "",
             "| model | layer | " + " | ".join(label for _, label, _ in STATS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in STATS) + " |"]
    for name in MODELS:
        if name not in summary:
            continue
        for layer, label in enumerate(layer_names(sizes)):
            last = summary[name]["layers"][layer][-1]
            n = min(sizes[layer], sizes[layer + 1])
            cells = [fmt(last[k], d) + (f" / {n}" if k in ("below", "eff_rank") else "") for k, _, d in STATS]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| model | test accuracy (%) | final train loss |", "| --- | --- | --- |"]
    for name in MODELS:
        if name in summary:
            lines.append(f"| {name} | {fmt(summary[name]['test_accuracy'], 2, 100)} | "
                         f"{fmt(summary[name]['train_loss'], 4)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures
def _kde(values: Sequence[float], grid: Tensor, bandwidth: float) -> Tensor:
    v = torch.tensor(values, dtype=torch.float64)[:, None]
    return torch.exp(-0.5 * ((grid[None, :] - v) / bandwidth) ** 2).sum(0)


def plot(runs: List[Dict[str, Any]], summary: Dict[str, Any], meta: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, names = meta["sizes"], layer_names(meta["sizes"])
    n_layers = len(names)
    seed0 = {r["model"]: r for r in runs if r["seed"] == min(meta["seeds"])}
    models = [m for m in MODELS if m in seed0]
    n_epochs = len(seed0[models[0]]["history"])
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(n_layers, len(models), figsize=(5.2 * len(models), 0.45 * n_epochs * n_layers + 1.5),
                             squeeze=False, sharey="row")
    for layer in range(n_layers):
        every = [s for m in models for h in seed0[m]["history"] for s in h["sigma"][layer]]
        lo, hi = 0.0, max(every) * 1.05
        grid = torch.linspace(lo, hi, 600, dtype=torch.float64)
        bandwidth = (hi - lo) / 150
        for col, name in enumerate(models):
            ax = axes[layer][col]
            for e, h in enumerate(seed0[name]["history"]):
                dens = _kde(h["sigma"][layer], grid, bandwidth)
                dens = 0.9 * dens / dens.max()
                base = n_epochs - 1 - e  # epoch 0 at the top
                c = cmap(e / max(1, n_epochs - 1))
                ax.fill_between(grid.numpy(), base, base + dens.numpy(), color=c, alpha=0.55, linewidth=0)
                ax.plot(grid.numpy(), base + dens.numpy(), color="k", linewidth=0.5)
            ax.axvline(THRESHOLD, color="crimson", linestyle="--", linewidth=0.9)
            ax.set_yticks([n_epochs - 1 - e for e in range(n_epochs)])
            ax.set_yticklabels([str(e) if e % max(1, n_epochs // 10) == 0 or e == n_epochs - 1 else ""
                                for e in range(n_epochs)], fontsize=7)
            ax.set_xlim(lo, hi)
            ax.set_title(f"{name}: {names[layer]}", fontsize=9)
            if col == 0:
                ax.set_ylabel("epoch (0 = init, top)")
            if layer == n_layers - 1:
                ax.set_xlabel("singular value σ of the weight")
    fig.suptitle(f"{meta['dataset']}: singular values per epoch (seed {min(meta['seeds'])}; each ridge a density "
                 f"scaled to its own peak; dashed: σ = {THRESHOLD})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    ridge = out / "spectrum_ridgeline.png"
    fig.savefig(ridge, dpi=110)
    plt.close(fig)

    fig, grid_axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = list(grid_axes.flat)
    epochs = list(range(n_epochs))
    styles = {"isotropic": "-", "tanh": "--"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, _) in zip(axes, STATS):
        for name in models:
            for layer in range(n_layers):
                pts = summary[name]["layers"][layer]
                m = [p[key][0] for p in pts]
                se = [0.0 if math.isnan(p[key][1]) else p[key][1] for p in pts]
                ax.plot(epochs, m, styles[name], color=colours[layer % len(colours)], marker=".",
                        label=f"{name} layer {layer}")
                ax.fill_between(epochs, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                                color=colours[layer % len(colours)], alpha=0.15)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(STATS):]:
        ax.axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.suptitle(f"{meta['dataset']} {sizes}: per-layer statistics, mean ± s.e. over {len(meta['seeds'])} seeds "
                 "(solid: isotropic, dashed: tanh)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    stats = out / "spectrum_stats.png"
    fig.savefig(stats, dpi=110)
    plt.close(fig)
    return [ridge, stats]


# ---------------------------------------------------------------------------- main
def add_common(parser: argparse.ArgumentParser, epochs: int, subset: int) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data", default=None, help="data directory (default: the datamodule's; Fashion-MNIST: "
                        "/usr/share/datasets/fashion-mnist when present)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. n-1)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {epochs}, or 30 with --full")
    parser.add_argument("--full", action="store_true", help="paper scale: 30 epochs, full training set")
    parser.add_argument("--train-subset", type=int, default=subset,
                        help=f"train on the first N training images (default {subset}; --full: all)")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: in-process)")


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace, epochs: int) -> argparse.Namespace:
    if args.epochs is None:
        args.epochs = 30 if args.full else epochs
    if args.full:
        args.train_subset = None
    if args.seeds < 1 or args.epochs < 1:
        parser.error("seeds and epochs must be positive")
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, epochs=10, subset=20_000)
    parser.add_argument("--width", type=int, default=64, help="hidden width")
    parser.add_argument("--depth", type=int, default=2, help="number of hidden layers")
    parser.add_argument("--out", default="build/spectrum", help="output directory")
    args = parser.parse_args(argv)
    if args.width < 1 or args.depth < 1:
        parser.error("width and depth must be positive")
    return finish_args(parser, args, epochs=10)


def environment(script: str, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    return {"command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
            "nproc": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(name, seed) for seed in range(args.seeds) for name in MODELS]
    print(f"{args.dataset}: {len(tasks)} runs, width {args.width}, depth {args.depth}, {args.epochs} epochs, "
          f"{args.workers} worker(s)", flush=True)

    def report(run: Dict[str, Any], i: int, n: int) -> None:
        print(f"[{i}/{n}] seed {run['seed']} {run['model']}: test {100 * run['test_accuracy']:.2f} %, "
              f"train loss {run['train_loss']:.4f}, {run['seconds']:.1f} s", flush=True)

    runs = run_tasks(tasks, train_run, args, report)
    wall = time.perf_counter() - started
    first = runs[0]
    meta = {"dataset": args.dataset, "epochs": args.epochs, "seeds": list(range(args.seeds)), "sizes": first["sizes"],
            "train_size": None, "test_size": None, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "optimizer": "AdamW", "init": "orthogonal",
            "isotropic": {"psi": "decay", "length": "trainable"}, "threshold": THRESHOLD,
            "wall_seconds": wall, "workers": args.workers, **environment("examples/spectrum_evolution.py", argv)}
    meta["train_size"], meta["test_size"] = train_test_sizes(args)
    summary = summarise(runs)
    result = {"meta": meta, "summary": summary, "runs": runs}
    (out / "spectrum.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, meta)
    (out / "spectrum.md").write_text(table + "\n")
    pngs = plot(runs, summary, meta, out)
    print(table)
    print(f"wall time {wall:.1f} s ({args.workers} worker(s), nproc {meta['nproc']}, torch {meta['torch']}); wrote "
          f"{out / 'spectrum.json'}, {out / 'spectrum.md'}, " + ", ".join(str(p) for p in pngs))
    return result


def train_test_sizes(args: argparse.Namespace) -> Tuple[int, int]:
    data, _ = prepare(args.dataset, args.data, args.train_subset)
    return data[0].shape[0], data[2].shape[0]


if __name__ == "__main__":
    main()
