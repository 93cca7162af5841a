r"""Isotropic networks: affine layers with a linear correction, and the neuron spaces between them.

.. math::

    z_1 = W_1 x + b_1, \qquad
    z_l = W_l h_{l-1} + b_l + \psi_{l-1} * s_{l-1}, \qquad h_l = s_l\, z_l,

and the output layer has the same form without an activation. ``psi_{l-1}`` has the shape of
``W_l`` with its input axis replaced by the groups of the previous space, and is applied with the
same operation as ``W_l`` (a matrix product, or a convolution with the same geometry) to the
per-group scales ``s_{l-1}``. That single form makes removal of a constant neuron exact for dense
and convolutional layers alike: its contribution ``W_* b_* s`` *is* a correction term.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning import operations
from iso_lightning._validation import check_choice as _check_choice
from iso_lightning._validation import check_int
from iso_lightning.activations import IsotropicActivation
from iso_lightning.axis import Extension, Selection
from iso_lightning.functional import PROFILES, scaled_squared_norm
from iso_lightning.linalg import full_precision
from iso_lightning.operations import SparsifyReport, SurgeryReport, check_count, check_generator, check_scale
from iso_lightning.optim import OptimizerArg
from iso_lightning.spaces import Binding, NeuronSpace, Role, dense_space
from iso_lightning.topology import check_record, reshape
from iso_lightning.transaction import atomic

__all__ = ["INITS", "PSI_MODES", "IsoConv2d", "IsoLinear", "IsotropicConvNet", "IsotropicMLP", "IsotropicNetwork",
           "init_weight"]

#: Modes of the linear correction psi.
PSI_MODES = ("none", "constant", "trainable", "decay")
#: Weight initialisations.
INITS = ("orthogonal", "xavier_uniform", "kaiming_uniform", "normal", "default")


def _register_correction(module: nn.Module, shape: Optional[Tuple[int, ...]], mode: str) -> None:
    if shape is None or mode == "none":
        module.register_parameter("correction", None)
    elif mode == "constant":
        module.register_buffer("correction", torch.zeros(shape))
    else:
        module.correction = nn.Parameter(torch.zeros(shape))


class IsoLinear(nn.Module):
    """``W h + b + psi s``: a dense layer with an optional correction from the previous scales.

    Shapes are read from the tensors, so a layer stays consistent after any neuron operation.
    """

    correction: Optional[Tensor]

    def __init__(self, in_features: int, out_features: int, correction_features: Optional[int] = None,
                 psi: str = "none") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        shape = None if correction_features is None else (out_features, correction_features)
        _register_correction(self, shape, psi)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, h: Tensor, s: Optional[Tensor] = None) -> Tensor:
        """``h`` of shape ``(..., in_features)``; ``s`` the previous scales, ``(..., groups)`` (or a
        convolution's ``(N, groups, H, W)``, flattened like its feature maps)."""
        z = F.linear(h, self.weight, self.bias)
        if self.correction is not None and s is not None:
            if s.dim() > h.dim():
                s = s.flatten(1)
            z = torch.addmm(z, s, self.correction.t()) if z.dim() == 2 else z + F.linear(s, self.correction)
        return z

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, psi={self.correction is not None}"


class IsoConv2d(nn.Module):
    """A 2-d convolution with an optional correction convolution applied to the previous scales."""

    correction: Optional[Tensor]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, correction_channels: Optional[int] = None, psi: str = "none") -> None:
        super().__init__()
        self.stride, self.padding = int(stride), int(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        shape = None if correction_channels is None else (out_channels, correction_channels, kernel_size, kernel_size)
        _register_correction(self, shape, psi)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[2]

    def forward(self, h: Tensor, s: Optional[Tensor] = None) -> Tensor:
        z = F.conv2d(h, self.weight, self.bias, self.stride, self.padding)
        if self.correction is not None and s is not None:
            z = z + F.conv2d(s, self.correction, None, self.stride, self.padding)
        return z

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, psi={self.correction is not None}")


def init_weight(weight: Tensor, init: str, generator: Optional[torch.Generator] = None) -> None:
    with torch.no_grad():
        flat = weight.view(weight.shape[0], -1)
        if init == "orthogonal":
            nn.init.orthogonal_(flat, generator=generator)
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(weight, generator=generator)
        elif init == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, nonlinearity="tanh", generator=generator)
        elif init == "normal":
            nn.init.normal_(weight, std=1.0 / math.sqrt(max(1, flat.shape[1])), generator=generator)
        else:  # PyTorch's own default for nn.Linear / nn.Conv2d
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


class IsotropicNetwork(nn.Module):
    """A stack of affine layers with isotropic activations on every hidden space: a space provider.

    Use :class:`IsotropicMLP` or :class:`IsotropicConvNet` to build one. Hidden spaces are numbered
    ``0 .. num_hidden - 1``; space ``l`` sits between ``layers[l]`` and ``layers[l + 1]`` and is named
    ``"hidden.<l>"`` (:meth:`neuron_spaces` also lists ``"input"`` and ``"output"``). Dense layers act
    on the last axis of their input, as ``nn.Linear`` does; a convolutional network flattens its
    feature maps once, before its first dense layer.

    Neuron operations (:meth:`grow`, :meth:`shrink`, :meth:`resize`, :meth:`diagonalise`,
    :meth:`sparsify`, the input/output operations) are those of :mod:`iso_lightning.operations`,
    addressed by layer. They keep every ``Parameter`` object alive and update it through
    ``Tensor.set_``, so optimizers, hooks and user references stay valid; pass ``optimizer=`` to have
    its state remapped too. Each one is all or nothing.
    """

    def __init__(self, layers: Sequence[nn.Module], activations: Sequence[IsotropicActivation],
                 psi: str = "none", psi_decay: float = 0.1, growth_scale: float = 0.01) -> None:
        super().__init__()
        if len(layers) != len(activations) + 1:
            raise ValueError("Expected one more layer than activations.")
        _check_choice("psi", psi, PSI_MODES)
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activations)
        self.psi_mode = psi
        self.psi_decay = check_scale("psi_decay", psi_decay)
        self.growth_scale = check_scale("growth_scale", growth_scale)

    # ------------------------------------------------------------------ forward
    def _affine_input(self, index: int, h: Tensor) -> Tensor:
        # The one flatten: feature maps of a convolution into the first dense layer after it.
        if index > 0 and isinstance(self.layers[index], IsoLinear) and isinstance(self.layers[index - 1], IsoConv2d):
            return h.flatten(1)
        return h

    def forward(self, x: Tensor) -> Tensor:
        h, s = x, None
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            z = layer(self._affine_input(index, h), s)
            if index == last:
                return z
            h, s = self.activation(index).forward_with_scale(z)
        raise AssertionError("unreachable")

    def hidden_output(self, x: Tensor, layer: int) -> Tensor:
        """The activations ``h_l`` of hidden space ``layer`` for inputs ``x``."""
        layer = self._check_layer(layer)
        h, s = x, None
        for index in range(layer + 1):
            h, s = self.activation(index).forward_with_scale(self.affine(index)(self._affine_input(index, h), s))
        return h

    def regularisation(self) -> Tensor:
        r"""The psi penalty :math:`\lambda \sum_l \lVert \psi_l \rVert^2` of ``psi="decay"`` (else 0).

        Add it to the training loss; it pulls the corrections back to zero.
        """
        corrections = [self.affine(i).correction for i in range(len(self.layers))] if self.psi_mode == "decay" else []
        present = [c for c in corrections if c is not None]
        if not present:
            return next(self.parameters()).new_zeros(())
        return scaled_squared_norm(present, self.psi_decay)

    # ------------------------------------------------------------------ spaces
    def affine(self, index: int) -> Union[IsoLinear, IsoConv2d]:
        """Affine layer ``index`` (``0 .. num_hidden``)."""
        return cast(Union[IsoLinear, IsoConv2d], self.layers[index])

    def activation(self, index: int) -> IsotropicActivation:
        """Activation of hidden space ``index``."""
        return cast(IsotropicActivation, self.activations[index])

    @property
    def num_hidden(self) -> int:
        """Number of hidden spaces."""
        return len(self.activations)

    @property
    def hidden_widths(self) -> List[int]:
        """Current width of every hidden space."""
        return [int(self.affine(i).weight.shape[0]) for i in range(self.num_hidden)]

    @property
    def in_features(self) -> int:
        return int(self.affine(0).weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.affine(len(self.layers) - 1).weight.shape[0])

    def _inner(self, index: int) -> int:
        """Entries per neuron of space ``index`` along the next layer's input axis."""
        return int(self.affine(index + 1).weight.shape[1] // self.affine(index).weight.shape[0])

    def space(self, layer: int) -> NeuronSpace:
        """The :class:`~iso_lightning.spaces.NeuronSpace` of hidden space ``layer`` (``"hidden.<layer>"``)."""
        layer = self._check_layer(layer)
        channel_axis = 1 if isinstance(self.layers[layer], IsoConv2d) else -1

        def hidden(x: Tensor) -> Tensor:
            h = self.hidden_output(x, layer)
            return h.movedim(channel_axis, -1).reshape(-1, h.shape[channel_axis])

        return dense_space(f"hidden.{layer}", self.layers[layer], self.activation(layer), self.layers[layer + 1],
                           producer_path=f"layers.{layer}", consumer_path=f"layers.{layer + 1}",
                           activation_path=f"activations.{layer}", inner=self._inner(layer), owner=self,
                           hidden=hidden)

    def input_space(self) -> NeuronSpace:
        """The input features: columns of the first weight."""
        return dense_space("input", None, None, self.layers[0], consumer_path="layers.0", kind="input",  # type: ignore[arg-type]
                           owner=self)

    def output_space(self) -> NeuronSpace:
        """The outputs: rows of the last weight, its bias and correction."""
        last = len(self.layers) - 1
        return dense_space("output", self.layers[last], None, None, producer_path=f"layers.{last}", kind="output",
                           owner=self)

    def neuron_spaces(self) -> Dict[str, NeuronSpace]:
        """Every space of the network: ``"hidden.0" .. "hidden.<L-1>"``, ``"input"`` and ``"output"``."""
        spaces = {f"hidden.{i}": self.space(i) for i in range(self.num_hidden)}
        spaces["input"] = self.input_space()
        spaces["output"] = self.output_space()
        return spaces

    def spaces(self) -> Dict[str, NeuronSpace]:
        """The hidden spaces by name."""
        return {f"hidden.{i}": self.space(i) for i in range(self.num_hidden)}

    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_hidden:
            raise ValueError(
                f"Expected argument `layer` to be an int in [0, {self.num_hidden - 1}] (the network has "
                f"{self.num_hidden} hidden layers), but got {layer!r}."
            )
        return layer

    def topology(self) -> Dict[str, Any]:
        """Plain-data description of the current shapes (the network's part of a topology record)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden_widths": self.hidden_widths,
            "groups": [None if a.group_index is None else a.group_index.tolist()
                       for a in map(self.activation, range(self.num_hidden))],
        }

    def reshape_to(self, topology: Mapping[str, Any]) -> None:
        """Give every tensor the shape described by ``topology`` (from :meth:`topology`), without values.

        Used before loading a state dict taken after neuron operations: the tensors keep their
        identity and get zero storage of the recorded shapes, which the state dict then fills.
        Raises ``ValueError`` for a record that does not fit this architecture; nothing changes then.
        """
        spaces = self.neuron_spaces()
        record = topology if isinstance(topology, Mapping) and "version" in topology else {"": topology}
        reshape(spaces, check_record(spaces, record))

    # ------------------------------------------------------------------ operations (iso_lightning.operations)
    def singular_values(self, layer: int) -> Tensor:
        """Singular values of hidden space ``layer`` (of ``[W_l | psi_{l-1}]``), descending, float64."""
        return operations.singular_values(self.space(layer))

    def diagonalise(self, layer: int, mode: str = "left", *, optimizer: OptimizerArg = None,
                    on_unknown: str = "raise") -> SurgeryReport:
        """Rewrite hidden space ``layer`` in its singular basis (``"left"``) or make ``W_l`` diagonal (``"full"``)."""
        if mode == "full":
            layer = self._check_layer(layer)
            if layer == 0:
                raise ValueError(
                    "Expected argument `layer` >= 1 for mode='full': layer 0 reads the network input, which has no "
                    "rotational freedom."
                )
            return operations.diagonalise(self.space(layer), "full", previous=self.space(layer - 1),
                                          optimizer=optimizer, on_unknown=on_unknown)
        return operations.diagonalise(self.space(layer), mode, optimizer=optimizer, on_unknown=on_unknown)

    def grow(self, layer: int, n: int = 1, *, optimizer: OptimizerArg = None, scale: Optional[float] = None,
             group: Union[None, int, str] = None, generator: Optional[torch.Generator] = None,
             on_unknown: str = "raise") -> SurgeryReport:
        """Add ``n`` neurons to hidden space ``layer``; the function is exactly unchanged."""
        return operations.grow(self.space(layer), n, optimizer=optimizer,
                               scale=self.growth_scale if scale is None else scale, group=group,
                               generator=generator, on_unknown=on_unknown)

    def shrink(self, layer: int, n: int = 1, *, optimizer: OptimizerArg = None, probe: Optional[Tensor] = None,
               expectation: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
        """Remove the ``n`` weakest directions of hidden space ``layer`` (found at once, for any ``n``).

        ``expectation``: inputs over which the removed neurons' mean output is folded into the next
        bias instead of into psi (see :func:`iso_lightning.operations.shrink`).
        """
        return operations.shrink(self.space(layer), n, optimizer=optimizer, probe=probe, expectation=expectation,
                                 on_unknown=on_unknown)

    def remove_group(self, layer: int, group: Optional[int] = None, *, optimizer: OptimizerArg = None,
                     probe: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
        """Remove a whole neuron group of hidden space ``layer`` (see :func:`iso_lightning.operations.remove_group`)."""
        space = self.space(layer)
        if space.groups() < 2:
            raise ValueError(
                f"Expected argument `layer` to name a space with at least two groups (a space keeps one), but "
                f"`{space.name}` (layer {layer}) has {space.groups()}."
            )
        return operations.remove_group(self.space(layer), group, optimizer=optimizer, probe=probe,
                                       on_unknown=on_unknown)

    def resize(self, layer: int, width: int, *, optimizer: OptimizerArg = None,
               generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> Optional[SurgeryReport]:
        """Grow or shrink hidden space ``layer`` to ``width`` neurons (``None`` when it has that width)."""
        return operations.resize(self.space(layer), width, optimizer=optimizer, generator=generator,
                                 on_unknown=on_unknown, scale=self.growth_scale)

    def set_widths(self, widths: Union[Mapping[int, int], Sequence[int]], *, optimizer: OptimizerArg = None,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> List[SurgeryReport]:
        """Resize several hidden spaces, last hidden layer first, all or nothing.

        ``widths`` is a list with one width per hidden space, or a mapping ``{layer: width}``.
        """
        if isinstance(widths, Mapping):
            plan = dict(widths)
        elif isinstance(widths, (list, tuple)):
            if len(widths) != self.num_hidden:
                raise ValueError(
                    f"Expected argument `widths` to have {self.num_hidden} entries (one per hidden layer), "
                    f"but got {len(widths)}."
                )
            plan = dict(enumerate(widths))
        else:
            raise ValueError(f"Expected argument `widths` to be a list or a mapping, but got {type(widths).__name__}.")
        named = {f"hidden.{self._check_layer(layer)}": width for layer, width in plan.items()}
        return operations.set_widths(self.spaces(), named, optimizer=optimizer, generator=generator,
                                     on_unknown=on_unknown, scale=self.growth_scale)

    # ------------------------------------------------------------------ input and output neurons
    @full_precision
    def _add_boundary(self, space: NeuronSpace, n: int, scale: float, optimizer: OptimizerArg,
                      generator: Optional[torch.Generator], on_unknown: str) -> SurgeryReport:
        n = check_count("n", n)
        scale = check_scale("scale", scale)
        check_generator(generator)
        old = space.width

        def fills(binding: Binding) -> Tensor:
            view = binding.view(binding.tensor)
            weight = binding.role in (Role.WEIGHT_IN, Role.WEIGHT_OUT)
            return _random_like(view, n, scale if weight else 0.0, generator)

        operations.transform_space(space, Extension(n), optimizer=optimizer, on_unknown=on_unknown, fills=fills)
        return SurgeryReport(f"add_{space.kind}s", space.name, old, old + n,
                             exact=space.kind == "output" or scale == 0, details={"scale": scale})

    @full_precision
    def _remove_boundary(self, space: NeuronSpace, indices: Any, optimizer: OptimizerArg,
                         on_unknown: str) -> SurgeryReport:
        width, which = space.width, space.kind
        values = list(indices) if isinstance(indices, (list, tuple, range, torch.Tensor)) else None
        if values is None or not all(isinstance(i, int) and not isinstance(i, bool) or
                                     (isinstance(i, torch.Tensor) and i.dtype == torch.long and i.dim() == 0)
                                     for i in values):
            raise ValueError(f"Expected argument `indices` to be a sequence of ints, but got {indices!r}.")
        chosen = sorted({int(i) for i in values})
        if not chosen or chosen[0] < 0 or chosen[-1] >= width or len(chosen) >= width:
            raise ValueError(
                f"Expected argument `indices` to name between 1 and {width - 1} distinct {which}s in [0, {width - 1}], "
                f"but got {list(indices)!r}."
            )
        removed_norm = 0.0
        if which == "input":
            b = space.weight_out
            assert b is not None
            removed_norm = float(b.view(b.tensor.detach())[:, chosen].double().norm())
        keep = torch.tensor([i for i in range(width) if i not in set(chosen)], dtype=torch.long)
        operations.transform_space(space, Selection(keep), optimizer=optimizer, on_unknown=on_unknown)
        return SurgeryReport(f"remove_{which}s", space.name, width, width - len(chosen), error_estimate=removed_norm,
                             exact=removed_norm == 0.0, details={"indices": chosen})

    def add_inputs(self, n: int = 1, *, optimizer: OptimizerArg = None, scale: float = 0.0,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> SurgeryReport:
        """Append ``n`` input features (zero weights by default: the function is unchanged)."""
        return self._add_boundary(self.input_space(), n, scale, optimizer, generator, on_unknown)

    def remove_inputs(self, indices: Sequence[int], *, optimizer: OptimizerArg = None,
                      on_unknown: str = "raise") -> SurgeryReport:
        """Delete input features ``indices``; the report carries the norm of the weights removed."""
        return self._remove_boundary(self.input_space(), indices, optimizer, on_unknown)

    def add_outputs(self, n: int = 1, *, optimizer: OptimizerArg = None, scale: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> SurgeryReport:
        """Append ``n`` outputs (small random weights, zero bias); existing outputs are unchanged."""
        return self._add_boundary(self.output_space(), n, self.growth_scale if scale is None else scale, optimizer,
                                  generator, on_unknown)

    def remove_outputs(self, indices: Sequence[int], *, optimizer: OptimizerArg = None,
                       on_unknown: str = "raise") -> SurgeryReport:
        """Delete outputs ``indices``; the remaining outputs are unchanged."""
        return self._remove_boundary(self.output_space(), indices, optimizer, on_unknown)

    # ------------------------------------------------------------------ sparsify
    @full_precision
    def sparsify(self, *, optimizer: OptimizerArg = None, probe: Optional[Tensor] = None,
                 on_unknown: str = "raise") -> SparsifyReport:
        r"""Alternating full diagonalisation: make hidden-to-hidden weights ``W_1, W_3, ...`` diagonal.

        Diagonalising ``W_l`` rotates spaces ``l - 1`` and ``l``, which undoes any diagonal form of
        ``W_{l-1}`` and ``W_{l+1}``, so every other layer is diagonalised; in a deep dense network
        about half of the weights become structurally zero. ``probe`` inputs (default: 256 standard
        normal samples) measure the function error. All or nothing.
        """
        layers = list(range(1, self.num_hidden, 2))
        pairs = [(self.space(layer - 1), self.space(layer)) for layer in layers]
        for previous, space in pairs:
            operations.full_weight(space, previous)
            operations.check_space(previous)
            operations.check_space(space)
        operations.remapper_for(optimizer, on_unknown, *(sp for pair in pairs for sp in pair))
        first = self.affine(0).weight
        if probe is None:
            if first.dim() != 2:
                raise ValueError("Expected argument `probe` for a convolutional network (its input shape is not "
                                 "known).")
            g = torch.Generator().manual_seed(0)
            probe = torch.randn(256, self.in_features, generator=g).to(first.dtype)
        before = operations.probe_outputs(self, probe)
        start = time.perf_counter()
        with atomic():
            for layer in layers:
                operations.diagonalise(self.space(layer), "full", previous=self.space(layer - 1), optimizer=optimizer,
                                       on_unknown=on_unknown)
        seconds = time.perf_counter() - start
        after = operations.probe_outputs(self, probe)
        zero = sum(int((self.affine(layer).weight == 0).sum()) for layer in layers)
        total = sum(self.affine(i).weight.numel() for i in range(len(self.layers)))
        err = float((after - before).abs().max())
        rel = err / max(float(before.abs().max()), 1e-30)
        return SparsifyReport(layers, zero, total, err, rel, seconds)


def _random_like(view: Tensor, n: int, scale: float, generator: Optional[torch.Generator]) -> Tensor:
    shape = (view.shape[0], n, view.shape[2])
    if scale == 0:
        return view.new_zeros(shape)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(view)


def _activation_kwargs(activation: str, length: str, length_init: Optional[float], max_length: float) -> Dict[str, Any]:
    _check_choice("activation", activation, sorted(PROFILES))
    return dict(profile=activation, length=length, length_init=length_init, max_length=max_length)


def _check_sizes(name: str, sizes: Any, minimum: int) -> List[int]:
    if not isinstance(sizes, (list, tuple)) or len(sizes) < minimum or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
    ):
        raise ValueError(
            f"Expected argument `{name}` to be a list of at least {minimum} positive ints, but got {sizes!r}."
        )
    return list(sizes)


class IsotropicMLP(IsotropicNetwork):
    """A dense isotropic network ``sizes = [in, hidden..., out]``.

    Args:
        sizes: input size, hidden widths, output size.
        activation: radial profile (``"tanh"``, ``"softsign"``, ``"gelu"``, ``"swish"``).
        length: intrinsic length mode ``"none"``, ``"constant"`` or ``"trainable"``.
        psi: linear correction mode ``"none"``, ``"constant"``, ``"trainable"`` or ``"decay"``.
        psi_decay: weight of :meth:`regularisation` for ``psi="decay"``.
        init: weight initialisation, one of :data:`INITS`; biases and psi start at zero.
        length_init: initial ``o``; max_length: cap of the effective ``o``.
        group_size: groups of this many neurons per hidden space, each with its own norm and ``o``.
        partitions: instead of ``group_size``, the group of every neuron of each hidden space (one
            list per hidden space, ``None`` for a single group there).
        growth_scale: standard deviation of the outgoing weights of new neurons.
        generator: random generator for the initialisation.

    Example:
        >>> import torch
        >>> net = IsotropicMLP([4, 8, 3], psi="trainable", length="trainable")
        >>> x = torch.randn(5, 4)
        >>> y = net(x)
        >>> _ = net.grow(0, 2)
        >>> net.hidden_widths, bool(torch.allclose(net(x), y))
        ([10], True)
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", length: str = "none", psi: str = "none",
                 psi_decay: float = 0.1, init: str = "orthogonal", length_init: Optional[float] = None,
                 max_length: float = 100.0, group_size: Optional[int] = None, growth_scale: float = 0.01,
                 generator: Optional[torch.Generator] = None,
                 partitions: Optional[Sequence[Optional[Sequence[int]]]] = None) -> None:
        sizes = _check_sizes("sizes", sizes, 2)
        if partitions is not None and (not isinstance(partitions, (list, tuple)) or len(partitions) != len(sizes) - 2):
            raise ValueError(
                f"Expected argument `partitions` to hold one entry per hidden layer ({len(sizes) - 2}), "
                f"but got {partitions!r}."
            )
        _check_choice("psi", psi, PSI_MODES)
        _check_choice("init", init, INITS)
        kwargs = _activation_kwargs(activation, length, length_init, max_length)
        acts = [IsotropicActivation(w, dim=-1, group_size=group_size,
                                    partition=None if partitions is None else partitions[i], **kwargs)
                for i, w in enumerate(sizes[1:-1])]
        layers = []
        for i in range(len(sizes) - 1):
            groups = acts[i - 1].groups if i > 0 else None
            layers.append(IsoLinear(sizes[i], sizes[i + 1], groups, psi))
            init_weight(cast(Tensor, layers[-1].weight), init, generator)
        super().__init__(layers, acts, psi=psi, psi_decay=psi_decay, growth_scale=growth_scale)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class IsotropicConvNet(IsotropicNetwork):
    """Isotropic convolutions (activation over the channels at every pixel), then a dense head.

    Args:
        in_channels: image channels.
        channels: output channels of each convolution (each is a hidden space).
        image_size: input height and width (``int`` or ``(h, w)``), to size the dense head.
        hidden: widths of the dense hidden layers after the convolutions.
        num_outputs: output size.
        kernel_size, stride, padding: per convolution (an int applies to all; ``padding=None`` keeps
            the size for stride 1).
        Other arguments as for :class:`IsotropicMLP`.

    Example:
        >>> import torch
        >>> net = IsotropicConvNet(1, [4, 6], image_size=8, hidden=[5], num_outputs=3)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_channels: int, channels: Sequence[int], image_size: Union[int, Sequence[int]],
                 num_outputs: int, hidden: Sequence[int] = (), kernel_size: Union[int, Sequence[int]] = 3,
                 stride: Union[int, Sequence[int]] = 1, padding: Union[None, int, Sequence[int]] = None,
                 activation: str = "tanh", length: str = "none", psi: str = "none", psi_decay: float = 0.1,
                 init: str = "orthogonal", length_init: Optional[float] = None, max_length: float = 100.0,
                 group_size: Optional[int] = None, growth_scale: float = 0.01,
                 generator: Optional[torch.Generator] = None) -> None:
        channels = _check_sizes("channels", list(channels), 1)
        hidden = _check_sizes("hidden", list(hidden), 0)
        _check_sizes("in_channels", [in_channels], 1)
        _check_sizes("num_outputs", [num_outputs], 1)
        _check_choice("psi", psi, PSI_MODES)
        _check_choice("init", init, INITS)
        n = len(channels)

        def per_layer(name: str, value: Any) -> List[Any]:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"Expected argument `{name}` to have {n} entries (one per conv), but got {value!r}.")
            return values

        kernels = per_layer("kernel_size", kernel_size)
        strides = per_layer("stride", stride)
        paddings = per_layer("padding", padding)
        for name, values, minimum in (("kernel_size", kernels, 1), ("stride", strides, 1), ("padding", paddings, 0)):
            for value in values:
                check_int(name, value, minimum, optional=name == "padding")
        paddings = [k // 2 if p is None else p for k, p in zip(kernels, paddings)]
        size = [image_size, image_size] if isinstance(image_size, int) and not isinstance(image_size, bool) \
            else image_size
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"Expected argument `image_size` to be an int or (height, width), but got {image_size!r}.")
        h, w = _check_sizes("image_size", list(size), 2)
        kwargs = _activation_kwargs(activation, length, length_init, max_length)
        acts: List[IsotropicActivation] = []
        layers: List[nn.Module] = []
        previous = in_channels
        for i, (c, k, s, p) in enumerate(zip(channels, kernels, strides, paddings)):
            layers.append(IsoConv2d(previous, c, k, s, p, acts[-1].groups if acts else None, psi))
            init_weight(cast(Tensor, layers[-1].weight), init, generator)
            acts.append(IsotropicActivation(c, dim=1, group_size=group_size, **kwargs))
            h, w = _conv_out(h, k, s, p), _conv_out(w, k, s, p)
            if h < 1 or w < 1:
                raise ValueError(f"Expected the image to keep a positive size, but conv {i} leaves {h}x{w}.")
            previous = c
        features, spatial = previous * h * w, h * w
        for width in list(hidden) + [num_outputs]:
            layers.append(IsoLinear(features, width, acts[-1].groups * spatial, psi))
            init_weight(cast(Tensor, layers[-1].weight), init, generator)
            if len(acts) < n + len(hidden):
                acts.append(IsotropicActivation(width, dim=-1, group_size=group_size, **kwargs))
            features, spatial = width, 1
        super().__init__(layers, acts, psi=psi, psi_decay=psi_decay, growth_scale=growth_scale)
