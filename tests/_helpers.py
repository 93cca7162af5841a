"""Small models and data shared by the Lightning tests and the scripts they launch."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from iso_lightning import IsotropicMLP
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
