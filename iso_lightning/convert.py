"""Adopt existing models: declare neuron spaces on modules you already have, without changing them.

Two ways, both leaving the model's classes, ``Parameter`` objects, state-dict keys, outputs and
optimizer exactly as they were (a declaration only tells the library which tensors form a space):

- :func:`convert` finds every ``Linear -> activation -> Linear`` (or ``Conv -> activation -> Conv``)
  chain in the model's ``nn.Sequential`` containers, optionally with dropout between, and declares
  a space on each: ``nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))`` gets the space
  ``"hidden.0"``. The activation is one of ``torch.nn``'s activation modules or an
  :class:`~iso_lightning.IsotropicActivation`; a norm or a reshape between two layers is no chain.
- :func:`declare_space` declares one space on a custom module by the paths of its submodules, for
  a block whose ``forward`` calls ``fc1``, ``act`` and ``fc2``.

An activation can be an :class:`~iso_lightning.IsotropicActivation` (an isotropic space: any
rotation inside each group is a symmetry) or an elementwise one with ``f(0) = 0`` (GELU, SiLU, ReLU,
tanh, ... : an elementwise space, the group-size-1 case; see :mod:`iso_lightning.operations` for
what growth and removal guarantee there). Activations with ``f(0) != 0`` (sigmoid, softplus) are
refused: a grown neuron would change the output. Declarations are not part of the state dict:
declare again when you build the model (in the LightningModule's ``__init__``), before a checkpoint
is loaded.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, TypeVar, Union

from torch import Tensor, nn

from iso_lightning.activations import IsotropicActivation
from iso_lightning.layers import IsoConv2d, IsoLinear
from iso_lightning.providers import DECLARATIONS, SpaceDeclaration, declared_spaces
from iso_lightning.spaces import NeuronSpace, dense_space

__all__ = ["convert", "declare_space"]

_M = TypeVar("_M", bound=nn.Module)

_DENSE = (nn.Linear, IsoLinear)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, IsoConv2d)
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


def _submodule(module: nn.Module, path: str, what: str) -> nn.Module:
    if not isinstance(path, str) or not path:
        raise ValueError(f"Expected argument `{what}` to be the path of a submodule, but got {path!r}.")
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"Expected argument `{what}` to name a submodule of {type(module).__name__}, but {path!r} is not one "
            f"(its children are {children})."
        ) from None


def _check_layers(producer: nn.Module, consumer: nn.Module, producer_path: str, consumer_path: str) -> None:
    for module, path in ((producer, producer_path), (consumer, consumer_path)):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise ValueError(f"Expected `{path}` to be a dense or convolutional layer with a weight, but it is "
                             f"{type(module).__name__}.")
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"Expected `{path}` to be an ungrouped layer, but it has groups={module.groups}.")
    out_width, in_width = producer.weight.shape[0], consumer.weight.shape[1]  # type: ignore[union-attr,index]
    if out_width != in_width:
        raise ValueError(
            f"Expected `{consumer_path}` to read the {out_width} outputs of `{producer_path}`, but it takes {in_width} "
            "inputs."
        )


def declare_space(module: nn.Module, producer: str, consumer: str, activation: Union[None, str, nn.Module] = None,
                  *, name: str = "hidden") -> NeuronSpace:
    """Declare that ``module.<producer>`` produces a neuron space, ``activation`` acts on it and
    ``module.<consumer>`` reads it; returns the space (named ``name`` inside ``module``).

    ``activation`` is the path of the activation submodule, or the activation itself when
    ``forward`` applies a function such as ``F.gelu`` inline (pass ``nn.GELU()``).

    Example:
        >>> import torch
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
        ...     def forward(self, x):
        ...         return x + self.fc2(self.act(self.fc1(x)))
        >>> block = Block()
        >>> declare_space(block, "fc1", "fc2", "act").width
        32
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"Expected argument `module` to be an nn.Module, but got {type(module).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected argument `name` to be a non-empty str, but got {name!r}.")
    existing: List[SpaceDeclaration] = list(getattr(module, DECLARATIONS, []))
    if any(d.name == name for d in existing):
        raise ValueError(f"Expected a new space name, but {type(module).__name__} already declares {name!r}.")
    first, second = _submodule(module, producer, "producer"), _submodule(module, consumer, "consumer")
    if any(d.producer == producer for d in existing):
        raise ValueError(f"Expected `{producer}` to produce one space, but {type(module).__name__} already "
                         "declares it.")
    _check_layers(first, second, producer, consumer)
    if isinstance(activation, str):
        act = _submodule(module, activation, "activation")
        decl = SpaceDeclaration(name, producer, consumer, activation)
    elif isinstance(activation, nn.Module):
        act = activation
        decl = SpaceDeclaration(name, producer, consumer, None, activation)
    else:
        raise ValueError(f"Expected argument `activation` to be a submodule path or an nn.Module, but got "
                         f"{activation!r}.")
    dense_space(name, first, act, second)  # refuses an activation that cannot act on a space, before storing
    setattr(module, DECLARATIONS, existing + [decl])
    return declared_spaces(module)[name]


def _is_activation(module: nn.Module) -> bool:
    """An activation module: one of ``torch.nn``'s activations or an isotropic one (not a norm, a reshape, ...)."""
    if isinstance(module, IsotropicActivation):
        return True
    return type(module).__module__ == nn.modules.activation.__name__ and not isinstance(module, nn.MultiheadAttention)


def _chains(container: nn.Sequential) -> List[Tuple[str, str, str]]:
    """``(producer, activation, consumer)`` child names of every layer -> activation -> layer chain."""
    children = list(container.named_children())
    found = []
    for i, (first, layer) in enumerate(children):
        if not isinstance(layer, _DENSE + _CONV):
            continue
        j = i + 1
        if j >= len(children) or not _is_activation(children[j][1]):
            continue
        act_name, act = children[j]
        k = j + 1
        while k < len(children) and isinstance(children[k][1], _PASS_THROUGH):
            k += 1
        if k < len(children) and isinstance(children[k][1], _DENSE + _CONV) and (
                isinstance(layer, _DENSE) == isinstance(children[k][1], _DENSE)):
            found.append((first, act_name, children[k][0]))
    return found


def convert(model: _M, *, skip_unsupported: bool = False) -> _M:
    """Declare a neuron space on every ``layer -> activation -> layer`` chain of ``model``'s ``nn.Sequential``
    containers (at any depth, ``model`` included); returns ``model`` itself, unchanged otherwise.

    The spaces of one container are named ``"hidden.0"``, ``"hidden.1"``, ... in order (found as
    ``"<container path>.hidden.<k>"``). An activation that cannot form a space (``f(0) != 0``, or
    not elementwise) raises ``ValueError`` naming it, and nothing is declared, unless
    ``skip_unsupported`` (then that chain is left as it is). A model with no such chain at all
    raises ``ValueError``. Converting a model again declares only the chains it does not declare
    yet.

    Example:
        >>> import torch
        >>> from iso_lightning import find_spaces
        >>> mlp = convert(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)))
        >>> sorted(find_spaces(mlp))
        ['hidden.0']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
    chains = 0
    before: List[Tuple[nn.Module, Optional[List[SpaceDeclaration]]]] = []
    for path, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        declared = getattr(container, DECLARATIONS, None)
        before.append((container, declared))
        count = len(declared or [])
        for producer, act, consumer in _chains(container):
            chains += 1
            if any(d.producer == producer for d in declared or []):
                continue  # converted before
            try:
                declare_space(container, producer, consumer, act, name=f"hidden.{count}")
            except ValueError as err:
                if skip_unsupported:
                    continue
                for module, old in before:  # all or nothing: drop what this call declared
                    if old is None:
                        module.__dict__.pop(DECLARATIONS, None)
                    else:
                        setattr(module, DECLARATIONS, old)
                where = f"{path}.{act}" if path else act
                kind = type(container.get_submodule(act)).__name__
                raise ValueError(f"Cannot convert the chain at `{where}` ({kind}): {err}") from None
            count += 1
    if not chains:
        raise ValueError(
            f"Expected {type(model).__name__} to contain a Linear -> activation -> Linear (or Conv -> activation -> "
            "Conv) chain in an nn.Sequential (the activation one of torch.nn's activation modules or an "
            "IsotropicActivation), but found none: there is nothing to convert. Declare the spaces of a custom module "
            "with `iso_lightning.declare_space`."
        )
    return model

