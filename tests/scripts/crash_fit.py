"""A fit with topology changes and frequent checkpoints, to be killed and resumed by tests/test_crash_resume.py.

    python tests/scripts/crash_fit.py DIR MAX_STEPS [RESUME_CKPT] [KILL_AT]

KILL_AT makes the process SIGKILL itself at a chosen moment: "topology:N" in the middle of the N-th
topology change (after its first space changed), "checkpoint:N" half-way through writing the N-th
checkpoint file. Without it the parent kills the process at a random time.
At the end it writes DIR/final.pt with the weights, widths and event history.
"""

import os
import signal
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _helpers import IsoModule, Oscillate, blobs  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import iso_lightning.operations as operations  # noqa: E402
from iso_lightning import DynamicTopologyCallback  # noqa: E402


class Module(IsoModule):
    # No epoch-wise LR scheduler: a checkpoint written at an epoch end precedes that epoch's
    # scheduler step, which makes even a plain Lightning resume differ from an uninterrupted run.
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)




def arm(kill_at):
    kind, _, count = kill_at.partition(":")
    remaining = [int(count)]
    if kind == "topology":
        original = operations.set_widths

        def set_widths(spaces, widths, **kwargs):
            remaining[0] -= 1
            if remaining[0] == 0 and len(widths) > 1:
                last = sorted(widths)[-1]
                operations.resize(spaces[last], widths[last], optimizer=kwargs.get("optimizer"),
                                  generator=kwargs.get("generator"))
                os.kill(os.getpid(), signal.SIGKILL)  # half of the change applied, nothing saved
            return original(spaces, widths, **kwargs)

        operations.set_widths = set_widths
    elif kind == "checkpoint":
        import lightning.fabric.utilities.cloud_io as cloud_io

        original_save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if hasattr(f, "write") and isinstance(obj, dict) and "state_dict" in obj:
                remaining[0] -= 1
                if remaining[0] == 0:
                    original_save(obj, f, *args, **kwargs)
                    data = f.getvalue() if hasattr(f, "getvalue") else b""
                    target = os.path.join(sys.argv[1], "ckpt", "torn.ckpt")
                    with open(target, "wb") as fh:  # a file cut short, as a crash mid-write leaves it
                        fh.write(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)

        cloud_io.torch.save = torch_save


def main():
    out, max_steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    if len(sys.argv) > 4:
        arm(sys.argv[4])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Module(sizes=(8, 6, 6, 3), lr=0.05)
    callback = DynamicTopologyCallback(Oscillate(), every_n_epochs=None, every_n_steps=7, verbose=0, log_dir=out)
    # At every epoch end: the plain DataLoader has no state, so a run resumed from the middle of an
    # epoch would see other batches than the uninterrupted one and the weights could not be compared.
    # Saved after validation: a checkpoint written inside `on_train_epoch_end` comes before the loop
    # marks the epoch finished, and Lightning then resumes it differently from an uninterrupted run.
    checkpoints = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_epochs=1, save_top_k=-1,
                                  filename="{step}", save_on_train_epoch_end=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, checkpoints], default_root_dir=out)
    trainer.fit(model, DataLoader(blobs(n=128), batch_size=16, shuffle=False),
                DataLoader(blobs(n=32, seed=1), batch_size=32), ckpt_path=resume)
    torch.save({"state": model.state_dict(), "widths": model.net.hidden_widths, "events": callback.events,
                "step": trainer.global_step}, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main()
