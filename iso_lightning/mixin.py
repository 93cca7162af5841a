"""``IsotropicModuleMixin``: makes a LightningModule's neuron spaces visible and its checkpoints shape-safe.

Mix it into a ``LightningModule`` whose submodules provide neuron spaces, at any depth and any
number of times (an :class:`~iso_lightning.IsotropicMLP`, a transformer's
:class:`~iso_lightning.IsotropicFFN` blocks, a model adopted with :func:`~iso_lightning.convert`)::

    class Classifier(IsotropicModuleMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = IsotropicMLP([784, 32, 32, 10], psi="decay", length="trainable")

Spaces are then named by module path (``"net.hidden.0"``). The topology is written into every
checkpoint, and ``load_state_dict`` resizes every space to the widths of the state dict it is given
before the weights are copied (all checks first, all or nothing), so ``Trainer.fit(ckpt_path=...)``,
``load_from_checkpoint`` and the spawn launchers' return of the trained weights to the main
process work after any number of growth and shrink events.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from iso_lightning import operations
from iso_lightning.operations import SurgeryReport
from iso_lightning.optim import OptimizerArg
from iso_lightning.providers import find_spaces
from iso_lightning.spaces import NeuronSpace
from iso_lightning.topology import (
    TOPOLOGY_KEY,
    check_record,
    load_state_dict_resized,
    record_from_state_dict,
    reshape,
    topology_record,
)

__all__ = ["FIT_RESULTS_KEY", "TOPOLOGY_KEY", "IsotropicModuleMixin", "register_results_sink"]

#: State-dict key under which rank 0 of a spawn launcher sends the callbacks' history to the main process.
FIT_RESULTS_KEY = "iso_lightning_fit_results"

# Objects (callbacks) that take results sent back from a spawned worker, by their id.
_SINKS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_results_sink(uid: str, sink: Any) -> None:
    """Let ``sink.receive_fit_results(state)`` take the state a spawned worker's copy of it sent back."""
    _SINKS[uid] = sink


class IsotropicModuleMixin:
    """Neuron spaces, topology and shape-safe checkpoints for a ``LightningModule``."""

    # The finder descends into this module instead of asking it for spaces (it collects them).
    _collects_neuron_spaces = True

    def neuron_spaces(self) -> Dict[str, NeuronSpace]:
        """Every hidden space of the model, by full name (``{"net.hidden.0": NeuronSpace, ...}``)."""
        assert isinstance(self, nn.Module)
        return find_spaces(self, kind="hidden")

    def topology(self) -> Dict[str, Any]:
        """The width and groups of every space (hidden, input, output): plain, JSON-safe data."""
        assert isinstance(self, nn.Module)
        return topology_record(find_spaces(self))

    def topology_summary(self) -> Dict[str, Any]:
        """``{space: width}``, the total hidden width and the parameter count: what to show a person."""
        assert isinstance(self, nn.Module)
        widths = {name: space.width for name, space in self.neuron_spaces().items()}
        return {"widths": widths, "total_hidden": sum(widths.values()),
                "parameters": sum(p.numel() for p in self.parameters())}

    def psi_regularisation(self) -> Tensor:
        """Sum of the providers' psi penalties (``psi="decay"``); add it to the training loss."""
        assert isinstance(self, nn.Module)
        total: Optional[Tensor] = None
        counted: List[str] = []
        for path, module in self.named_modules():
            if module is self or any(path.startswith(p + ".") for p in counted):
                continue
            penalty = getattr(module, "regularisation", None)
            if callable(penalty) and not getattr(type(module), "_collects_neuron_spaces", False):
                counted.append(path)
                value = penalty()
                total = value if total is None else total + value
        return torch.zeros(()) if total is None else total

    def set_widths(self, widths: Mapping[str, int], *, optimizer: OptimizerArg = None,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> List[SurgeryReport]:
        """Resize spaces by full name, all or nothing (spaces read later first; see the order rule)."""
        spaces = self.neuron_spaces()
        scale = {name: float(getattr(space.owner, "growth_scale", 0.01)) for name, space in spaces.items()}
        return operations.set_widths(spaces, widths, optimizer=optimizer, generator=generator, on_unknown=on_unknown,
                                     scale=scale)

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[TOPOLOGY_KEY] = self.topology()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Check the checkpoint's topology record against its state dict (the weights load, resized, next)."""
        record = checkpoint.get(TOPOLOGY_KEY)
        state = checkpoint.get("state_dict")
        if record is not None:
            assert isinstance(self, nn.Module)
            spaces = find_spaces(self)
            entries = check_record(spaces, record)
            if isinstance(state, Mapping):
                actual = record_from_state_dict(spaces, state)
                differ = {name: {"record": entries[name], "state_dict": entry} for name, entry in actual.items()
                          if entry["width"] != entries[name]["width"] or
                          (entries[name]["groups"] is not None and entry["groups"] != entries[name]["groups"])}
                if differ:
                    raise ValueError(
                        f"The checkpoint's topology record does not match its state dict (nothing was changed): "
                        f"{differ}."
                    )
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def apply_topology(self, record: Mapping[str, Any]) -> None:
        """Resize every space to a record of :meth:`topology` (values are left for a state dict).

        Every entry is checked before anything changes; a record of another architecture raises
        ``ValueError`` naming the spaces.
        """
        assert isinstance(self, nn.Module)
        spaces = find_spaces(self)
        reshape(spaces, check_record(spaces, record))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that first resizes every neuron space to the state dict's widths.

        Everything is checked before anything changes (see
        :func:`~iso_lightning.topology.load_state_dict_resized`).
        """
        state: OrderedDict[str, Any] = OrderedDict(state_dict)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            state._metadata = metadata  # type: ignore[attr-defined]
        results = state.pop(FIT_RESULTS_KEY, None)
        parent = super().load_state_dict  # type: ignore[misc]
        outcome = load_state_dict_resized(self, state, strict=strict, assign=assign,  # type: ignore[arg-type]
                                          load=lambda sd, strict, assign: parent(sd, strict=strict, assign=assign))
        if isinstance(results, Mapping):
            for uid, value in results.items():
                sink = _SINKS.get(uid)
                if sink is not None:
                    sink.receive_fit_results(value)
        return outcome

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        pending = self.__dict__.pop("_iso_fit_results", None)
        if pending and not kwargs.get("prefix") and len(args) < 2:
            out[FIT_RESULTS_KEY] = pending
        return out

    def send_fit_results(self, uid: str, state: Any) -> None:
        """Attach ``state`` to the next ``state_dict()`` (what a spawn launcher returns to the main process)."""
        self.__dict__.setdefault("_iso_fit_results", {})[uid] = state
