"""Ready LightningModules built on the isotropic networks (used by the ``iso-lightning`` CLI)."""

from __future__ import annotations

from typing import Any, List, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from iso_lightning.layers import IsotropicMLP
from iso_lightning.mixin import IsotropicModuleMixin

__all__ = ["IsotropicClassifier"]


class IsotropicClassifier(IsotropicModuleMixin, pl.LightningModule):
    """An isotropic MLP classifier trained with AdamW (the paper's set-up by default).

    Args:
        in_features: input size (the CLI links it to the datamodule's ``num_features``).
        num_classes: number of classes (linked to the datamodule's ``num_classes``).
        hidden: starting hidden widths (a dynamic-topology callback changes them during ``fit``).
        activation, length, psi, psi_decay, group_size, init: as for :class:`~iso_lightning.IsotropicMLP`.
        lr, weight_decay: AdamW settings.

    The hyper-parameters record the *starting* widths; the current ones are in
    :meth:`~iso_lightning.IsotropicModuleMixin.topology` and in every checkpoint, which resizes the
    model when it is loaded.

    Example:
        >>> model = IsotropicClassifier(in_features=784, num_classes=10, hidden=[16, 16])
        >>> model.net.hidden_widths
        [16, 16]
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: Optional[List[int]] = None,
                 activation: str = "tanh", length: str = "trainable", psi: str = "decay", psi_decay: float = 0.1,
                 group_size: Optional[int] = None, init: str = "orthogonal", lr: float = 1e-3,
                 weight_decay: float = 1e-3) -> None:
        super().__init__()
        hidden = [16, 16] if hidden is None else list(hidden)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"Expected argument `lr` to be a positive number, but got {lr!r}.")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"Expected argument `weight_decay` to be a number >= 0, but got {weight_decay!r}.")
        self.save_hyperparameters()
        self.net = IsotropicMLP([in_features, *hidden, num_classes], activation=activation, length=length, psi=psi,
                                psi_decay=psi_decay, group_size=group_size, init=init)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def _step(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_acc, "train") + self.psi_regularisation()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities; ``batch`` is inputs, or ``(inputs, labels)`` as the datamodules give."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x), dim=-1)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
