r"""Neuron spaces: a hidden (or input, or output) axis, every tensor indexed by it, and its activation.

A :class:`NeuronSpace` lists :class:`Binding` objects. Each names a tensor attribute of a module,
the axis of it that belongs to the space, and its :class:`Role`: the rows that *produce* the space
(``WEIGHT_IN``, ``BIAS_IN``, ``CORRECTION_IN``), the columns that *read* it (``WEIGHT_OUT``), the
per-group tensors (``LENGTH``, ``CORRECTION_OUT``) and the next layer's bias (``BIAS_OUT``), into
which the constant output of a removed neuron is folded. Operations in
:mod:`iso_lightning.operations` are written once against this description; a dense layer, a
convolution, a transformer's feed-forward block and a converted ``nn.Sequential`` differ only in
their bindings.

The space's :class:`SpaceActivation` says which changes of basis keep the function:

- :class:`IsotropicSpaceActivation` (an :class:`~iso_lightning.IsotropicActivation`): any rotation
  inside each group of neurons;
- :class:`ElementwiseSpaceActivation` (``nn.GELU``, ``nn.Tanh``, ``nn.ReLU``, ...): the
  group-size-1 case. Every neuron is its own group, only permutations are symmetries, and a
  group's "singular value" is the norm of its incoming row.

.. math::

    A = [W_{in} \mid \psi_{in}], \qquad \text{one row per neuron: the incoming matrix.}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from iso_lightning.activations import IsotropicActivation
from iso_lightning.functional import radial_scale
from iso_lightning.transaction import Transaction

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "Binding",
    "ElementwiseSpaceActivation",
    "IsotropicSpaceActivation",
    "NeuronSpace",
    "Role",
    "SpaceActivation",
    "space_activation",
]


class Role(str, Enum):
    """What a bound tensor is to its space."""

    #: Rows of the weight that produces the space (its output axis indexes the space).
    WEIGHT_IN = "weight_in"
    #: The producing layer's bias.
    BIAS_IN = "bias_in"
    #: The producing layer's linear correction psi (rows; its other axis indexes the previous groups).
    CORRECTION_IN = "correction_in"
    #: Columns of the weight that reads the space.
    WEIGHT_OUT = "weight_out"
    #: The reading layer's correction psi: its axis indexes the space's *groups*.
    CORRECTION_OUT = "correction_out"
    #: The intrinsic length ``o``, one entry per group.
    LENGTH = "length"
    #: The reading layer's bias: not indexed by the space; removed neurons' constant outputs go there.
    BIAS_OUT = "bias_out"


#: Roles whose axis indexes neurons; the producers among them.
NEURON_ROLES = (Role.WEIGHT_IN, Role.BIAS_IN, Role.CORRECTION_IN, Role.WEIGHT_OUT)
PRODUCER_ROLES = (Role.WEIGHT_IN, Role.BIAS_IN, Role.CORRECTION_IN)
#: Roles whose axis indexes groups.
GROUP_ROLES = (Role.LENGTH, Role.CORRECTION_OUT)


@dataclass(frozen=True)
class Binding:
    """Axis ``axis`` of ``getattr(module, name)`` belongs to a space, ``inner`` entries per neuron.

    ``inner > 1`` describes a flattened channel-major axis: a dense layer after a convolution sees
    ``C * H * W`` inputs, ``H * W`` of them per channel. ``path`` is the tensor's name from the
    model root (its state-dict key), set when the space is found.
    """

    module: nn.Module
    name: str
    axis: int
    inner: int = 1
    role: Role = Role.WEIGHT_IN
    path: str = ""

    @property
    def tensor(self) -> Tensor:
        value = getattr(self.module, self.name)
        if not isinstance(value, Tensor):
            raise ValueError(f"Expected `{self.label}` to be a tensor, but it is {type(value).__name__}.")
        return value

    @property
    def label(self) -> str:
        """The tensor's name in messages: its path, or ``Module.name`` before the space is found."""
        return self.path or f"{type(self.module).__name__}.{self.name}"

    def size(self) -> int:
        return self.tensor.shape[self.axis] // self.inner

    def view(self, t: Tensor) -> Tensor:
        """``t`` as ``(pre, n, rest)`` (a view when ``t`` is contiguous)."""
        shape = t.shape
        pre = math.prod(shape[: self.axis])
        n = shape[self.axis] // self.inner
        rest = self.inner * math.prod(shape[self.axis + 1 :])
        return t.reshape(pre, n, rest)

    def shape_back(self, view: Tensor, like: Sequence[int]) -> Tensor:
        """Inverse of :meth:`view` for a view whose space axis may have a new size."""
        shape = list(like)
        shape[self.axis] = view.shape[1] * self.inner
        return view.reshape(shape).contiguous()

    def shape_for(self, like: Sequence[int], size: int) -> List[int]:
        """The shape of this tensor with ``size`` neurons (or groups) on its axis."""
        shape = list(like)
        shape[self.axis] = size * self.inner
        return shape


# --------------------------------------------------------------------------------- activations
class SpaceActivation:
    """How a space's activation acts: its groups, its symmetries and its output for a constant input."""

    #: The activation module (in the model), if any: what the expectation fold and probes hook.
    module: Optional[nn.Module] = None
    #: Rotations inside a group keep the function (isotropic); otherwise only permutations do.
    rotatable: bool = False
    #: A bound on |f'|: the first-order error estimate of removing a neuron scales with it.
    lipschitz: float = 1.0
    #: f'(0) != 0: a neuron grown with a zero incoming row learns (false for ReLU).
    grows_from_zero_row: bool = True

    def group_index(self, width: int) -> Tensor:
        raise NotImplementedError

    def groups(self, width: int) -> int:
        raise NotImplementedError

    def set_group_index(self, index: Optional[Tensor], tx: Transaction) -> None:
        """Record a new partition (isotropic spaces; elementwise spaces have nothing to record)."""

    def length(self) -> Optional[Tensor]:
        """The effective intrinsic length per group, or ``None``."""
        return None

    def constant_scales(self, bias: Tensor, groups: Tensor, count: int) -> Tensor:
        r"""The per-group scale :math:`s_g` for constant pre-activations ``bias`` (neurons of groups
        ``groups``); a whole group then outputs :math:`s_g\, b_g`."""
        raise NotImplementedError


class IsotropicSpaceActivation(SpaceActivation):
    """An :class:`~iso_lightning.IsotropicActivation`: rotations inside each group are symmetries."""

    rotatable = True

    def __init__(self, module: IsotropicActivation) -> None:
        self.module = module
        self.activation = module

    def group_index(self, width: int) -> Tensor:
        index = self.activation.group_index
        if index is None:
            return torch.zeros(width, dtype=torch.long)
        return index.cpu()

    def groups(self, width: int) -> int:
        return self.activation.groups

    def set_group_index(self, index: Optional[Tensor], tx: Transaction) -> None:
        if self.activation.group_index is None and index is not None and bool((index == 0).all()):
            return  # one group stays implicit
        if index is not None:
            device = self.activation.group_index.device if self.activation.group_index is not None else (
                self.activation.length.device if self.activation.length is not None else None)
            index = index.to(device=device, dtype=torch.long)
        tx.set_attr(self.activation, "group_index", index)

    def length(self) -> Optional[Tensor]:
        return self.activation.effective_length()

    def constant_scales(self, bias: Tensor, groups: Tensor, count: int) -> Tensor:
        q = torch.zeros(count, dtype=torch.float64).index_add(0, groups, bias.double() ** 2)
        length = self.length()
        if length is not None:
            q = q + length.detach().double().cpu()
        return radial_scale(q, self.activation.profile)


@dataclass(frozen=True)
class _Elementwise:
    lipschitz: float
    zero_slope: bool = False


#: Elementwise activations a space can have (f(0) = 0), with a bound on |f'| (the first-order error
#: estimate of a removal) and whether f'(0) = 0 (then a grown neuron needs a non-zero incoming row).
ELEMENTWISE_ACTIVATIONS: Dict[Type[nn.Module], _Elementwise] = {
    nn.Tanh: _Elementwise(1.0),
    nn.Softsign: _Elementwise(1.0),
    nn.Hardtanh: _Elementwise(1.0),
    nn.Tanhshrink: _Elementwise(1.0, zero_slope=True),
    nn.GELU: _Elementwise(1.13),
    nn.SiLU: _Elementwise(1.1),
    nn.Mish: _Elementwise(1.09),
    nn.Hardswish: _Elementwise(1.5),
    nn.ReLU: _Elementwise(1.0, zero_slope=True),
    nn.ReLU6: _Elementwise(1.0, zero_slope=True),
    nn.LeakyReLU: _Elementwise(1.0),
    nn.ELU: _Elementwise(1.0),
    nn.CELU: _Elementwise(1.0),
    nn.SELU: _Elementwise(1.76),
}


class ElementwiseSpaceActivation(SpaceActivation):
    """An elementwise activation ``f`` with ``f(0) = 0``: every neuron is its own group."""

    def __init__(self, module: nn.Module) -> None:
        info = ELEMENTWISE_ACTIVATIONS.get(type(module))
        at_zero: Optional[Tensor] = None
        if info is not None or type(module).__module__ == nn.modules.activation.__name__:
            try:  # f(0) first: the reason a sigmoid or softplus cannot form a space
                with torch.no_grad():
                    at_zero = module(torch.zeros(3, dtype=torch.float64))
            except Exception:
                at_zero = None
        if isinstance(at_zero, Tensor) and at_zero.numel() and bool((at_zero != 0).any()):
            raise ValueError(
                f"Expected an activation with f(0) = 0, but {module!r} gives f(0) = {float(at_zero.flatten()[0]):g}: "
                "a grown neuron would change the output. Such activations cannot form a neuron space."
            )
        if info is None:
            supported = sorted(c.__name__ for c in ELEMENTWISE_ACTIVATIONS)
            raise ValueError(
                f"Expected an activation of a neuron space to be an IsotropicActivation or one of {supported}, "
                f"but got {type(module).__name__}."
            )
        self.module = module
        slope = getattr(module, "negative_slope", None)
        alpha = getattr(module, "alpha", None)
        self.lipschitz = max(info.lipschitz, abs(float(slope or 0.0)), float(alpha or 0.0))
        self.grows_from_zero_row = not info.zero_slope

    def group_index(self, width: int) -> Tensor:
        return torch.arange(width)

    def groups(self, width: int) -> int:
        return width

    def outputs(self, bias: Tensor) -> Tensor:
        """``f(b)`` for constant pre-activations ``b`` (float64)."""
        assert self.module is not None
        with torch.no_grad():
            return self.module(bias.double()).double()

    def constant_scales(self, bias: Tensor, groups: Tensor, count: int) -> Tensor:
        b = bias.double()
        out = self.outputs(b)
        # f(b) = s b; for b = 0 the output is 0 whatever s is.
        safe = torch.where(b == 0, torch.ones_like(b), b)
        return torch.zeros(count, dtype=torch.float64).index_add(0, groups, torch.where(b == 0, 0.0, out / safe))


def space_activation(module: nn.Module) -> SpaceActivation:
    """The :class:`SpaceActivation` of an activation module (refuses those with ``f(0) != 0``)."""
    if isinstance(module, IsotropicActivation):
        return IsotropicSpaceActivation(module)
    return ElementwiseSpaceActivation(module)


# --------------------------------------------------------------------------------- the space
@dataclass
class NeuronSpace:
    """The tensors of one neuron space, by role, and the activation that acts on it.

    Attributes:
        name: the space's name from the model root (``"net.hidden.0"``, ``"blocks.3.ffn.hidden"``);
            a provider's own spaces use local names (``"hidden.0"``).
        bindings: every tensor indexed by the space (see :class:`Role`).
        activation: how the activation acts (``None`` for the input and output spaces).
        kind: ``"hidden"``, ``"input"`` or ``"output"``: only hidden spaces grow and shrink.
        owner: the module whose output a ``probe`` measures (the provider).
        hidden: maps inputs of ``owner`` to this space's activations, ``(samples, width)`` (for the
            expectation fold).
        activation_path: the activation module's path (its ``group_index`` buffer is part of the state).
    """

    name: str
    bindings: List[Binding] = field(default_factory=list)
    activation: Optional[SpaceActivation] = None
    kind: str = "hidden"
    owner: Optional[nn.Module] = None
    hidden: Optional[Callable[[Tensor], Tensor]] = None
    activation_path: str = ""

    # -- bindings by role ------------------------------------------------------------------------
    def role(self, role: Role) -> List[Binding]:
        return [b for b in self.bindings if b.role == role]

    def first(self, role: Role) -> Optional[Binding]:
        for b in self.bindings:
            if b.role == role:
                return b
        return None

    @property
    def weight_in(self) -> Optional[Binding]:
        return self.first(Role.WEIGHT_IN)

    @property
    def bias(self) -> Optional[Binding]:
        return self.first(Role.BIAS_IN)

    @property
    def correction_in(self) -> Optional[Binding]:
        return self.first(Role.CORRECTION_IN)

    @property
    def weight_out(self) -> Optional[Binding]:
        return self.first(Role.WEIGHT_OUT)

    @property
    def correction_out(self) -> Optional[Binding]:
        return self.first(Role.CORRECTION_OUT)

    def neuron_bindings(self) -> Iterator[Binding]:
        """Bindings whose axis indexes neurons (producers first)."""
        for b in self.bindings:
            if b.role in NEURON_ROLES:
                yield b

    def group_bindings(self) -> List[Binding]:
        """Bindings whose axis indexes groups (``o``, the next correction)."""
        return [b for b in self.bindings if b.role in GROUP_ROLES]

    def out_bias_of(self, consumer: Binding) -> Optional[Binding]:
        """The ``BIAS_OUT`` binding of the module that ``consumer`` belongs to."""
        for b in self.role(Role.BIAS_OUT):
            if b.module is consumer.module:
                return b
        return None

    def tensors(self) -> List[Tuple[str, Tensor]]:
        """Every tensor the operations change, with its name (for checks and messages)."""
        seen: Dict[int, Tuple[str, Tensor]] = {}
        for b in self.bindings:
            seen[id(b.tensor)] = (b.label, b.tensor)
        return list(seen.values())

    # -- shape -------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        first = next(self.neuron_bindings(), None)
        if first is None:
            raise ValueError(f"Space `{self.name}` has no tensor indexed by its neurons.")
        return first.size()

    def groups(self) -> int:
        return 1 if self.activation is None else self.activation.groups(self.width)

    def group_index(self) -> Tensor:
        """The group of every neuron (zeros for a single group)."""
        if self.activation is None:
            return torch.zeros(self.width, dtype=torch.long)
        return self.activation.group_index(self.width)

    def group_sizes(self) -> Tensor:
        return torch.bincount(self.group_index(), minlength=self.groups())

    @property
    def singleton_groups(self) -> bool:
        """Every group is one neuron (an elementwise space, or group size 1): shrink removes whole groups."""
        return self.activation is not None and self.groups() == self.width

    @property
    def min_width(self) -> int:
        """The narrowest width a shrink can leave: one neuron per group, or one neuron."""
        return 1 if self.singleton_groups else max(1, self.groups())

    def incoming_matrix(self, rows: Optional[Tensor] = None) -> Tensor:
        r"""The matrix :math:`A = [W_{in} \mid \psi_{in}]` whose rows produce the space (one row per neuron).

        A neuron whose row of ``A`` is zero has a constant pre-activation (its bias), which is what
        makes its removal exact. The correction is included so that this stays true when psi is on.
        ``rows``: only these rows (in that order), without assembling the rest.
        """
        parts = [part if rows is None else part[rows.to(part.device)] for part in self._incoming_parts()]
        if len(parts) == 1:
            return parts[0]
        dtype = parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def _incoming_parts(self) -> List[Tensor]:
        parts = []
        for b in self.bindings:
            if b.role in (Role.WEIGHT_IN, Role.CORRECTION_IN):
                t = b.tensor.detach()
                parts.append(b.view(t).permute(1, 0, 2).reshape(t.shape[b.axis] // b.inner, -1))
        if not parts:
            raise ValueError(f"Space `{self.name}` has no incoming weight.")
        return parts

    def zero_rows(self) -> Tensor:
        """Ascending indices of the neurons whose row of :meth:`incoming_matrix` is exactly zero.

        Reads only the first entry of every row and the whole of the rows where it is zero (a trained
        layer has hardly any), so it costs next to nothing where there are none.
        """
        parts = self._incoming_parts()
        first = parts[0]
        if first.shape[1] == 0:
            candidates = torch.arange(first.shape[0], device=first.device)
        else:
            candidates = torch.nonzero(first[:, 0] == 0).flatten()
        for part in parts:
            if not candidates.numel():
                break
            candidates = candidates[~part[candidates].ne(0).any(dim=1)]
        return candidates.cpu()

    def renamed(self, prefix: str) -> NeuronSpace:
        """This space with ``prefix`` before its name and its tensors' paths (``"net."``)."""
        bindings = [Binding(b.module, b.name, b.axis, b.inner, b.role, prefix + b.path if b.path else "")
                    for b in self.bindings]
        return NeuronSpace(prefix + self.name, bindings, self.activation, self.kind, self.owner, self.hidden,
                           prefix + self.activation_path if self.activation_path else "")


def dense_space(name: str, producer: nn.Module, activation: Optional[nn.Module], consumer: Optional[nn.Module], *,
                producer_path: str = "", consumer_path: str = "", activation_path: str = "", inner: int = 1,
                kind: str = "hidden", owner: Optional[nn.Module] = None,
                hidden: Optional[Callable[[Tensor], Tensor]] = None) -> NeuronSpace:
    """The space between a producing layer and a consuming layer (``weight``, ``bias``, ``correction``).

    Works for ``nn.Linear``, ``nn.Conv*`` and the isotropic layers: the producer's output axis (0)
    and the consumer's input axis (1) index the space. ``*_path`` are the modules' paths from the
    provider (for messages and state-dict keys).
    """

    def path(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else ""

    bindings: List[Binding] = []

    def bind(module: Optional[nn.Module], attr: str, axis: int, role: Role, prefix: str, inner_: int = 1) -> None:
        if module is not None and isinstance(getattr(module, attr, None), Tensor):
            bindings.append(Binding(module, attr, axis, inner_, role, path(prefix, attr)))

    bind(producer, "weight", 0, Role.WEIGHT_IN, producer_path)
    bind(producer, "bias", 0, Role.BIAS_IN, producer_path)
    bind(producer, "correction", 0, Role.CORRECTION_IN, producer_path)
    bind(consumer, "weight", 1, Role.WEIGHT_OUT, consumer_path, inner)
    bind(consumer, "correction", 1, Role.CORRECTION_OUT, consumer_path, inner)
    bind(consumer, "bias", 0, Role.BIAS_OUT, consumer_path)
    act = None
    if activation is not None:
        act = space_activation(activation)
        if isinstance(act, IsotropicSpaceActivation):
            bind(activation, "length", 0, Role.LENGTH, activation_path)
    return NeuronSpace(name, bindings, act, kind, owner, hidden, activation_path)
