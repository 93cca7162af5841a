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

from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from iso_lightning import operations
from iso_lightning._validation import check_choice, check_int
from iso_lightning.activations import IsotropicActivation
from iso_lightning.functional import PROFILES, scaled_squared_norm
from iso_lightning.layers import INITS, PSI_MODES, IsoLinear, init_weight
from iso_lightning.operations import SurgeryReport, check_scale
from iso_lightning.optim import OptimizerArg
from iso_lightning.spaces import NeuronSpace, dense_space, space_activation

__all__ = ["IsotropicFFN"]


class IsotropicFFN(nn.Module):
    """``fc2(f(fc1(x)))`` on ``(..., d_model)``, its hidden space ``"hidden"`` a neuron space (a provider).

    Args:
        d_model: width of the residual stream (input and output).
        d_hidden: starting hidden width.
        activation: an isotropic profile (``"tanh"``, ``"softsign"``, ``"gelu"``, ``"swish"``), used
            over groups of ``group_size`` neurons, or an elementwise module with ``f(0) = 0``
            (``nn.GELU()``, ``nn.SiLU()``, ``nn.ReLU()``, ...).
        group_size: neurons per group of an isotropic activation (``None``: one group).
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
            act: nn.Module = IsotropicActivation(d_hidden, profile=activation, length=length, group_size=group_size)
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

    @property
    def width(self) -> int:
        """The current hidden width."""
        return int(self.fc1.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc1(x)
        if isinstance(self.act, IsotropicActivation):
            h, s = self.act.forward_with_scale(z)
            return self.fc2(self.dropout(h), s)
        return self.fc2(self.dropout(self.act(z)))

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
