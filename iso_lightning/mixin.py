"""``IsotropicModuleMixin``: makes a LightningModule's isotropic networks visible and checkpoint-safe.

Mix it into a ``LightningModule`` that holds one or more :class:`~iso_lightning.IsotropicNetwork`
submodules (at any depth)::

    class Classifier(IsotropicModuleMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = IsotropicMLP([784, 32, 32, 10], psi="decay", length="trainable")

Neuron spaces are then named ``"<module path>.hidden.<layer>"`` (``"net.hidden.0"``). The current
topology is written into every checkpoint, and loading one resizes the networks before the weights
are copied, so ``Trainer.fit(ckpt_path=...)`` and ``load_from_checkpoint`` work after any number of
growth and shrink events (Lightning loads weights before callbacks and before it builds optimizers,
and ``strict=False`` does not excuse size mismatches).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor, nn

from iso_lightning.layers import IsotropicNetwork

__all__ = ["TOPOLOGY_KEY", "IsotropicModuleMixin", "find_networks"]

#: Checkpoint key of the topology record.
TOPOLOGY_KEY = "iso_lightning_topology"


def find_networks(module: nn.Module) -> Dict[str, IsotropicNetwork]:
    """Every :class:`IsotropicNetwork` inside ``module`` by module path, outermost only."""
    found: Dict[str, IsotropicNetwork] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, IsotropicNetwork) and not any(name.startswith(p + ".") for p in found if p):
            found[name] = sub
    return found


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


class IsotropicModuleMixin:
    """Neuron spaces, topology and shape-safe checkpoints for a ``LightningModule``."""

    def isotropic_networks(self) -> Dict[str, IsotropicNetwork]:
        """The isotropic networks of this module by path (``""`` when the module is one itself)."""
        assert isinstance(self, nn.Module)
        return find_networks(self)

    def neuron_spaces(self) -> Dict[str, Tuple[IsotropicNetwork, int]]:
        """Every hidden space: ``{"net.hidden.0": (network, 0), ...}``."""
        return {
            f"{_prefix(path)}hidden.{layer}": (net, layer)
            for path, net in self.isotropic_networks().items()
            for layer in range(net.num_hidden)
        }

    def topology(self) -> Dict[str, Any]:
        """Current shapes of every isotropic network (plain data, JSON-safe), plus summary figures."""
        nets = self.isotropic_networks()
        return {path: net.topology() for path, net in nets.items()}

    def topology_summary(self) -> Dict[str, Any]:
        """``{space: width}``, the total hidden width and the parameter count: what to show a person."""
        widths = {name: net.hidden_widths[layer] for name, (net, layer) in self.neuron_spaces().items()}
        assert isinstance(self, nn.Module)
        return {"widths": widths, "total_hidden": sum(widths.values()),
                "parameters": sum(p.numel() for p in self.parameters())}

    def psi_regularisation(self) -> Tensor:
        """Sum of the networks' psi penalties (``psi="decay"``); add it to the training loss."""
        nets = list(self.isotropic_networks().values())
        if not nets:
            return torch.zeros(())
        total = nets[0].regularisation()
        for net in nets[1:]:
            total = total + net.regularisation()
        return total

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[TOPOLOGY_KEY] = self.topology()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        record = checkpoint.get(TOPOLOGY_KEY)
        if record is not None:
            self.apply_topology(record)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def apply_topology(self, record: Mapping[str, Any]) -> None:
        """Resize the networks to a record of :meth:`topology` (values are left for the state dict).

        Every entry is checked before any network changes; a record from another architecture
        raises ``ValueError`` naming the network path.
        """
        nets = self.isotropic_networks()
        if not isinstance(record, Mapping) or set(record) != set(nets):
            named = sorted(record) if isinstance(record, Mapping) else record
            raise ValueError(
                f"The checkpoint's topology record names networks {named!r}, but this module has "
                f"{sorted(nets)}: the checkpoint is from a different architecture."
            )
        from iso_lightning.surgery import _check_topology

        for path, net in nets.items():
            try:
                _check_topology(net, record[path])
            except ValueError as err:
                raise ValueError(f"Network `{path or '<module>'}`: {err}") from None
        for path, net in nets.items():
            net.reshape_to(record[path])
