"""Two-process CPU DDP fit with topology events; each rank saves its final parameters.

Run by tests/test_ddp.py as ``python tests/scripts/ddp_fit.py OUT_DIR STEPS EVERY``.
"""

import os
import sys
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_callback import IsoModule, blobs  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from iso_lightning import DynamicTopologyCallback, TopologyPolicy  # noqa: E402


class Oscillate(TopologyPolicy):
    """Grow every space by 2, then shrink it by 1, alternately: a topology event at every call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def propose(self, spaces, context):
        self.calls += 1
        return {name: info.width + (2 if self.calls % 2 else -1) for name, info in spaces.items()}


def main():
    out, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = IsoModule(sizes=(8, 6, 6, 3), lr=0.05)
    callback = DynamicTopologyCallback(Oscillate(), every_n_epochs=None, every_n_steps=every, verbose=0, log_dir=out)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=out, callbacks=[callback])
    trainer.fit(model, DataLoader(blobs(n=256), batch_size=16, shuffle=True))
    rank = trainer.global_rank
    torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "events": callback.events,
                "widths": model.net.hidden_widths}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
