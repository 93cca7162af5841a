"""Grouped isotropy: how expressive are block-isotropic layers, and does a grouped net still adapt?

A fully isotropic layer multiplies its whole vector by one per-sample scalar; grouped isotropy gives
every group of ``k`` neurons its own norm, ``o`` and psi column (``k = 1`` is an elementwise network,
one group the fully isotropic one). This script trains, on identical initial weights and an
identical data order per seed:

* a linear classifier (softmax regression);
* an MLP ``[in, W, W, classes]`` with elementwise ``nn.Tanh``;
* the isotropic MLP with group size ``k`` for every ``k`` in ``--group-sizes`` and fully isotropic
  (one group), for every width ``W`` in ``--widths``;
* a grouped network (``--dynamic-group-size`` at the smallest width) whose hidden layers follow
  the paper's scaffold rule after every epoch (``ScaffoldPolicy(threshold=0.95, scaffold=5)``),
  against the same network kept static.

Setting (the paper's): AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal initialisation, zero
biases; the isotropic nets use ``psi="decay"`` (psi starts at zero, L2 pull 0.1) and a trainable
intrinsic length ``o`` (from 1e-6); per-pixel standardisation from training statistics; no
augmentation. It writes ``grouped_isotropy.json`` (every run), ``grouped_isotropy.md`` (tables)
and the figures ``grouped_isotropy.png`` and ``grouped_dynamic.png`` to ``--out``.

    python examples/grouped_isotropy.py                  # 5 epochs, 3 seeds: minutes on 2 cores
    python examples/grouped_isotropy.py --full           # 30 epochs (paper scale)
    python examples/grouped_isotropy.py --dataset cifar10 --root data   # torchvision download
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

from iso_lightning import IsotropicMLP, PolicyContext, ScaffoldPolicy, apply_decision, describe
from iso_lightning.data import load_idx_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import data_order, mean_se  # noqa: E402

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
FULL = "iso-full"
DYNAMIC = "dynamic"

Data = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------- data
def load_data(dataset: str, data_dir: Optional[str] = None, root: str = "data") -> Tuple[Data, int]:
    """``(x_train, y_train, x_test, y_test)`` as float ``(N, features)`` in [0, 1] and int64 labels."""
    if dataset == "fashion-mnist" or (dataset == "mnist" and data_dir is not None):
        x_train, y_train = load_idx_dataset(data_dir, train=True)
        x_test, y_test = load_idx_dataset(data_dir, train=False)
        classes = 10
    elif dataset == "mnist":
        from torchvision import datasets

        train, test = (datasets.MNIST(root, train=t, download=True) for t in (True, False))
        x_train, y_train, x_test, y_test = train.data, train.targets, test.data, test.targets
        classes = 10
    elif dataset in ("cifar10", "cifar100"):
        from torchvision import datasets

        cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        train, test = (cls(root, train=t, download=True) for t in (True, False))
        x_train, x_test = torch.from_numpy(train.data), torch.from_numpy(test.data)  # (N, 32, 32, 3) uint8
        y_train, y_test = torch.tensor(train.targets), torch.tensor(test.targets)
        classes = 10 if dataset == "cifar10" else 100
    else:
        raise ValueError(f"Expected `dataset` to be one of {list(DATASETS)}, but got {dataset!r}.")
    x_train = x_train.flatten(1).float() / 255.0
    x_test = x_test.flatten(1).float() / 255.0
    return (x_train, y_train.long(), x_test, y_test.long()), classes


def standardise(x_train: Tensor, x_test: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-pixel standardisation with the training set's mean and standard deviation.

    The deviation is floored at one grey level (1/255): a pixel that is (almost) constant in the
    training images would otherwise turn a test image's faint stroke there into a huge input.
    """
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1.0 / 255.0)
    return (x_train - mean) / std, (x_test - mean) / std


def prepare(args: argparse.Namespace) -> Tuple[Data, int]:
    (x_train, y_train, x_test, y_test), classes = load_data(args.dataset, args.data, args.root)
    if args.train_subset is not None:
        x_train, y_train = x_train[: args.train_subset], y_train[: args.train_subset]
    x_train, x_test = standardise(x_train, x_test)
    return (x_train.contiguous(), y_train, x_test.contiguous(), y_test), classes


# ---------------------------------------------------------------------------- models
def reference_init(sizes: Sequence[int], seed: int) -> IsotropicMLP:
    """The initial weights of every model of this width and seed (orthogonal, zero biases)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + sizes[1])
    return IsotropicMLP(list(sizes), init="orthogonal", generator=g)


def linear_layers(model: nn.Module) -> List[nn.Module]:
    if isinstance(model, IsotropicMLP):
        return list(model.layers)
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def copy_init(src: IsotropicMLP, dst: nn.Module) -> nn.Module:
    """Copy the weights and biases of ``src`` into ``dst`` (same sizes); psi and ``o`` keep their init."""
    with torch.no_grad():
        pairs = list(zip(linear_layers(src), linear_layers(dst)))
        if len(pairs) != len(linear_layers(src)) or len(pairs) != len(linear_layers(dst)):
            raise ValueError("Expected two networks with the same affine layers.")
        for a, b in pairs:
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return dst


def build_model(spec: Dict[str, Any], sizes: Sequence[int], seed: int, length: str = "trainable",
                psi: str = "decay") -> nn.Module:
    """The model of ``spec`` (``model``: linear / tanh / iso-full / iso-g<k> / dynamic) with the shared init."""
    name = spec["model"]
    if name == "linear":
        g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
        lin = nn.Linear(sizes[0], sizes[-1])
        with torch.no_grad():
            nn.init.orthogonal_(lin.weight, generator=g)
            lin.bias.zero_()
        return lin
    reference = reference_init(sizes, seed)
    if name == "tanh":
        layers: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        return copy_init(reference, nn.Sequential(*layers))
    net = IsotropicMLP(list(sizes), psi=psi, length=length, group_size=spec["group_size"])
    return copy_init(reference, net)


def model_specs(widths: Sequence[int], group_sizes: Sequence[int], dynamic_group_size: int) -> List[Dict[str, Any]]:
    """Every distinct run of one seed. A group size >= the width is the fully isotropic net: not re-run."""
    specs: List[Dict[str, Any]] = [{"width": None, "model": "linear", "group_size": None}]
    for width in widths:
        specs.append({"width": width, "model": "tanh", "group_size": None})
        for k in group_sizes:
            if k < width:
                specs.append({"width": width, "model": f"iso-g{k}", "group_size": k})
        specs.append({"width": width, "model": FULL, "group_size": None})
    width = min(widths)
    if dynamic_group_size >= width:
        raise ValueError(f"Expected --dynamic-group-size below the smallest width {width}, got {dynamic_group_size}.")
    if dynamic_group_size not in group_sizes:  # its static twin is otherwise part of the grid already
        specs.append({"width": width, "model": f"iso-g{dynamic_group_size}", "group_size": dynamic_group_size})
    specs.append({"width": width, "model": DYNAMIC, "group_size": dynamic_group_size})
    return specs


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


def train_run(spec: Dict[str, Any], seed: int, data: Data, classes: int, args: argparse.Namespace) -> Dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    width = spec["width"]
    sizes = [x_train.shape[1], classes] if width is None else [x_train.shape[1], width, width, classes]
    model = build_model(spec, sizes, seed)
    iso = isinstance(model, IsotropicMLP)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    policy = ScaffoldPolicy(threshold=args.threshold, scaffold=args.scaffold) if spec["model"] == DYNAMIC else None
    growth = torch.Generator().manual_seed(seed)
    history: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for epoch, order in enumerate(data_order(seed, x_train.shape[0], args.epochs)):
        total = 0.0
        for i in range(0, order.numel(), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            if iso:
                loss = loss + model.regularisation()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        record: Dict[str, Any] = {"epoch": epoch, "running_loss": total / order.numel()}
        if policy is not None:
            decision = policy.decide(describe(model), PolicyContext(epoch=epoch))
            reports = apply_decision(model, decision, optimizer=opt, generator=growth)
            record["changes"] = [f"{r.space} {r.op} {r.old_width}->{r.new_width}" for r in reports]
        record["test_accuracy"] = evaluate(model, x_test, y_test)[1]
        if iso:
            record["widths"] = model.hidden_widths
        history.append(record)
    seconds = time.perf_counter() - start
    train_loss, train_accuracy = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    result = dict(spec, seed=seed, test_accuracy=test_accuracy, test_loss=test_loss, train_loss=train_loss,
                  train_accuracy=train_accuracy, seconds=seconds, history=history,
                  parameters=sum(p.numel() for p in model.parameters()))
    if iso:
        result["widths"] = model.hidden_widths
        result["groups"] = [model.activation(i).groups for i in range(model.num_hidden)]
        result["length_mode"], result["psi_mode"] = model.activation(0).length_mode, model.psi_mode
    return result


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["classes"] = prepare(args)
    _WORKER["args"] = args


def _worker_run(task: Tuple[Dict[str, Any], int]) -> Dict[str, Any]:
    spec, seed = task
    return train_run(spec, seed, _WORKER["data"], _WORKER["classes"], _WORKER["args"])


# ---------------------------------------------------------------------------- summaries
def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and standard error over seeds per (width, model); paired differences to tanh and full."""
    by_key: Dict[Tuple[Any, str], Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["width"], run["model"]), {})[run["seed"]] = run
    out = []
    for (width, model), seeds in by_key.items():
        entry: Dict[str, Any] = {"width": width, "model": model, "group_size": next(iter(seeds.values()))["group_size"],
                                 "seeds": len(seeds)}
        for metric in ("test_accuracy", "train_loss", "train_accuracy"):
            entry[metric] = mean_se([r[metric] for r in seeds.values()])
        for ref in ("tanh", FULL):
            other = by_key.get((width, ref))
            if other is not None and model != ref:
                common = sorted(set(seeds) & set(other))
                entry[f"delta_vs_{ref}"] = mean_se([seeds[s]["test_accuracy"] - other[s]["test_accuracy"]
                                                    for s in common])
        out.append(entry)
    return out


def fmt(pair: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = pair
    if math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def markdown(summary: List[Dict[str, Any]], runs: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    get = {(s["width"], s["model"]): s for s in summary}
    widths, group_sizes, dyn = meta["widths"], meta["group_sizes"], meta["dynamic_group_size"]
    lines = [f"Dataset {meta['dataset']}, {meta['train_size']} training / {meta['test_size']} test images, "
             f"{meta['epochs']} epochs, seeds {meta['seeds']}; mean ± standard error over seeds. Accuracy in %; "
             "Δ is the paired difference (same seed: same initial weights and data order).", ""]
    lin = get[(None, "linear")]
    lines += ["| model | test accuracy (%) | final train loss |", "| --- | --- | --- |",
              f"| linear classifier | {fmt(lin['test_accuracy'])} | {fmt(lin['train_loss'], 1, 4)} |", ""]
    for width in widths:
        lines += [f"**Width {width}** (`[in, {width}, {width}, classes]`)", "",
                  "| model | group size | groups per layer | test accuracy (%) | Δ vs elementwise tanh | "
                  "Δ vs fully isotropic | final train loss | final train accuracy (%) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        rows: List[Tuple[str, str, str, Optional[Dict[str, Any]]]] = [
            ("elementwise `nn.Tanh`", "–", str(width), get.get((width, "tanh")))]
        for k in group_sizes:
            if k < width:
                rows.append((f"grouped isotropic, k = {k}", str(k), str(math.ceil(width / k)),
                             get.get((width, f"iso-g{k}"))))
            else:
                rows.append((f"grouped isotropic, k = {k}", str(k), "1", None))
        rows.append(("fully isotropic (one group)", str(width), "1", get.get((width, FULL))))
        for label, k, groups, s in rows:
            if s is None:
                lines.append(f"| {label} | {k} | {groups} | = fully isotropic (k ≥ width, not re-run) | | | | |")
                continue
            dt = fmt(s["delta_vs_tanh"]) if "delta_vs_tanh" in s else "–"
            df = fmt(s[f"delta_vs_{FULL}"]) if f"delta_vs_{FULL}" in s else "–"
            lines.append(f"| {label} | {k} | {groups} | {fmt(s['test_accuracy'])} | {dt} | {df} | "
                         f"{fmt(s['train_loss'], 1, 4)} | {fmt(s['train_accuracy'])} |")
        lines.append("")
    width = min(widths)
    static, dynamic = get[(width, f"iso-g{dyn}")], get[(width, DYNAMIC)]
    finals = sorted((r["seed"], r["widths"], r["parameters"]) for r in runs if r["model"] == DYNAMIC)
    static_params = next(r["parameters"] for r in runs if r["model"] == f"iso-g{dyn}" and r["width"] == width)
    paired = mean_se([d["test_accuracy"] - s["test_accuracy"] for d in runs if d["model"] == DYNAMIC
                      for s in runs if s["model"] == f"iso-g{dyn}" and s["width"] == width and s["seed"] == d["seed"]])
    lines += [f"**Dynamic topology** (group size {dyn}, start width {width}; `ScaffoldPolicy(threshold="
              f"{meta['threshold']}, scaffold={meta['scaffold']})` after every epoch; new neurons join the "
              "smallest group, shrinking removes the weakest directions across groups)", "",
              "| model | test accuracy (%) | final train loss | final hidden widths (per seed) | parameters |",
              "| --- | --- | --- | --- | --- |",
              f"| static | {fmt(static['test_accuracy'])} | {fmt(static['train_loss'], 1, 4)} | "
              f"{[width, width]} | {static_params} |",
              f"| dynamic | {fmt(dynamic['test_accuracy'])} | {fmt(dynamic['train_loss'], 1, 4)} | "
              f"{'; '.join(str(w) for _, w, _ in finals)} | {'; '.join(str(p) for _, _, p in finals)} |", "",
              f"Dynamic − static test accuracy (paired): {fmt(paired)} percentage points.", ""]
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], runs: List[Dict[str, Any]], meta: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get = {(s["width"], s["model"]): s for s in summary}
    widths = meta["widths"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric, scale, label in ((axes[0], "test_accuracy", 100.0, "final test accuracy (%)"),
                                     (axes[1], "train_loss", 1.0, "final train loss (cross-entropy)")):
        for i, width in enumerate(widths):
            c = colours[i % len(colours)]
            ks = [k for k in meta["group_sizes"] if k < width]
            pts = [get[(width, f"iso-g{k}")][metric] for k in ks]
            ax.errorbar(ks, [m * scale for m, _ in pts], yerr=[0 if math.isnan(e) else e * scale for _, e in pts],
                        color=c, marker="o", capsize=3, label=f"grouped isotropic, W={width}")
            full = get[(width, FULL)][metric]
            ax.errorbar([width], [full[0] * scale], yerr=[0 if math.isnan(full[1]) else full[1] * scale], color=c,
                        marker="*", markersize=13, capsize=3, linestyle="none",
                        label=f"fully isotropic (k = W = {width})")
            if ks:
                ax.plot([ks[-1], width], [pts[-1][0] * scale, full[0] * scale], color=c, linestyle=":")
            tanh = get[(width, "tanh")][metric]
            ax.axhline(tanh[0] * scale, color=c, linestyle="--", linewidth=1.2, label=f"elementwise tanh, W={width}")
            if not math.isnan(tanh[1]):
                ax.axhspan((tanh[0] - tanh[1]) * scale, (tanh[0] + tanh[1]) * scale, color=c, alpha=0.12)
        lin = get[(None, "linear")][metric]
        ax.axhline(lin[0] * scale, color="0.35", linestyle="-.", linewidth=1.2, label="linear classifier")
        ax.set_xscale("log", base=2)
        ticks = sorted({k for k in meta["group_sizes"]} | set(widths))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("group size k (neurons per isotropic group; log2 scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Test accuracy vs group size")
    axes[1].set_title("Training loss vs group size (lower = more expressive)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.suptitle(f"{meta['dataset']}: [in, W, W, classes], {meta['epochs']} epochs, "
                 f"{len(meta['seeds'])} seeds (mean ± s.e.)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    main_png = out / "grouped_isotropy.png"
    fig.savefig(main_png, dpi=130)
    plt.close(fig)

    dyn, width = meta["dynamic_group_size"], min(widths)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in sorted((r for r in runs if r["model"] in (DYNAMIC, f"iso-g{dyn}") and r["width"] == width),
                      key=lambda r: (r["model"], r["seed"])):
        c = colours[run["seed"] % len(colours)]
        epochs = [h["epoch"] + 1 for h in run["history"]]
        style = "-" if run["model"] == DYNAMIC else "--"
        axes[0].plot(epochs, [100 * h["test_accuracy"] for h in run["history"]], style, color=c, marker=".",
                     label=f"seed {run['seed']} {'dynamic' if run['model'] == DYNAMIC else 'static'}")
        if run["model"] == DYNAMIC:
            for layer, marker in ((0, "o"), (1, "s")):
                axes[1].plot([0] + epochs, [width] + [h["widths"][layer] for h in run["history"]], color=c,
                             marker=marker, label=f"seed {run['seed']} hidden.{layer}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("Dynamic (solid) vs static (dashed)")
    axes[1].set_xlabel("epoch (width after the decision)")
    axes[1].set_ylabel("hidden width")
    axes[1].set_title(f"Widths under ScaffoldPolicy (k = {dyn})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    dyn_png = out / "grouped_dynamic.png"
    fig.savefig(dyn_png, dpi=120)
    plt.close(fig)
    return [main_png, dyn_png]


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data", default=None, help="directory of IDX files (fashion-mnist: default Debian's "
                        "location; mnist: read from here instead of downloading)")
    parser.add_argument("--root", default="data", help="torchvision download directory (mnist, cifar10, cifar100)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. n-1)")
    parser.add_argument("--epochs", type=int, default=None, help="default 5, or 30 with --full")
    parser.add_argument("--full", action="store_true", help="paper-scale setting: 30 epochs, full training set")
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--dynamic-group-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--scaffold", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: in-process)")
    parser.add_argument("--out", default="build/grouped_isotropy", help="output directory")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="do not train: rewrite the table and figures of a grouped_isotropy.json into --out")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 30 if args.full else 5
    if args.full:
        args.train_subset = None
    if min(args.widths) < 1 or min(args.group_sizes) < 1 or args.seeds < 1 or args.epochs < 1:
        parser.error("widths, group sizes, seeds and epochs must be positive")
    args.widths, args.group_sizes = sorted(set(args.widths)), sorted(set(args.group_sizes))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        result = json.loads(Path(args.from_json).read_text())
        return write_outputs(result, out)
    started = time.perf_counter()
    data, classes = prepare(args)
    specs = model_specs(args.widths, args.group_sizes, args.dynamic_group_size)
    tasks = [(spec, seed) for seed in range(args.seeds) for spec in specs]
    print(f"{args.dataset}: {data[0].shape[0]} train / {data[2].shape[0]} test, {data[0].shape[1]} features, "
          f"{len(tasks)} runs ({len(specs)} per seed), {args.epochs} epochs, {args.workers} worker(s)", flush=True)
    runs: List[Dict[str, Any]] = []

    def report(run: Dict[str, Any]) -> None:
        runs.append(run)
        extra = f", widths {run['widths']}" if run["model"] == DYNAMIC else ""
        print(f"[{len(runs)}/{len(tasks)}] seed {run['seed']} width {run['width']} {run['model']}: "
              f"test {100 * run['test_accuracy']:.2f} %, train loss {run['train_loss']:.4f}, "
              f"{run['seconds']:.1f} s{extra}", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for run in pool.map(_worker_run, tasks):
                report(run)
    else:
        for spec, seed in tasks:
            report(train_run(spec, seed, data, classes, args))
    wall = time.perf_counter() - started
    meta = {"dataset": args.dataset, "epochs": args.epochs, "seeds": list(range(args.seeds)),
            "widths": args.widths, "group_sizes": args.group_sizes, "dynamic_group_size": args.dynamic_group_size,
            "threshold": args.threshold, "scaffold": args.scaffold, "train_size": data[0].shape[0],
            "test_size": data[2].shape[0], "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "optimizer": "AdamW", "init": "orthogonal",
            "isotropic": {"psi": "decay", "psi_decay": 0.1, "length": "trainable", "length_init": 1e-6},
            "command": " ".join(["python", "examples/grouped_isotropy.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "workers": args.workers, "nproc": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "duplicates": {f"{w}/iso-g{k}": FULL for w in args.widths for k in args.group_sizes if k >= w}}
    return write_outputs({"meta": meta, "summary": summarise(runs), "runs": runs}, out)


def write_outputs(result: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """Write the JSON (every run), the markdown tables and the figures of ``result`` into ``out``."""
    meta, runs = result["meta"], result["runs"]
    summary = summarise(runs)  # recomputed from the runs, also for a JSON read back with --from-json
    result = {"meta": meta, "summary": summary, "runs": runs}
    (out / "grouped_isotropy.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, runs, meta)
    (out / "grouped_isotropy.md").write_text(table + "\n")
    pngs = plot(summary, runs, meta, out)
    print(table)
    print(f"wall time {meta['wall_seconds']:.1f} s ({meta['workers']} worker(s), nproc {meta['nproc']}, torch "
          f"{meta['torch']}); wrote {out / 'grouped_isotropy.json'}, {out / 'grouped_isotropy.md'}, "
          + ", ".join(str(p) for p in pngs))
    return result


if __name__ == "__main__":
    main()
