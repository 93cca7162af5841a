"""The ``iso-lightning`` command: LightningCLI with the isotropic classifier and the datamodules.

    iso-lightning fit --config examples/configs/fashion_mnist_scaffold.yaml
    iso-lightning fit --config examples/configs/fashion_mnist_scaffold.yaml --trainer.max_epochs 20
    iso-lightning test --config examples/configs/fashion_mnist_scaffold.yaml --ckpt_path PATH

The model's input size and class count are linked to the datamodule's. After ``fit`` the test set
is evaluated with the final (resized) model, so one command trains, adapts and reports.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from iso_lightning.models import IsotropicClassifier

__all__ = ["IsoLightningCLI", "main"]


class IsoLightningCLI(LightningCLI):
    """LightningCLI that links the data's shape into the model and tests right after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_features", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--threads", type=Optional[int], default=None,
            help="CPU threads for PyTorch (default: PyTorch's choice). Small networks run fastest on one: "
                 "with several, every tiny operation waits for the slowest thread, badly so on a busy machine.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("threads")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"Expected argument `threads` to be None or an int >= 1, but got {threads!r}.")
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if results and self.trainer.is_global_zero:
            accuracy = results[0].get("test_acc")
            widths = self.model.topology_summary()["widths"]  # type: ignore[operator]
            print(f"[iso_lightning] test accuracy {accuracy:.4f} with widths {widths}")


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``iso-lightning`` console script."""
    IsoLightningCLI(IsotropicClassifier, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
