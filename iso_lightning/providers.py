"""Where neuron spaces come from: providers, declarations, and finding every space of a model.

A **provider** is any ``nn.Module`` with a ``neuron_spaces()`` method that returns its own spaces
under local names (:class:`NeuronSpaceProvider`): :class:`~iso_lightning.IsotropicMLP`,
:class:`~iso_lightning.IsotropicConvNet` and :class:`~iso_lightning.IsotropicFFN` are providers, and
so is your own module once it implements the method. A module can also carry **declarations**
(:func:`~iso_lightning.declare_space`, :func:`~iso_lightning.convert`): "``fc1`` produces a space,
``act`` acts on it, ``fc2`` reads it", without changing its class.

:func:`find_spaces` walks a model (a LightningModule, or any module) and returns every space of
every provider and declaration at any depth, named by module path from the root
(``"blocks.3.ffn.hidden"``); the tensors' paths are their state-dict keys. A space reached twice
(an outer provider that also reports an inner one's spaces) is listed once, under the outer name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor, nn

from iso_lightning.spaces import NeuronSpace, dense_space

__all__ = ["DECLARATIONS", "NeuronSpaceProvider", "SpaceDeclaration", "declared_spaces", "find_spaces"]

#: Attribute of a module holding its :class:`SpaceDeclaration` list.
DECLARATIONS = "_iso_lightning_spaces"


@runtime_checkable
class NeuronSpaceProvider(Protocol):
    """A module that declares its neuron spaces.

    ``neuron_spaces()`` returns ``{local name: NeuronSpace}``, built fresh from the module's current
    tensors (for instance with :func:`~iso_lightning.spaces.dense_space`), with binding paths relative
    to the module. Names must be stable across calls and across processes: they key checkpoints
    and policies.
    """

    def neuron_spaces(self) -> Mapping[str, NeuronSpace]: ...


@dataclass(frozen=True)
class SpaceDeclaration:
    """A space declared on a module by submodule paths: ``producer`` -> ``activation`` -> ``consumer``.

    ``activation`` is a submodule path, or ``None`` with ``activation_module`` the function applied in
    ``forward`` (an ``nn.GELU()`` standing for an inline ``F.gelu``).
    """

    name: str
    producer: str
    consumer: str
    activation: Optional[str] = None
    activation_module: Optional[nn.Module] = None


def _hidden_by_hook(owner: nn.Module, activation: nn.Module, channel_axis: int):  # type: ignore[no-untyped-def]
    """Inputs of ``owner`` -> the activation's outputs as ``(samples, width)``, through a forward hook."""

    def hidden(inputs: Tensor) -> Tensor:
        captured: List[Tensor] = []
        handle = activation.register_forward_hook(lambda m, args, out: captured.append(out))
        try:
            owner(inputs)
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"The activation {type(activation).__name__} was not called by {type(owner).__name__}.")
        out = captured[0]
        return out.movedim(channel_axis, -1).reshape(-1, out.shape[channel_axis])

    return hidden


def declared_spaces(module: nn.Module) -> Dict[str, NeuronSpace]:
    """The spaces declared on ``module`` (local names, paths relative to it)."""
    out: Dict[str, NeuronSpace] = {}
    for decl in getattr(module, DECLARATIONS, ()):
        producer = module.get_submodule(decl.producer)
        consumer = module.get_submodule(decl.consumer)
        activation = module.get_submodule(decl.activation) if decl.activation is not None else decl.activation_module
        hidden = None
        if decl.activation is not None and activation is not None:
            weight = getattr(producer, "weight", None)
            axis = -1 if isinstance(weight, Tensor) and weight.dim() == 2 else 1
            hidden = _hidden_by_hook(module, activation, axis)
        out[decl.name] = dense_space(decl.name, producer, activation, consumer, producer_path=decl.producer,
                                     consumer_path=decl.consumer, activation_path=decl.activation or "",
                                     owner=module, hidden=hidden)
    return out


def _identity(space: NeuronSpace) -> Tuple[int, str, int]:
    first = next(space.neuron_bindings())
    return id(first.module), first.name, first.axis


def find_spaces(root: nn.Module, kind: Optional[str] = None) -> Dict[str, NeuronSpace]:
    """Every neuron space of ``root`` by full name (``kind="hidden"``: only those that grow and shrink).

    Example:
        >>> import torch
        >>> from iso_lightning import IsotropicMLP
        >>> model = torch.nn.ModuleDict({"net": IsotropicMLP([4, 6, 3])})
        >>> sorted(find_spaces(model, kind="hidden"))
        ['net.hidden.0']
        >>> find_spaces(model)["net.hidden.0"].weight_in.path
        'net.layers.0.weight'
    """
    found: Dict[str, NeuronSpace] = {}
    seen = set()
    for path, module in root.named_modules():
        local: Dict[str, NeuronSpace] = {}
        if getattr(module, DECLARATIONS, None):
            local.update(declared_spaces(module))
        provides = getattr(module, "neuron_spaces", None)
        if callable(provides) and not getattr(type(module), "_collects_neuron_spaces", False):
            local.update(provides())
        prefix = f"{path}." if path else ""
        for space in local.values():
            key = _identity(space)
            if key in seen:
                continue
            seen.add(key)
            full = space.renamed(prefix)
            if full.name in found:
                raise ValueError(f"Two neuron spaces of {type(root).__name__} are both named `{full.name}`.")
            if kind is None or full.kind == kind:
                found[full.name] = full
    return found
