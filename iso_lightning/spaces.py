"""Neuron spaces: a hidden (or input, or output) axis and every tensor that is indexed by it.

A :class:`NeuronSpace` lists :class:`Binding` objects, each naming a tensor attribute of a module
and the axis of it that belongs to the space. Operations in :mod:`iso_lightning.surgery` are written
once against this description; dense and convolutional layers only differ in the bindings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from iso_lightning.activations import IsotropicActivation

__all__ = ["Binding", "NeuronSpace"]


@dataclass(frozen=True)
class Binding:
    """Axis ``axis`` of ``getattr(module, name)`` indexes the space, ``inner`` entries per neuron.

    ``inner > 1`` describes a flattened channel-major axis: a dense layer after a convolution sees
    ``C * H * W`` inputs, ``H * W`` of them per channel.
    """

    module: nn.Module
    name: str
    axis: int
    inner: int = 1

    @property
    def tensor(self) -> Tensor:
        value = getattr(self.module, self.name)
        assert isinstance(value, Tensor)
        return value

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


@dataclass
class NeuronSpace:
    """The tensors of one neuron space, by role.

    Attributes:
        name: e.g. ``"hidden.0"``, ``"input"``, ``"output"``.
        kind: ``"hidden"``, ``"input"`` or ``"output"``.
        producers: tensors whose entries along the axis *create* the space's values (rows of the
            incoming weight, the bias, the incoming linear correction). New entries are zero.
        consumers: tensors that *read* the space (columns of the next weight). New entries are
            small random values so that new neurons receive gradient.
        activation: the isotropic activation of a hidden space (holds ``o`` and the groups).
        correction_out: the next layer's linear correction psi; its axis indexes groups.
    """

    name: str
    kind: str
    producers: List[Binding] = field(default_factory=list)
    consumers: List[Binding] = field(default_factory=list)
    activation: Optional[IsotropicActivation] = None
    correction_out: Optional[Binding] = None

    @property
    def width(self) -> int:
        first = (self.producers or self.consumers)[0]
        return first.size()

    @property
    def weight_in(self) -> Optional[Binding]:
        return self.producers[0] if self.producers else None

    @property
    def bias(self) -> Optional[Binding]:
        return self.producers[1] if len(self.producers) > 1 else None

    @property
    def correction_in(self) -> Optional[Binding]:
        return self.producers[2] if len(self.producers) > 2 else None

    @property
    def weight_out(self) -> Optional[Binding]:
        return self.consumers[0] if self.consumers else None

    def neuron_bindings(self) -> Iterator[Tuple[Binding, str]]:
        for b in self.producers:
            yield b, "producer"
        for b in self.consumers:
            yield b, "consumer"

    def group_bindings(self) -> List[Binding]:
        out: List[Binding] = []
        act = self.activation
        if act is not None and act.length is not None:
            out.append(Binding(act, "length", 0))
        if self.correction_out is not None:
            out.append(self.correction_out)
        return out

    def tensors(self) -> List[Tuple[str, Tensor]]:
        """Every tensor of the space with a readable name (for checks and messages)."""
        seen = {}
        for b, _ in self.neuron_bindings():
            seen[id(b.tensor)] = (f"{type(b.module).__name__}.{b.name}", b.tensor)
        for b in self.group_bindings():
            seen[id(b.tensor)] = (f"{type(b.module).__name__}.{b.name}", b.tensor)
        return list(seen.values())

    def groups(self) -> int:
        return 1 if self.activation is None else self.activation.groups

    def group_index(self) -> Tensor:
        """The group of every neuron (zeros for a single group)."""
        index = None if self.activation is None else self.activation.group_index
        if index is None:
            return torch.zeros(self.width, dtype=torch.long)
        return index

    def incoming_matrix(self) -> Tensor:
        r"""The matrix :math:`A = [W_l \mid \psi_{l-1}]` whose rows produce the space (one row per neuron).

        A neuron whose row of ``A`` is zero has a constant pre-activation (its bias), which is what
        makes its removal exact. The correction is included so that this stays true when psi is on.
        """
        parts = []
        for b in (self.weight_in, self.correction_in):
            if b is not None:
                t = b.tensor.detach()
                parts.append(b.view(t).permute(1, 0, 2).reshape(t.shape[b.axis] // b.inner, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
