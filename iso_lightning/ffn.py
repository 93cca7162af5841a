r"""A transformer feed-forward block whose hidden width is a neuron space.

.. math::

    y = W_2\, f(W_1 x + b_1) + b_2 \;(+\, \psi\, s), \qquad x \in \mathbb{R}^{\dots \times d_{model}}

The hidden space binds the rows of ``W_1`` and ``b_1`` and the columns of ``W_2``. With an isotropic
``f`` (grouped: each group of neurons shares one norm) a linear correction ``psi`` (a
``(d_model, groups)`` matrix times the per-group scales, added to ``y``) can make the removal of a
constant neuron exact; with an elementwise ``f`` (``nn.GELU()``) the space is the group-size-1 case.
Layer norms sit on the residual stream, outside the block, so they do not break its symmetry.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning import operations
from iso_lightning._validation import check_choice, check_int
from iso_lightning.activations import IsotropicActivation
from iso_lightning.functional import PROFILES, isotropic_with_scale, scaled_squared_norm
from iso_lightning.layers import INITS, PSI_MODES, IsoLinear, init_weight
from iso_lightning.operations import SurgeryReport, check_scale
from iso_lightning.optim import OptimizerArg
from iso_lightning.spaces import NeuronSpace, dense_space, space_activation

__all__ = ["IsotropicFFN"]

#: The blocked layout (see :meth:`IsotropicFFN.forward`) is used while its padding adds at most this
#: fraction of the width; past it the larger matrix products cost more than the gathers they avoid.
BLOCKED_PADDING = 0.5


class _Layout(NamedTuple):
    """Where the blocked layout puts the neurons: slot ``r * groups + g`` holds the ``r``-th neuron of
    group ``g``. ``slots[k]`` is the neuron in slot ``k`` (``width`` for a padding slot), or ``None``
    when slot ``k`` holds neuron ``k`` and the ``padding`` last slots are empty."""

    slots: Optional[Tensor]
    padding: int
    groups: int
    size: int


def _blocked_layout(index: Tensor) -> Optional[_Layout]:
    width = index.numel()
    if width == 0:
        return None
    groups = int(index.max()) + 1
    sizes = torch.bincount(index, minlength=groups)
    size = int(sizes.max())
    if groups * size > width * (1 + BLOCKED_PADDING):
        return None
    order = torch.argsort(index, stable=True)
    sorted_groups = index[order]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(width, device=index.device) - starts[sorted_groups]
    slots = torch.full((groups * size,), width, dtype=torch.long, device=index.device)
    slots[rank * groups + sorted_groups] = order
    padding = groups * size - width
    if bool((slots[:width] == torch.arange(width, device=index.device)).all()):
        return _Layout(None, padding, groups, size)
    return _Layout(slots, padding, groups, size)


def _interleaved(width: int, group_size: int) -> List[int]:
    """Groups of at most ``group_size`` neurons (as equal as they can be), neuron ``i`` in group ``i mod groups``."""
    groups = -(-width // group_size)
    return [i % groups for i in range(width)]


class IsotropicFFN(nn.Module):
    """``fc2(f(fc1(x)))`` on ``(..., d_model)``, its hidden space ``"hidden"`` a neuron space (a provider).

    Args:
        d_model: width of the residual stream (input and output).
        d_hidden: starting hidden width.
        activation: an isotropic profile (``"tanh"``, ``"softsign"``, ``"gelu"``, ``"swish"``), used
            over groups of ``group_size`` neurons, or an elementwise module with ``f(0) = 0``
            (``nn.GELU()``, ``nn.SiLU()``, ``nn.ReLU()``, ...).
        group_size: neurons per group of an isotropic activation (``None``: one group). The
            ``ceil(d_hidden / group_size)`` groups are interleaved: neuron ``i`` is in group
            ``i mod groups`` (any assignment is the same model up to a permutation of the neurons).
        length: intrinsic length mode of an isotropic activation (``"none"``, ``"constant"``, ``"trainable"``).
        psi: linear correction mode (isotropic activations only), as for :class:`~iso_lightning.IsotropicMLP`.
        psi_decay: weight of :meth:`regularisation` for ``psi="decay"``.
        dropout: dropout on the hidden activations.
        init: weight initialisation (see :data:`~iso_lightning.INITS`); ``"normal"`` is ``N(0, 1/fan_in)``.
        growth_scale: standard deviation of the outgoing weights of new neurons.

    Example:
        >>> import torch
        >>> ffn = IsotropicFFN(16, 64, activation=torch.nn.GELU())
        >>> x = torch.randn(2, 5, 16)
        >>> y = ffn(x)
        >>> _ = ffn.grow(8)
        >>> ffn.width, bool(torch.equal(ffn(x), y))
        (72, True)
    """

    def __init__(self, d_model: int, d_hidden: int, activation: Union[str, nn.Module] = "tanh",
                 group_size: Optional[int] = None, length: str = "none", psi: str = "none", psi_decay: float = 0.1,
                 dropout: float = 0.0, init: str = "default", growth_scale: float = 0.01,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("d_hidden", d_hidden, 1)
        check_choice("psi", psi, PSI_MODES)
        check_choice("init", init, INITS)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"Expected argument `dropout` to be a number in [0, 1), but got {dropout!r}.")
        if isinstance(activation, str):
            check_choice("activation", activation, sorted(PROFILES))
            check_int("group_size", group_size, 1, optional=True)
            # Neuron i joins group i mod groups: the forward pass's blocked layout is then the
            # neurons' own order (no gather), and growth, which fills the smallest groups, keeps it.
            partition = None if group_size is None else _interleaved(d_hidden, group_size)
            act: nn.Module = IsotropicActivation(d_hidden, profile=activation, length=length, partition=partition)
        elif isinstance(activation, nn.Module):
            if group_size is not None or length != "none" or psi != "none":
                raise ValueError("Expected `group_size`, `length` and `psi` at their defaults for an elementwise "
                                 f"activation ({type(activation).__name__}): they belong to isotropic activations.")
            space_activation(activation)  # refuses f(0) != 0
            act = activation
        else:
            raise ValueError(f"Expected argument `activation` to be a profile name {sorted(PROFILES)} or an "
                             f"nn.Module, but got {activation!r}.")
        groups = act.groups if isinstance(act, IsotropicActivation) else None
        self.fc1 = IsoLinear(d_model, d_hidden)
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.fc2 = IsoLinear(d_hidden, d_model, groups if psi != "none" else None, psi)
        for layer in (self.fc1, self.fc2):
            init_weight(layer.weight, init, generator)
            if init == "default":  # nn.Linear's bias initialisation too
                bound = 1.0 / max(1, layer.in_features) ** 0.5
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        self.psi_mode = psi
        self.psi_decay = check_scale("psi_decay", psi_decay)
        self.growth_scale = check_scale("growth_scale", growth_scale)
        # The blocked layout of the current group index, with the index (and its version) it is of.
        self._layout: Optional[_Layout] = None
        self._layout_index: Optional[Tensor] = None
        self._layout_version = -1

    def __getstate__(self) -> Dict[str, Any]:
        # A copy or an unpickled module computes its own layout: identity is not kept across them.
        state = self.__dict__.copy()
        state.update(_layout=None, _layout_index=None, _layout_version=-1)
        return state

    @property
    def width(self) -> int:
        """The current hidden width."""
        return int(self.fc1.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """``fc2(f(fc1(x)))`` on ``(..., d_model)`` (with dropout on the hidden activations when asked for).

        A grouped isotropic activation without intrinsic length is computed in a *blocked layout*:
        the hidden vector is a ``(neurons per group, groups)`` array, shorter groups padded with
        zeros, and every group norm is a sum down one column. The interleaved groups of a new
        block, and growth, keep the neurons in that order; after other changes the rows of ``fc1``
        and columns of ``fc2`` are gathered into it (the weights are much smaller than the
        activations). It is the same function (padding contributes exact zeros; results differ by
        float round-off only) without the scatter and gather over the hidden activations that
        per-neuron group indices need, which cost more than the activation itself. The parameters
        keep their order, so neuron operations and optimizers see no difference; forward hooks on
        ``fc1``, ``act`` and ``fc2`` do not run in this layout (hook the block itself).
        """
        act = self.act
        if isinstance(act, IsotropicActivation):
            layout = self._current_layout()
            if layout is not None:
                return self._forward_blocked(x, act, layout)
            h, s = act.forward_with_scale(self.fc1(x))
            return self.fc2(self._drop(h), s)
        return self.fc2(self._drop(act(self.fc1(x))))

    def _drop(self, h: Tensor) -> Tensor:
        # Dropout(0) is the identity; skipping the module call matters in small blocks.
        return self.dropout(h) if self.dropout.p > 0 else h

    def _current_layout(self) -> Optional[_Layout]:
        act = self.act
        if not isinstance(act, IsotropicActivation) or act.group_index is None or act.length is not None:
            return None
        index = act.group_index
        # Neuron operations replace the index; its version counts in-place edits (a state-dict load,
        # a DDP buffer broadcast, a move to another device).
        if index is not self._layout_index or index._version != self._layout_version:
            self._layout, self._layout_index, self._layout_version = _blocked_layout(index), index, index._version
        return self._layout

    def _forward_blocked(self, x: Tensor, act: IsotropicActivation, layout: _Layout) -> Tensor:
        w1: Tensor = self.fc1.weight
        b1: Tensor = self.fc1.bias
        w2: Tensor = self.fc2.weight
        if layout.slots is not None or layout.padding:
            pad = layout.padding if layout.slots is None else 1
            w1 = torch.cat([w1, w1.new_zeros(pad, w1.shape[1])])
            b1 = torch.cat([b1, b1.new_zeros(pad)])
            w2 = torch.cat([w2, w2.new_zeros(w2.shape[0], pad)], dim=1)
            if layout.slots is not None:
                w1, b1, w2 = w1.index_select(0, layout.slots), b1.index_select(0, layout.slots), \
                    w2.index_select(1, layout.slots)
        # Groups along the last axis, the neurons of each along the one before it: a group norm is a
        # sum down a column, across rows of contiguous (vectorised) memory.
        z = F.linear(x, w1, b1).unflatten(-1, (layout.size, layout.groups))
        h, s = isotropic_with_scale(z, -2, act.profile)
        y = F.linear(self._drop(h.flatten(-2)), w2, self.fc2.bias)
        if self.fc2.correction is not None:
            y = y + F.linear(s.squeeze(-2), self.fc2.correction)
        return y

    def hidden_output(self, x: Tensor) -> Tensor:
        """The hidden activations for inputs ``x``, as ``(..., width)``."""
        return self.act(self.fc1(x))

    def neuron_spaces(self) -> Dict[str, NeuronSpace]:
        """``{"hidden": NeuronSpace}``: rows of ``fc1``, columns of ``fc2`` (and psi, ``o``)."""
        space = dense_space("hidden", self.fc1, self.act, self.fc2, producer_path="fc1", consumer_path="fc2",
                            activation_path="act", owner=self,
                            hidden=lambda x: self.hidden_output(x).reshape(-1, self.width))
        return {"hidden": space}

    def regularisation(self) -> Tensor:
        """The psi penalty of ``psi="decay"`` (else 0)."""
        if self.psi_mode != "decay" or self.fc2.correction is None:
            return self.fc1.weight.new_zeros(())
        return scaled_squared_norm([self.fc2.correction], self.psi_decay)

    # Convenience: the operations of iso_lightning.operations on the one space.
    def grow(self, n: int = 1, *, optimizer: OptimizerArg = None, generator: Optional[torch.Generator] = None,
             on_unknown: str = "raise") -> SurgeryReport:
        """Add ``n`` hidden neurons (see :func:`iso_lightning.operations.grow`); the output is unchanged."""
        return operations.grow(self.neuron_spaces()["hidden"], n, optimizer=optimizer, scale=self.growth_scale,
                               generator=generator, on_unknown=on_unknown)

    def shrink(self, n: int = 1, *, optimizer: OptimizerArg = None, probe: Optional[Tensor] = None,
               expectation: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
        """Remove the ``n`` weakest hidden neurons or directions (see :func:`iso_lightning.operations.shrink`)."""
        return operations.shrink(self.neuron_spaces()["hidden"], n, optimizer=optimizer, probe=probe,
                                 expectation=expectation, on_unknown=on_unknown)
