"""Overhead of DynamicTopologyCallback on a Lightning fit, as a ratio measured side by side.

    python benchmarks/bench_callback.py            # Fashion-MNIST if installed, else generated images
    python benchmarks/bench_callback.py --quick    # a smoke run

Arms, interleaved (one run of each per round, the order alternating), median of the rounds:

* ``none``: the fit without the callback;
* ``dry_run``: the callback deciding at every epoch (spectra of every space, the policy, the logs and
  the figures), changing nothing, so both arms train the same network;
* ``adapt``: the callback changing the widths at every epoch (``WidthSchedulePolicy`` growing by one
  neuron per space and epoch), against ``none`` on the final widths' scale (reported, not a target:
  the network it trains is a different one).

Model: ``IsotropicClassifier(hidden=[256, 256])``, batch 48, no validation, 2 threads.

Then one more ``dry_run`` and one more ``adapt`` fit with the callback's hooks timed inside the fit (a
ratio within one run, so it does not depend on the machine's load as the side-by-side ratios do):
the callback's share of the fit (target <= 1 %), split into what it costs per epoch (spectra,
policy, logs, the per-batch hooks and, adapting, the operations with AdamW remapped) and once at fit
end (``topology.png``). The ``adapt`` arm's side-by-side ratio also holds the cost of training the
wider network it makes (257 and 258 neurons instead of 256), which is not the callback's.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import tempfile
import time
import warnings
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from iso_lightning import DynamicTopologyCallback, ScaffoldPolicy, WidthSchedulePolicy
from iso_lightning.models import IsotropicClassifier

FASHION = "/usr/share/datasets/fashion-mnist"


def data(samples: int) -> DataLoader:
    if os.path.isdir(FASHION):
        from iso_lightning.data import load_idx_dataset

        images, labels = load_idx_dataset(FASHION, train=True)
        x = images[:samples].reshape(-1, 784).float() / 255.0
        y = labels[:samples].long()
        source = "Fashion-MNIST"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(samples, 784, generator=g), torch.randint(0, 10, (samples,), generator=g)
        source = "generated images"
    print(f"data: {len(x):,} {source}")
    return DataLoader(TensorDataset(x, y), batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(0))


def _timed(callback: DynamicTopologyCallback, spent: collections.Counter) -> DynamicTopologyCallback:
    """Wrap every hook ``callback``'s class defines so that ``spent[hook]`` sums its seconds."""
    for name in dir(pl.Callback):
        if name.startswith(("on_", "setup", "teardown")) and name in type(callback).__dict__:
            hook = getattr(callback, name)

            @functools.wraps(hook)
            def timed(*args, _hook=hook, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    spent[_name] += time.perf_counter() - start

            setattr(callback, name, timed)
    return callback


def fit(arm: str, loader: DataLoader, epochs: int, spent: Optional[collections.Counter] = None) -> float:
    pl.seed_everything(0, verbose=False)
    model = IsotropicClassifier(hidden=[256, 256])
    callbacks = []
    if arm == "dry_run":
        callbacks.append(DynamicTopologyCallback(ScaffoldPolicy(0.95, 5), dry_run=True, verbose=0))
    elif arm == "adapt":
        callbacks.append(DynamicTopologyCallback(WidthSchedulePolicy(targets=256 + epochs, start_epoch=0,
                                                                     end_epoch=epochs), verbose=0))
    if spent is not None:
        callbacks = [_timed(callback, spent) for callback in callbacks]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=callbacks, default_root_dir=root)
        start = time.perf_counter()
        trainer.fit(model, loader)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    samples, epochs, rounds = (3_000, 2, 2) if args.quick else (60_000, 2, 5)
    rounds = args.rounds or rounds
    loader = data(samples)
    times = {"none": [], "dry_run": [], "adapt": []}
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for arm in order:
            times[arm].append(fit(arm, loader, epochs))
    base = statistics.median(times["none"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {epochs} epochs, median of {rounds} rounds")
    print(f"fit without the callback: {base:.2f} s")
    for arm in ("dry_run", "adapt"):
        ratios = sorted(t / n for t, n in zip(times[arm], times["none"]))
        print(f"callback {arm} (deciding every epoch) / no callback: {statistics.median(ratios):.4f} "
              f"(per-round ratios {', '.join(f'{v:.4f}' for v in ratios)})")
    for arm in ("dry_run", "adapt"):
        spent: collections.Counter = collections.Counter()
        total = fit(arm, loader, epochs, spent)
        once = spent["on_fit_end"]
        per_epoch = (sum(spent.values()) - once) / epochs
        share = per_epoch * epochs / total  # the per-epoch costs' share of the fit
        print(f"callback hooks timed inside one {arm} fit of {total:.2f} s: {100 * sum(spent.values()) / total:.2f} % "
              f"of the fit (target <= 1 %: {'met' if sum(spent.values()) <= 0.01 * total else 'MISSED'}); per epoch "
              f"{per_epoch * 1e3:.1f} ms = {100 * share:.2f} % of an epoch; once at fit end (the figure) "
              f"{once * 1e3:.0f} ms")
        if share < 0.01:
            print(f"  the callback stays under 1 % of fits longer than {once / (0.01 - share):.0f} s")
        print("  " + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in spent.most_common(5)))

if __name__ == "__main__":
    main()
