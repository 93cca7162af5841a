"""Core benchmarks, measured side by side in one run (ratios, not absolute times).

    python benchmarks/bench_core.py            # full sizes (about 2 minutes on 2 cores)
    python benchmarks/bench_core.py --quick    # smaller sizes, for a smoke run
    python benchmarks/bench_core.py --baseline c12b882   # and (b) side by side against an earlier version

(a) training-step time of an isotropic MLP over a same-shape ``nn.Tanh`` MLP, [3072, 500, 500, 10],
    batch 48, AdamW; the two are interleaved step by step so machine drift hits both alike.
(b) one grow and one shrink (with AdamW state remapping) of each hidden layer, as a fraction of one
    training epoch over 50,000 samples: a ``Trainer.fit`` epoch of the same network and optimizer
    (DataLoader over random data, in a child process), and, stricter, 50,000 / 48 bare optimizer
    steps timed in this process. Two shrinks: of a just-grown neuron, and of a trained layer.
    With ``--baseline REF``, (b) is also timed against the package as of git ``REF`` (exported to
    a temporary folder and imported under another name), both networks in this process, their
    operation cycles interleaved: the ratio this / REF per figure, robust to the machine's load.
(c) shrinking 50 neurons at once over shrinking one neuron at a time 50 times.
(d) peak extra memory (resident set) of a shrink, and of a grow, on a 150,528 -> 1,024 layer, in a
    child process.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from iso_lightning import IsotropicMLP


def _tanh_mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _copy_weights(iso: IsotropicMLP, ref: nn.Sequential) -> None:
    linears = [m for m in ref if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for a, b in zip(iso.layers, linears):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def _stepper(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    x, y = batch

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if hasattr(model, "regularisation"):
            loss = loss + model.regularisation()
        loss.backward()
        opt.step()

    return step, opt


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def bench_step(sizes, batch_size, steps, psi, length):
    g = torch.Generator().manual_seed(0)
    iso = IsotropicMLP(sizes, psi=psi, length=length, generator=g)
    ref = _tanh_mlp(sizes)
    _copy_weights(iso, ref)
    batch = (torch.randn(batch_size, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch_size,), generator=g))
    step_iso, _ = _stepper(iso, batch)
    step_ref, _ = _stepper(ref, batch)
    for _ in range(5):
        step_iso()
        step_ref()
    t_iso, t_ref = [], []
    for i in range(steps):
        # Alternate which one goes first so that neither always runs on a warmer cache.
        pair = ((step_iso, t_iso), (step_ref, t_ref)) if i % 2 == 0 else ((step_ref, t_ref), (step_iso, t_iso))
        for fn, acc in pair:
            acc.append(_timed(fn))
    # The median of the per-pair ratios: each pair ran within a few milliseconds, so load from other
    # processes on a shared machine cancels out of it.
    ratio = statistics.median(a / b for a, b in zip(t_iso, t_ref))
    return ratio, statistics.median(t_iso), statistics.median(t_ref)


def _ops_rig(mlp_class, sizes, batch_size):
    g = torch.Generator().manual_seed(1)
    net = mlp_class(sizes, psi="decay", length="trainable", generator=g)
    batch = (torch.randn(batch_size, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch_size,), generator=g))
    step, opt = _stepper(net, batch)
    for _ in range(3):
        step()
    return net, opt, step, g


def _ops_cycle(rig, layer):
    """Seconds of a step, a grow, a shrink of the grown neuron and (after a step) a shrink of a trained layer."""
    net, opt, step, g = rig
    times = (_timed(step), _timed(net.grow, layer, 1, optimizer=opt, generator=g),
             _timed(net.shrink, layer, 1, optimizer=opt))
    step()
    times += (_timed(net.shrink, layer, 1, optimizer=opt),)
    net.grow(layer, 1, optimizer=opt, generator=g)  # back to the starting width
    return times


def bench_ops(sizes, batch_size, repeats):
    """Median seconds of one training step, one grow, and one shrink in two situations, per hidden layer.

    ``shrink (grown)`` removes the neuron a grow has just added (a zero incoming row); ``shrink
    (trained)`` removes the weakest direction of a layer that has only been trained (no zero row:
    the general case). Every measured operation follows a training step, as in a training loop.
    """
    rig = _ops_rig(IsotropicMLP, sizes, batch_size)
    rows = []
    for layer in range(rig[0].num_hidden):
        cycles = [_ops_cycle(rig, layer) for _ in range(repeats)]
        rows.append((layer, *(statistics.median(t) for t in zip(*cycles))))
    return rows


def _import_baseline(ref):
    """The package as of git ``ref``, importable as ``iso_lightning_baseline`` (a copy in a temporary folder)."""
    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="iso_baseline_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "iso_lightning"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "iso_lightning_baseline"
    (folder / "iso_lightning").rename(package)
    for source in package.rglob("*.py"):  # its absolute imports of itself
        source.write_text(re.sub(r"\biso_lightning\b", "iso_lightning_baseline", source.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("iso_lightning_baseline")


def bench_against(ref, sizes, batch_size, repeats):
    """Per hidden layer and figure of (b), the median per-pair ratio this code / ``ref`` and both medians.

    Both versions' networks (the same seed) run in this process, their cycles interleaved and their
    order alternated, so that machine load and the allocator's state hit both alike.
    """
    baseline = _import_baseline(ref)
    rigs = {"this": _ops_rig(IsotropicMLP, sizes, batch_size), "base": _ops_rig(baseline.IsotropicMLP, sizes,
                                                                                batch_size)}
    rows = []
    for layer in range(rigs["this"][0].num_hidden):
        times = {name: [] for name in rigs}
        for i in range(repeats):
            for name in (("this", "base") if i % 2 == 0 else ("base", "this")):
                times[name].append(_ops_cycle(rigs[name], layer))
        figures = []
        for k in range(4):
            this, base = [t[k] for t in times["this"]], [t[k] for t in times["base"]]
            figures.append((statistics.median(a / b for a, b in zip(this, base)), statistics.median(this),
                            statistics.median(base)))
        rows.append((layer, figures))
    return rows


_EPOCH_CHILD = r"""
import json, sys, time, warnings
import torch
import lightning.pytorch as L
from torch.utils.data import DataLoader, TensorDataset
from iso_lightning import IsotropicMLP

warnings.filterwarnings("ignore")
sizes, samples, batch = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = IsotropicMLP(sizes, psi="decay", length="trainable")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y) + self.net.regularisation()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-3)


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(samples, sizes[0], generator=g), torch.randint(0, sizes[-1], (samples,), generator=g))
timer = EpochTimer()
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
trainer.fit(Module(), DataLoader(data, batch_size=batch, shuffle=True))
print(json.dumps({"seconds": timer.seconds}))
"""


def bench_lightning_epoch(sizes, samples, batch_size):
    """Seconds of one ``Trainer.fit`` training epoch over ``samples`` random samples (a child process;
    from the epoch's first to its last hook, so start-up is not counted)."""
    out = subprocess.run([sys.executable, "-c", _EPOCH_CHILD, json.dumps(sizes), str(samples), str(batch_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def bench_batch_shrink(sizes, k, repeats):
    g = torch.Generator().manual_seed(2)
    base = IsotropicMLP(sizes, psi="decay", length="trainable", generator=g)
    x = torch.randn(8, sizes[0], generator=g)
    base(x).sum().backward()
    t_once, t_loop = [], []
    for _ in range(repeats):
        for mode, acc in (("once", t_once), ("loop", t_loop)):
            net = IsotropicMLP(sizes, psi="decay", length="trainable")
            net.load_state_dict(base.state_dict())
            opt = torch.optim.AdamW(net.parameters())
            net(x).sum().backward()
            opt.step()
            start = time.perf_counter()
            if mode == "once":
                net.shrink(0, k, optimizer=opt)
            else:
                for _ in range(k):
                    net.shrink(0, 1, optimizer=opt)
            acc.append(time.perf_counter() - start)
    return statistics.median(t_once), statistics.median(t_loop)


_MEMORY_CHILD = r"""
import gc, json, sys, torch
from iso_lightning import IsotropicMLP

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

inputs, width, op = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
net = IsotropicMLP([inputs, width, 10], psi="decay", length="trainable")
opt = torch.optim.AdamW(net.parameters())
x = torch.randn(2, inputs)
net(x).sum().backward()
opt.step()  # AdamW state: two more copies of the weight, remapped by the shrink as well
del x
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak resident set size (VmHWM) to the current one
getattr(net, op)(0, 1, optimizer=opt)
peak = status("VmHWM")
weight = net.layers[0].weight.numel() * net.layers[0].weight.element_size()
print(json.dumps({"extra_bytes": peak - base, "weight_bytes": weight, "base_bytes": base}))
"""


def bench_memory(inputs, width, op="shrink"):
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(inputs), str(width), op], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--baseline", metavar="REF", default=None,
                        help="also time (b) side by side against the package as of git REF (e.g. c12b882)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes, steps, repeats, mem = [256, 64, 64, 10], 20, 3, (4096, 64)
    else:
        sizes, steps, repeats, mem = [3072, 500, 500, 10], 200, 15, (150528, 1024)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sizes {sizes}, batch 48")

    for psi, length in (("none", "none"), ("decay", "trainable")):
        rounds = [bench_step(sizes, 48, steps, psi=psi, length=length) for _ in range(5)]
        ratios = sorted(r[0] for r in rounds)
        print(f"(a) step time isotropic (psi={psi}, length={length}) / nn.Tanh MLP: {statistics.median(ratios):.3f}  "
              f"(median of 5 rounds, range {ratios[0]:.3f}-{ratios[-1]:.3f}; each the median per-pair ratio of "
              f"{steps} interleaved steps; step {rounds[0][1] * 1e3:.2f} ms vs {rounds[0][2] * 1e3:.2f} ms)")

    samples = 50_000 if not args.quick else 2_000
    lightning_epoch = bench_lightning_epoch(sizes, samples, 48)
    for layer, step, grow, grown, trained in bench_ops(sizes, 48, repeats):
        steps_epoch = step * samples / 48
        print(f"(b) hidden layer {layer}: "
              + ", ".join(f"{name} {t * 1e3:.2f} ms = {100 * t / lightning_epoch:.4f} % of a Lightning epoch "
                          f"({100 * t / steps_epoch:.4f} % of {samples // 48} bare steps)"
                          for name, t in (("grow", grow), ("shrink (grown)", grown), ("shrink (trained)", trained))))
    print(f"    Lightning epoch over {samples:,} samples: {lightning_epoch:.2f} s; bare steps: "
          f"{step * samples / 48:.2f} s (median step {step * 1e3:.2f} ms)")

    if args.baseline is not None:
        names = ("step", "grow", "shrink (grown)", "shrink (trained)")
        for layer, figures in bench_against(args.baseline, sizes, 48, max(2 * repeats, 20)):
            print(f"(b) vs {args.baseline}, hidden layer {layer} (this / {args.baseline}, median per-pair ratio of "
                  f"interleaved cycles): " + ", ".join(f"{name} {r:.3f} ({a * 1e3:.2f} vs {b * 1e3:.2f} ms)"
                                                       for name, (r, a, b) in zip(names, figures)))

    k = 50 if not args.quick else 10
    once, loop = bench_batch_shrink(sizes, k, max(3, repeats // 5))
    print(f"(c) shrink {k} at once / {k} single shrinks: {once / loop:.3f}  "
          f"({once * 1e3:.1f} ms vs {loop * 1e3:.1f} ms)")

    m = bench_memory(*mem)
    print(f"(d) peak extra memory of a shrink on a {mem[0]:,} -> {mem[1]:,} layer (AdamW, gradient kept): "
          f"{m['extra_bytes'] / 2**30:.3f} GiB above the {m['base_bytes'] / 2**30:.2f} GiB resident before it "
          f"(the weight itself is {m['weight_bytes'] / 2**30:.3f} GiB)")
    g = bench_memory(*mem, op="grow")
    print(f"    and of a grow of it (new tensors are swapped in one at a time: one new copy of one of the "
          f"weight, its gradient and moments is the least): {g['extra_bytes'] / 2**30:.3f} GiB "
          f"({g['extra_bytes'] / g['weight_bytes']:.2f} weights)")


if __name__ == "__main__":
    main()
