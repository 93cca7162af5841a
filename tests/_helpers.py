"""Small models and data shared by the Lightning tests and the scripts they launch."""

import math
import os
import signal
import subprocess
import sys
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from iso_lightning import IsotropicMLP, TopologyPolicy
from iso_lightning.mixin import IsotropicModuleMixin


def blobs(n=192, dim=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, dim, generator=g), y)


class IsoModule(IsotropicModuleMixin, pl.LightningModule):
    def __init__(self, sizes=(8, 6, 6, 3), lr=0.03):
        super().__init__()
        self.save_hyperparameters()
        self.net = IsotropicMLP(list(sizes), psi="decay", length="trainable",
                                generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y) + self.psi_regularisation()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)}


def loaders(batch_size=32):
    return DataLoader(blobs(), batch_size=batch_size, shuffle=False), DataLoader(blobs(seed=1), batch_size=64)


def trainer(tmp_path, callbacks, max_epochs=6, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      deterministic=True, **kwargs)


class FlatClassifier(IsotropicModuleMixin, pl.LightningModule):
    """A user's own classifier on flattened images (what `iso-lightning fit --model` is given)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, width: int = 8, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = IsotropicMLP([in_features, width, num_classes], length="trainable")

    def forward(self, x):
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Oscillate(TopologyPolicy):
    """Grow every space by ``grow``, then shrink it by ``shrink``, alternately: a change at every decision."""

    def __init__(self, grow=2, shrink=1):
        super().__init__()
        self.grow, self.shrink, self.calls = grow, shrink, 0

    def propose(self, spaces, context):
        self.calls += 1
        return {name: info.width + (self.grow if self.calls % 2 else -self.shrink) for name, info in spaces.items()}

    def state_dict(self):
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.calls = int(state.get("calls", 0))


def run_two_ranks(script, tmp_path, *args, timeout=300):
    """Run a 2-rank fit ``script`` (it writes ``rank0.pt`` and ``rank1.pt`` into ``tmp_path``) in its own
    process group; past ``timeout`` seconds kill it and fail naming a likely hang. The two results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the 2-rank fit {os.path.basename(str(script))} {list(args)} did not finish within {timeout} s "
                    f"(a hang: a collective that only some ranks reached?). Its last output:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


# ---------------------------------------------------------------------------- state snapshots
def _tensor(t: Optional[Tensor]) -> Any:
    if t is None:
        return None
    flat = t.detach().clone().contiguous().reshape(-1)
    return ("tensor", tuple(t.shape), t.dtype, t.device, flat.view(torch.uint8) if flat.numel() else flat)


def _value(v: Any) -> Any:
    if isinstance(v, Tensor):
        return _tensor(v)
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_value(x) for x in v)
    return v


def _optimizer(opt: torch.optim.Optimizer) -> Dict[str, Any]:
    params = [p for group in opt.param_groups for p in group["params"]]
    return {
        "params": [id(p) for p in params],
        "groups": [_value({k: v for k, v in group.items() if k != "params"}) for group in opt.param_groups],
        "state": [_value(dict(opt.state[p])) if p in opt.state else None for p in params],
        "state_size": len(opt.state),
    }


def snapshot(model: nn.Module, *optimizers: torch.optim.Optimizer) -> Dict[str, Any]:
    """Everything a refused operation must leave as it was."""
    return {
        "parameters": [(name, id(p), type(p), p.requires_grad, _tensor(p), _tensor(p.grad))
                       for name, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, _tensor(b)) for name, b in model.named_buffers(remove_duplicate=False)],
        "optimizers": [_optimizer(o) for o in optimizers],
    }


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), where
        assert a.shape == b.shape and torch.equal(a, b), f"{where}: values changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_unchanged(before: Dict[str, Any], model: nn.Module, *optimizers: torch.optim.Optimizer) -> None:
    _same(before, snapshot(model, *optimizers), "snapshot")


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality of two values (dicts, lists, tensors: bit for bit, so NaN == NaN)."""
    _same(_value(a), _value(b), where)

