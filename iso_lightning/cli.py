"""The ``iso-lightning`` command: LightningCLI with the topology callback, any LightningModule and datamodule.

    iso-lightning fit --config examples/configs/fashion_mnist_scaffold.yaml
    iso-lightning fit --config examples/configs/fashion_mnist_scaffold.yaml --topology.policy.threshold 0.5
    iso-lightning test --config examples/configs/fashion_mnist_scaffold.yaml --ckpt_path PATH
    iso-lightning fit --config examples/configs/shakespeare_gpt.yaml

``--model`` is any LightningModule (with :class:`~iso_lightning.IsotropicModuleMixin` for the callback
to work on it). The ``topology:`` section is the :class:`~iso_lightning.DynamicTopologyCallback`
(appended to the trainer's callbacks), so each of its options has its own flag. The data's shape
reaches the model by name: when the model's ``__init__`` takes ``in_features``, ``num_classes`` or
``vocab_size``, it gets the datamodule's ``num_features``, ``num_classes`` or ``vocab_size``.

After ``fit``, ``--test_after_fit`` chooses what is tested: ``best`` (default: the best checkpoint
of the run's ``ModelCheckpoint``, its newest when it has no monitor; the final weights when there is
none), ``last`` (the final weights) or ``none``.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from iso_lightning.callback import DynamicTopologyCallback

__all__ = ["DATA_LINKS", "TEST_AFTER_FIT", "IsoLightningCLI", "main"]

#: Datamodule attribute -> model ``__init__`` parameter, linked when the model takes the parameter.
DATA_LINKS = {"num_features": "in_features", "num_classes": "num_classes", "vocab_size": "vocab_size"}
TEST_AFTER_FIT = ("best", "last", "none")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


class IsoLightningCLI(LightningCLI):
    """LightningCLI with a ``topology`` section, data-to-model links by name and a test after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(DynamicTopologyCallback, "topology")
        parser.add_argument(
            "--threads", type=Optional[int], default=None,
            help="CPU threads for PyTorch (default: PyTorch's choice). Small networks run fastest on one: "
                 "with several, every tiny operation waits for the slowest thread, badly so on a busy machine.",
        )
        parser.add_argument(
            "--test_after_fit", type=str, default="best",
            help=f"After fit, test the best checkpoint, the last weights, or nothing: one of {list(TEST_AFTER_FIT)}.",
        )

    def _section(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._section()
        threads = config.get("threads")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"Expected argument `threads` to be None or an int >= 1, but got {threads!r}.")
            torch.set_num_threads(threads)
        choice = config.get("test_after_fit", "best")
        if choice not in TEST_AFTER_FIT:
            raise ValueError(f"Expected argument `test_after_fit` to be one of {list(TEST_AFTER_FIT)}, but got "
                             f"{choice!r}.")
        self._link_data(config)

    @staticmethod
    def _link_data(config: Namespace) -> None:
        """Give the model the datamodule's sizes, for each parameter its ``__init__`` takes."""
        model, data = config.get("model"), config.get("data")
        if not isinstance(model, Namespace) or not isinstance(data, Namespace) or not model.get("class_path") \
                or not data.get("class_path"):
            return
        parameters = inspect.signature(_import(model.class_path).__init__).parameters
        wanted = {source: target for source, target in DATA_LINKS.items() if target in parameters}
        if not wanted:
            return
        init_args = data.get("init_args")
        kwargs: Dict[str, Any] = init_args.as_dict() if isinstance(init_args, Namespace) else {}
        datamodule = _import(data.class_path)(**kwargs)
        for source, target in wanted.items():
            if hasattr(datamodule, source):
                if model.get("init_args") is None:
                    model.init_args = Namespace()
                setattr(model.init_args, target, getattr(datamodule, source))

    def after_fit(self) -> None:
        choice = self._section().get("test_after_fit", "best")
        if self.trainer.interrupted or choice == "none" or not _has_test_step(self.model):
            return
        checkpoint = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        ckpt_path = "best" if choice == "best" and checkpoint else None
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False, ckpt_path=ckpt_path)
        if results and self.trainer.is_global_zero:
            what = f"checkpoint {checkpoint}" if ckpt_path else "final weights"
            figures = ", ".join(f"{k} {v:.4f}" for k, v in results[0].items() if not k.startswith("topology/"))
            summary = getattr(self.model, "topology_summary", None)
            widths = summary()["widths"] if callable(summary) else {}
            print(f"[iso_lightning] test of the {what}: {figures} with widths {widths}")


def _has_test_step(model: LightningModule) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return bool(is_overridden("test_step", model))


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``iso-lightning`` console script."""
    IsoLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
