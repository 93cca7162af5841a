"""Scheduled tasks: tasks switch on and off during training; the network's inputs and outputs follow.

The paper's scheduled-tasks experiment. Every task is a classification problem with its own output
neurons (its own softmax head) and its own task-indicator input neuron; all tasks share the image
input and the hidden layers ``[in, W, W, out]``. Over the epochs a schedule switches tasks on and off:

* a task switching **on** adds one indicator input (``add_inputs``, zero weights: the function is
  unchanged) and its class outputs (``add_outputs``, small random weights);
* a task switching **off** removes its indicator input (``remove_inputs``) and its outputs
  (``remove_outputs``); the other outputs are unchanged.

Every surgery remaps the AdamW state, so training goes on with the same optimizer. Two arms per
seed, with identical initial weights, identical data order and the identical schedule:

* ``dynamic``: the hidden widths follow the paper's scaffold rule after every epoch
  (``ScaffoldPolicy(threshold=0.95, scaffold=5)`` through ``describe`` / ``apply_decision``);
* ``static``: the hidden widths stay at ``W`` (only the inputs and outputs change).

Tasks are given with ``--tasks NAME=SOURCE[:CLASSES]``: SOURCE is ``fashion-mnist`` (Debian's
``dataset-fashion-mnist``, or ``--source fashion-mnist=DIR``), ``mnist`` (``--root`` or
``--root/MNIST/raw``, torchvision's layout) or any directory of MNIST-format IDX files (EMNIST
letters, say); CLASSES is ``0-4`` or ``1,3,5`` (default: every class), relabelled ``0..k-1``
within the task. The schedule is ``--schedule NAME:ON-OFF ...`` (epochs; the task trains in epochs
ON .. OFF-1; ``NAME:ON-`` stays on to the end). Default: Fashion-MNIST split into three tasks,
A = classes 0-3, B = 4-6, C = 7-9, staggered over 12 epochs: A on in epochs 0-5, B in 3-8, C in
6-11 (so A switches off and C on at epoch 6).

Setting: AdamW lr 1e-3, weight decay 1e-3, batch 48, orthogonal initialisation, zero biases,
``psi="decay"``, trainable ``o``; per-pixel standardisation with training statistics. Per epoch
the training samples of every active task are shuffled together (a permutation from the seed); the
loss of a sample is the cross-entropy over its own task's outputs. Test accuracy of a task is the
argmax over its own outputs, on that task's test images (with its indicator set). Writes
``scheduled_tasks.json``, ``scheduled_tasks.md`` and ``scheduled_tasks.png`` into ``--out``.

    python examples/scheduled_tasks.py               # 12 epochs, <= 15000 images per task, 5 seeds: ~2 min
    python examples/scheduled_tasks.py --full        # 30 epochs, full training sets, 5 seeds
    python examples/scheduled_tasks.py --dataset mnist --root data   # MNIST split the same way
    python examples/scheduled_tasks.py --tasks F=fashion-mnist M=mnist --root data --schedule F:0-20 M:10-
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
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from iso_lightning import IsotropicMLP, PolicyContext, ScaffoldPolicy, apply_decision, describe
from iso_lightning.data import DEFAULT_FASHION_MNIST, find_idx_dataset, load_idx_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import mean_se  # noqa: E402

ARMS = ("dynamic", "static")
DEFAULT_TASKS = ["A=fashion-mnist:0-3", "B=fashion-mnist:4-6", "C=fashion-mnist:7-9"]


# ---------------------------------------------------------------------------- tasks and schedule
@dataclass
class TaskSpec:
    name: str
    source: str
    classes: Optional[List[int]]  # None: every class of the source
    label: str = "all"  # the classes as written


def parse_classes(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"Expected distinct class labels like `0-4` or `1,3,5`, but got {text!r}.")
    return out


def parse_task(text: str) -> TaskSpec:
    if "=" not in text:
        raise ValueError(f"Expected a task `NAME=SOURCE[:CLASSES]`, but got {text!r}.")
    name, rest = text.split("=", 1)
    source, classes = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and tail and all(c.isdigit() or c in ",-" for c in tail):
        source, classes = head, parse_classes(tail)
    if not name or not source:
        raise ValueError(f"Expected a task `NAME=SOURCE[:CLASSES]`, but got {text!r}.")
    return TaskSpec(name, source, classes, "all" if classes is None else tail)


def parse_schedule(items: Optional[Sequence[str]], names: Sequence[str], epochs: int) -> Dict[str, Tuple[int, int]]:
    """``{task: (on, off)}``: the task trains in epochs ``on .. off - 1``.

    Default (no ``items``): with ``n`` tasks, task ``i`` is on in ``[i E/(n+1), (i+2) E/(n+1))``,
    the first from epoch 0 and the last to the end: staggered, each overlapping the next.
    """
    n = len(names)
    if not items:
        cut = [round(i * epochs / (n + 1)) for i in range(n + 2)]
        sched = {name: (cut[i], cut[i + 2]) for i, name in enumerate(names)}
        sched[names[-1]] = (sched[names[-1]][0], epochs)
        if n == 1:
            sched[names[0]] = (0, epochs)
    else:
        sched = {}
        for item in items:
            name, _, span = item.partition(":")
            lo, sep, hi = span.partition("-")
            if name not in names or not sep or name in sched:
                raise ValueError(f"Expected `NAME:ON-OFF` (or `NAME:ON-`) for each task {list(names)}, got {item!r}.")
            sched[name] = (int(lo or 0), int(hi) if hi else epochs)
        missing = [t for t in names if t not in sched]
        if missing:
            raise ValueError(f"Expected a schedule entry for every task, missing {missing}.")
    for name, (on, off) in sched.items():
        if not 0 <= on < off <= epochs:
            raise ValueError(f"Task {name}: expected 0 <= ON < OFF <= epochs ({epochs}), got {on}-{off}.")
    for epoch in range(epochs):
        if not any(on <= epoch < off for on, off in sched.values()):
            raise ValueError(f"No task is on in epoch {epoch}: the schedule must keep one on throughout.")
    return sched


def active_at(schedule: Dict[str, Tuple[int, int]], epoch: int) -> List[str]:
    return [t for t, (on, off) in schedule.items() if on <= epoch < off]


# ---------------------------------------------------------------------------- data
TaskData = Dict[str, Any]  # x_train, y_train, x_test, y_test, classes


def source_dir(source: str, sources: Dict[str, str], root: str) -> Path:
    if source in sources:
        return Path(sources[source])
    if source == "fashion-mnist":
        return DEFAULT_FASHION_MNIST
    if source == "mnist":
        found = find_idx_dataset(root, ("", "MNIST/raw"))
        if found is None:
            raise FileNotFoundError(f"MNIST IDX files not found under {root} (or {root}/MNIST/raw); pass --root or "
                                    "--source mnist=DIR, or download them with torchvision.datasets.MNIST(root, "
                                    "download=True) on a machine with internet access.")
        return found
    return Path(source)


def load_tasks(args: argparse.Namespace) -> Dict[str, TaskData]:
    """Every task's standardised train/test images ``(N, 784)`` and labels relabelled ``0..k-1``."""
    cache: Dict[Path, Tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    raw: Dict[str, List[Tensor]] = {}
    for spec in args.task_specs:
        path = source_dir(spec.source, args.sources, args.root)
        if path not in cache:
            cache[path] = (*load_idx_dataset(path, train=True), *load_idx_dataset(path, train=False))
        xtr, ytr, xte, yte = cache[path]
        classes = spec.classes if spec.classes is not None else sorted(int(c) for c in ytr.unique())
        lookup = torch.full((int(max(ytr.max(), yte.max(), max(classes))) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        mtr, mte = lookup[ytr] >= 0, lookup[yte] >= 0
        x_train, y_train = xtr[mtr].flatten(1).float() / 255.0, lookup[ytr[mtr]]
        if args.train_subset is not None:
            x_train, y_train = x_train[: args.train_subset], y_train[: args.train_subset]
        x_test, y_test = xte[mte].flatten(1).float() / 255.0, lookup[yte[mte]]
        if args.test_subset is not None:
            x_test, y_test = x_test[: args.test_subset], y_test[: args.test_subset]
        if x_train.shape[1] != 784:
            raise ValueError(f"Task {spec.name}: expected 28x28 images, got {x_train.shape[1]} features.")
        raw[spec.name] = [x_train, y_train, x_test, y_test, len(classes)]
    # Per-pixel standardisation with the statistics of all tasks' training images together.
    all_train = torch.cat([v[0] for v in raw.values()])
    mean, std = all_train.mean(0), all_train.std(0).clamp_min(1.0 / 255.0)
    return {name: {"x_train": ((v[0] - mean) / std).contiguous(), "y_train": v[1],
                   "x_test": ((v[2] - mean) / std).contiguous(), "y_test": v[3], "classes": v[4]}
            for name, v in raw.items()}


def with_indicator(x: Tensor, position: int, n_active: int) -> Tensor:
    """Images followed by the one-hot task indicator (``n_active`` inputs, 1 at ``position``)."""
    ind = torch.zeros(x.shape[0], n_active)
    ind[:, position] = 1.0
    return torch.cat([x, ind], dim=1)


# ---------------------------------------------------------------------------- one run
def evaluate(model: nn.Module, x: Tensor, y: Tensor, head: slice, chunk: int = 10_000) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            correct += int((model(x[i : i + chunk])[:, head].argmax(1) == y[i : i + chunk]).sum())
    return correct / max(1, x.shape[0])


def heads(layout: Sequence[str], data: Dict[str, TaskData]) -> Dict[str, slice]:
    out, start = {}, 0
    for t in layout:
        out[t] = slice(start, start + data[t]["classes"])
        start += data[t]["classes"]
    return out


def train_run(arm: str, seed: int, data: Dict[str, TaskData], args: argparse.Namespace) -> Dict[str, Any]:
    schedule, epochs = args.schedule, args.epochs
    layout = active_at(schedule, 0)  # the tasks in the order of their indicator inputs and heads
    n_pixels = data[layout[0]]["x_train"].shape[1]
    sizes = [n_pixels + len(layout), args.width, args.width, sum(data[t]["classes"] for t in layout)]
    # Same generator seed for both arms: identical initial weights.
    model = IsotropicMLP(sizes, psi="decay", length="trainable", init="orthogonal",
                         generator=torch.Generator().manual_seed(1_000_003 * (seed + 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    policy = ScaffoldPolicy(threshold=args.threshold, scaffold=args.scaffold) if arm == "dynamic" else None
    order_gen = torch.Generator().manual_seed(seed)
    history: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        boundary: List[str] = []
        wanted = active_at(schedule, epoch)
        for t in [t for t in layout if t not in wanted]:  # switch off: indicator input and head
            pos, head = layout.index(t), heads(layout, data)[t]
            model.remove_inputs([n_pixels + pos], optimizer=opt)
            model.remove_outputs(list(range(head.start, head.stop)), optimizer=opt)
            layout.remove(t)
            boundary.append(f"{t} off: -1 input, -{data[t]['classes']} outputs")
        for t in [t for t in wanted if t not in layout]:  # switch on
            gen = torch.Generator().manual_seed(7919 * (seed + 1) + epoch)
            model.add_inputs(1, optimizer=opt)
            model.add_outputs(data[t]["classes"], optimizer=opt, generator=gen)
            layout.append(t)
            boundary.append(f"{t} on: +1 input, +{data[t]['classes']} outputs")
        hd = heads(layout, data)
        xs, ys, owner = [], [], []
        for pos, t in enumerate(layout):
            xs.append(with_indicator(data[t]["x_train"], pos, len(layout)))
            ys.append(data[t]["y_train"])
            owner.append(torch.full((ys[-1].numel(),), pos, dtype=torch.long))
        x_all, y_all, own_all = torch.cat(xs), torch.cat(ys), torch.cat(owner)
        offsets = torch.tensor([hd[t].start for t in layout])
        widths_k = torch.tensor([data[t]["classes"] for t in layout])
        total = 0.0
        perm = torch.randperm(y_all.numel(), generator=order_gen)
        for i in range(0, perm.numel(), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            out = model(x_all[idx])
            own = own_all[idx]
            # Cross-entropy over the sample's own head: mask every other output with -inf.
            cols = torch.arange(out.shape[1])
            mask = (cols >= offsets[own, None]) & (cols < (offsets + widths_k)[own, None])
            logits = out.masked_fill(~mask, float("-inf"))
            loss = nn.functional.cross_entropy(logits, y_all[idx] + offsets[own]) + model.regularisation()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        record: Dict[str, Any] = {"epoch": epoch, "running_loss": total / perm.numel(), "active": list(layout),
                                  "boundary": boundary}
        if policy is not None:
            decision = policy.decide(describe(model), PolicyContext(epoch=epoch))
            reports = apply_decision(model, decision, optimizer=opt, generator=torch.Generator().manual_seed(seed))
            record["changes"] = [f"{r.space} {r.op} {r.old_width}->{r.new_width}" for r in reports]
        record["test_accuracy"] = {t: evaluate(model, with_indicator(data[t]["x_test"], pos, len(layout)),
                                               data[t]["y_test"], hd[t]) for pos, t in enumerate(layout)}
        record["widths"] = model.hidden_widths
        record["in_features"], record["out_features"] = model.in_features, model.out_features
        record["parameters"] = sum(p.numel() for p in model.parameters())
        history.append(record)
    # A task's result: its test accuracy in its last active epoch (when it switched off, or at the end).
    final = {t: history[off - 1]["test_accuracy"][t] for t, (_, off) in schedule.items()}
    return {"arm": arm, "seed": seed, "history": history, "final_accuracy": final, "widths": model.hidden_widths,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}


_WORKER: Dict[str, Any] = {}


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER["data"], _WORKER["args"] = load_tasks(args), args


def _worker_run(job: Tuple[str, int]) -> Dict[str, Any]:
    return train_run(job[0], job[1], _WORKER["data"], _WORKER["args"])


# ---------------------------------------------------------------------------- summaries
def fmt(pair: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = pair
    return f"{mean * scale:.{digits}f}" if math.isnan(se) else f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def summarise(runs: List[Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: Dict[str, Any] = {"tasks": {}, "widths": {}}
    for t in meta["schedule"]:
        entry = {arm: mean_se([by[(arm, s)]["final_accuracy"][t] for s in seeds]) for arm in ARMS}
        entry["delta"] = mean_se([by[("dynamic", s)]["final_accuracy"][t] - by[("static", s)]["final_accuracy"][t]
                                  for s in seeds])
        out["tasks"][t] = entry
    for arm in ARMS:
        out["widths"][arm] = [by[(arm, s)]["widths"] for s in seeds]
        out[f"parameters_{arm}"] = [by[(arm, s)]["parameters"] for s in seeds]
    return out


def markdown(summary: Dict[str, Any], runs: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    sched = meta["schedule"]
    tasks = ", ".join(f"{t} = {meta['tasks'][t]}" for t in sched)
    spans = ", ".join(f"{t} on in epochs {on}-{off - 1}" for t, (on, off) in sched.items())
    counts = ", ".join(f"{t} {meta['train_sizes'][t]} / {meta['test_sizes'][t]}" for t in sched)
    lines = [f"Tasks {tasks}; schedule {spans} "
             f"({meta['epochs']} epochs); training / test images per task: {counts}; "
             f"start width {meta['width']} (`[784 + active tasks, {meta['width']}, {meta['width']}, active classes]`); "
             f"seeds {meta['seeds']}; mean ± standard error over seeds. Accuracy in % on each task's test images, "
             "taken in the task's last active epoch; Δ is the paired difference (same seed: same initial weights, "
             "data order and schedule).", "",
             "| task | classes | active epochs | static test acc. (%) | dynamic test acc. (%) | Δ dynamic − static |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t, (on, off) in sched.items():
        e = summary["tasks"][t]
        lines.append(f"| {t} | {meta['classes'][t]} | {on}-{off - 1} | {fmt(e['static'])} | {fmt(e['dynamic'])} | "
                     f"{fmt(e['delta'])} |")
    seeds = meta["seeds"]
    by = {(r["arm"], r["seed"]): r for r in runs}
    lines += ["", "Hidden widths after each epoch's decision (dynamic arm, per seed; the static arm stays at "
              f"[{meta['width']}, {meta['width']}]) and the network's inputs/outputs:", "",
              "| epoch | active tasks | in / out features | " + " | ".join(f"widths seed {s}" for s in seeds) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    ref = by[("dynamic", seeds[0])]["history"]
    for e, h in enumerate(ref):
        lines.append(f"| {e} | {', '.join(h['active'])} | {h['in_features']} / {h['out_features']} | "
                     + " | ".join(str(by[("dynamic", s)]["history"][e]["widths"]) for s in seeds) + " |")
    lines += ["", f"Final parameters: static {summary['parameters_static'][0]}, dynamic "
              f"{'; '.join(str(p) for p in summary['parameters_dynamic'])} (per seed).", ""]
    return "\n".join(lines)


def plot(runs: List[Dict[str, Any]], meta: Dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched, epochs, seeds = meta["schedule"], meta["epochs"], meta["seeds"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    for ti, (t, (on, off)) in enumerate(sched.items()):
        c = colours[ti % len(colours)]
        for arm, style in (("dynamic", "-"), ("static", "--")):
            xs = list(range(on + 1, off + 1))
            vals = [[100 * r["history"][e - 1]["test_accuracy"][t] for e in xs] for r in runs if r["arm"] == arm]
            mean = [sum(v[i] for v in vals) / len(vals) for i in range(len(xs))]
            se = [0.0 if len(vals) < 2 else math.sqrt(sum((v[i] - mean[i]) ** 2 for v in vals)
                                                      / (len(vals) - 1) / len(vals)) for i in range(len(xs))]
            axes[0].errorbar(xs, mean, yerr=se, fmt=style, color=c, marker="o" if arm == "dynamic" else "s",
                             markersize=4, capsize=2, label=f"task {t} {arm}")
        axes[0].axvspan(on + 0.5, off + 0.5, color=c, alpha=0.06)
    axes[0].set_xlabel("epoch (test accuracy after the epoch)")
    axes[0].set_ylabel("task test accuracy (%)")
    axes[0].set_title("Per-task accuracy while the task is on (mean ± s.e.)")
    for si, s in enumerate(seeds):
        r = next(r for r in runs if r["arm"] == "dynamic" and r["seed"] == s)
        xs = [0] + [h["epoch"] + 1 for h in r["history"]]
        for layer, marker in ((0, "o"), (1, "s")):
            axes[1].plot(xs, [meta["width"]] + [h["widths"][layer] for h in r["history"]],
                         color=colours[si % len(colours)], marker=marker, markersize=4,
                         linestyle="-" if layer == 0 else ":", label=f"seed {s} hidden.{layer}")
    axes[1].axhline(meta["width"], color="0.4", linestyle="--", linewidth=1, label="static control")
    for t, (on, off) in sched.items():
        axes[1].axvline(on, color="0.7", linewidth=0.8)
        axes[1].text(on, axes[1].get_ylim()[1], f" {t} on", fontsize=7, va="top")
        if off < epochs:
            axes[1].axvline(off, color="0.7", linewidth=0.8, linestyle="-.")
            axes[1].text(off, axes[1].get_ylim()[0], f" {t} off", fontsize=7, va="bottom")
    axes[1].set_xlabel("epoch (width after the epoch's decision)")
    axes[1].set_ylabel("hidden width")
    axes[1].set_title(f"Dynamic widths, ScaffoldPolicy({meta['threshold']}, {meta['scaffold']})")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    tasks = ", ".join(f"{t} = {meta['tasks'][t]}" for t in sched)
    fig.suptitle(f"Scheduled tasks: {tasks}; {len(seeds)} seeds", fontsize=10)
    fig.tight_layout()
    png = out / "scheduled_tasks.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="NAME=SOURCE[:CLASSES]")
    parser.add_argument("--schedule", nargs="+", default=None, metavar="NAME:ON-OFF",
                        help="epochs each task is on (ON .. OFF-1; `NAME:ON-` to the end); default: staggered")
    parser.add_argument("--source", nargs="+", default=[], metavar="SOURCE=DIR",
                        help="IDX directory of a source name (e.g. fashion-mnist=/path, mnist=/path)")
    parser.add_argument("--dataset", default=None, help="shortcut: split this source's ten classes into the default "
                        "tasks A = 0-3, B = 4-6, C = 7-9 (fashion-mnist, mnist or an IDX directory)")
    parser.add_argument("--data", default=None, help="IDX directory for the default fashion-mnist source")
    parser.add_argument("--root", default="data", help="where the `mnist` source is looked for")
    parser.add_argument("--width", type=int, default=16, help="initial hidden width (both hidden layers)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    parser.add_argument("--epochs", type=int, default=None, help="default 12, or 30 with --full")
    parser.add_argument("--full", action="store_true", help="30 epochs, full training sets, 5 seeds")
    parser.add_argument("--train-subset", type=int, default=15_000, help="first N training images per task")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images per task")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--scaffold", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: in-process)")
    parser.add_argument("--out", default="build/scheduled_tasks", help="output directory")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="do not train: rewrite the table and figure of a scheduled_tasks.json into --out")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 30 if args.full else 12
    if args.seeds is None:
        args.seeds = 5
    if args.full:
        args.train_subset = None
    if args.width < 1 or args.seeds < 1 or args.epochs < 1:
        parser.error("width, seeds and epochs must be positive")
    if args.dataset is not None:
        args.tasks = [t.replace("fashion-mnist", args.dataset) for t in DEFAULT_TASKS]
    try:
        args.task_specs = [parse_task(t) for t in args.tasks]
        names = [t.name for t in args.task_specs]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct task names, got {names}.")
        args.schedule = parse_schedule(args.schedule, names, args.epochs)
        args.sources = dict(s.split("=", 1) for s in args.source)
    except ValueError as err:
        parser.error(str(err))
    if args.data is not None:
        args.sources.setdefault("fashion-mnist", args.data)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        saved = json.loads(Path(args.from_json).read_text())
        return write_outputs(saved["meta"], saved["runs"], out)
    started = time.perf_counter()
    data = load_tasks(args)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in ARMS]
    sizes = ", ".join(f"{t}: {d['x_train'].shape[0]} train / {d['x_test'].shape[0]} test, {d['classes']} classes"
                      for t, d in data.items())
    print(f"tasks {sizes}; schedule {args.schedule}; {len(jobs)} runs, {args.epochs} epochs, "
          f"{args.workers} worker(s)", flush=True)
    runs: List[Dict[str, Any]] = []

    def report(run: Dict[str, Any]) -> None:
        runs.append(run)
        accs = ", ".join(f"{t} {100 * a:.2f} %" for t, a in run["final_accuracy"].items())
        print(f"[{len(runs)}/{len(jobs)}] seed {run['seed']} {run['arm']}: {accs}; widths "
              f"{[h['widths'] for h in run['history']]}, {run['seconds']:.1f} s", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for run in pool.map(_worker_run, jobs):
                report(run)
    else:
        for arm, seed in jobs:
            report(train_run(arm, seed, data, args))
    wall = time.perf_counter() - started
    specs = {t.name: t for t in args.task_specs}
    meta = {"tasks": {t: f"{s.source} classes {s.label}" for t, s in specs.items()},
            "classes": {t: data[t]["classes"] for t in data}, "schedule": args.schedule, "epochs": args.epochs,
            "seeds": list(range(args.seeds)), "width": args.width, "threshold": args.threshold,
            "scaffold": args.scaffold, "train_sizes": {t: data[t]["x_train"].shape[0] for t in data},
            "test_sizes": {t: data[t]["x_test"].shape[0] for t in data}, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "optimizer": "AdamW", "init": "orthogonal",
            "isotropic": {"psi": "decay", "psi_decay": 0.1, "length": "trainable"},
            "command": " ".join(["python", "examples/scheduled_tasks.py", *(sys.argv[1:] if argv is None else argv)]),
            "wall_seconds": wall, "workers": args.workers, "nproc": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    return write_outputs(meta, runs, out)


def write_outputs(meta: Dict[str, Any], runs: List[Dict[str, Any]], out: Path) -> Dict[str, Any]:
    """Write the JSON (every run), the markdown tables and the figure into ``out``."""
    runs.sort(key=lambda r: (r["seed"], r["arm"]))
    summary = summarise(runs, meta)
    result = {"meta": meta, "summary": summary, "runs": runs}
    (out / "scheduled_tasks.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, runs, meta)
    (out / "scheduled_tasks.md").write_text(table + "\n")
    png = plot(runs, meta, out)
    print(table)
    print(f"wall time {meta['wall_seconds']:.1f} s ({meta['workers']} worker(s), nproc {meta['nproc']}, torch "
          f"{meta['torch']}); "
          f"wrote {out / 'scheduled_tasks.json'}, {out / 'scheduled_tasks.md'}, {png}")
    return result


if __name__ == "__main__":
    main()
