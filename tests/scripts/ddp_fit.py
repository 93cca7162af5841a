"""Two-process CPU DDP fit with topology events; each rank saves its final parameters.

Run by tests/test_ddp.py::

    python tests/scripts/ddp_fit.py OUT_DIR [--steps N --every K | --epochs E] [--strategy ddp|ddp_spawn]
        [--logger none|csv|tensorboard] [--log-dir explicit|default] [--policy oscillate|scaffold]

Every rank writes ``OUT_DIR/rank{r}.pt`` (weights, widths, events) at the end of ``fit``; with a
spawn strategy the main process also writes ``OUT_DIR/main.pt`` once ``fit`` has returned to it.
"""

import argparse
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _helpers import IsoModule, Oscillate, blobs  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from iso_lightning import DynamicTopologyCallback, ScaffoldPolicy  # noqa: E402


def snapshot(model, callback):
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "events": list(callback.events),
            "widths": model.net.hidden_widths, "figure": callback.figure_path, "history": len(callback.history)}


class SaveFinal(Callback):
    def __init__(self, out, topology):
        self.out, self.topology = out, topology

    def on_fit_end(self, trainer, pl_module):
        torch.save(snapshot(pl_module, self.topology), os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--logger", default="none", choices=["none", "csv", "tensorboard"])
    parser.add_argument("--log-dir", default="explicit", choices=["explicit", "default"])
    parser.add_argument("--policy", default="oscillate", choices=["oscillate", "scaffold"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    features, classes = (8, 3) if args.policy == "oscillate" else (20, 4)
    model = IsoModule(sizes=(features, 6, 6, classes), lr=0.05)
    policy = Oscillate() if args.policy == "oscillate" else ScaffoldPolicy(0.95, 2)
    kwargs = {} if args.every is None else {"every_n_epochs": None, "every_n_steps": args.every}
    if args.log_dir == "explicit":
        kwargs["log_dir"] = args.out
    callback = DynamicTopologyCallback(policy, verbose=0, **kwargs)
    if args.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(args.out)
    elif args.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(args.out)
    else:
        logger = False
    trainer = pl.Trainer(strategy=args.strategy, accelerator="cpu", devices=2, logger=logger,
                         max_steps=args.steps or -1, max_epochs=args.epochs, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=args.out,
                         callbacks=[callback, SaveFinal(args.out, callback)])
    trainer.fit(model, DataLoader(blobs(n=256, dim=features, classes=classes), batch_size=16, shuffle=True))
    if args.strategy.startswith("ddp_spawn") or args.strategy == "ddp_notebook":
        torch.save(snapshot(model, callback), os.path.join(args.out, "main.pt"))


if __name__ == "__main__":
    main()
