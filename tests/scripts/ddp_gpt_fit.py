"""Two-process CPU DDP fit of a tiny CharGPT whose FFN spaces change; each rank saves its final state.

Run by tests/test_transformer.py::

    python tests/scripts/ddp_gpt_fit.py OUT_DIR [--steps N] [--every K]

The text is written to ``OUT_DIR/text.txt``; every rank writes ``OUT_DIR/rank{r}.pt`` (weights,
widths, events, optimizer-state and parameter shapes) at the end of ``fit``.
"""

import argparse
import os
import random
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from iso_lightning import CharGPT, DynamicTopologyCallback, TextDataModule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _helpers import Oscillate  # noqa: E402

WORDS = "thou art the king and she is fair but what light through yonder window breaks".split()




class SaveFinal(Callback):
    def __init__(self, out, topology):
        self.out, self.topology = out, topology

    def on_fit_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.save({"state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "events": list(self.topology.events), "widths": pl_module.topology_summary()["widths"],
                    "param_shapes": [tuple(p.shape) for p in params],
                    "optimizer_shapes": [tuple(optimizer.state[p]["exp_avg"].shape) for p in params]},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    path = os.path.join(args.out, "text.txt")
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the launcher's process writes it before the others start
        rng = random.Random(0)
        with open(path, "w") as f:
            f.write("\n".join(" ".join(rng.choice(WORDS) for _ in range(9)) for _ in range(100)))
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(path, block_size=16, batch_size=4, samples_per_epoch=64, val_windows=4)
    model = CharGPT(vocab_size=dm.vocab_size, block_size=16, d_model=16, n_layers=2, n_heads=2, d_hidden=24,
                    group_size=4)
    callback = DynamicTopologyCallback(Oscillate(3, 2), every_n_epochs=None, every_n_steps=args.every, verbose=0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, max_steps=args.steps,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=args.out, callbacks=[callback, SaveFinal(args.out, callback)])
    trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main()
