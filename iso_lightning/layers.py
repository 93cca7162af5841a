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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning._validation import check_choice as _check_choice
from iso_lightning.activations import IsotropicActivation
from iso_lightning.functional import PROFILES, scaled_squared_norm
from iso_lightning.spaces import Binding, NeuronSpace

__all__ = ["INITS", "PSI_MODES", "IsoConv2d", "IsoLinear", "IsotropicConvNet", "IsotropicMLP", "IsotropicNetwork"]

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
        z = F.linear(h, self.weight, self.bias)
        if self.correction is not None and s is not None:
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


def _init_weight(weight: Tensor, init: str, generator: Optional[torch.Generator] = None) -> None:
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
    """A stack of affine layers with isotropic activations on every hidden space.

    Use :class:`IsotropicMLP` or :class:`IsotropicConvNet` to build one. Hidden spaces are numbered
    ``0 .. num_hidden - 1``; space ``l`` sits between ``layers[l]`` and ``layers[l + 1]``.

    Neuron operations (:meth:`grow`, :meth:`shrink`, :meth:`resize`, :meth:`diagonalise`,
    :meth:`sparsify`, the input/output operations) keep every ``Parameter`` object alive and update
    it in place, so optimizers, hooks and user references stay valid; pass ``optimizer=`` to have
    its state remapped too.
    """

    def __init__(self, layers: Sequence[nn.Module], activations: Sequence[IsotropicActivation],
                 psi: str = "none", psi_decay: float = 0.1, growth_scale: float = 0.01) -> None:
        super().__init__()
        if len(layers) != len(activations) + 1:
            raise ValueError("Expected one more layer than activations.")
        _check_choice("psi", psi, PSI_MODES)
        if not (isinstance(psi_decay, (int, float)) and psi_decay >= 0):
            raise ValueError(f"Expected argument `psi_decay` to be a number >= 0, but got {psi_decay!r}.")
        if not (isinstance(growth_scale, (int, float)) and growth_scale >= 0):
            raise ValueError(f"Expected argument `growth_scale` to be a number >= 0, but got {growth_scale!r}.")
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activations)
        self.psi_mode = psi
        self.psi_decay = float(psi_decay)
        self.growth_scale = float(growth_scale)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        h, s = x, None
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if isinstance(layer, IsoLinear) and h.dim() > 2:
                h = h.flatten(1)
            z = layer(h, s)
            if index == last:
                return z
            h, s = self.activation(index).forward_with_scale(z)
        raise AssertionError("unreachable")

    def hidden_output(self, x: Tensor, layer: int) -> Tensor:
        """The activations ``h_l`` of hidden space ``layer`` for inputs ``x``."""
        layer = self._check_layer(layer)
        h, s = x, None
        for index in range(layer + 1):
            affine = self.affine(index)
            if isinstance(affine, IsoLinear) and h.dim() > 2:
                h = h.flatten(1)
            h, s = self.activation(index).forward_with_scale(affine(h, s))
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
        return [self.space(i).width for i in range(self.num_hidden)]

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
        """The :class:`NeuronSpace` of hidden space ``layer``."""
        layer = self._check_layer(layer)
        this, nxt = self.layers[layer], self.layers[layer + 1]
        producers = [Binding(this, "weight", 0), Binding(this, "bias", 0)]
        if this.correction is not None:
            producers.append(Binding(this, "correction", 0))
        inner = self._inner(layer)
        consumers = [Binding(nxt, "weight", 1, inner)]
        correction_out = Binding(nxt, "correction", 1, inner) if nxt.correction is not None else None
        return NeuronSpace(f"hidden.{layer}", "hidden", producers, consumers, self.activation(layer), correction_out)

    def input_space(self) -> NeuronSpace:
        return NeuronSpace("input", "input", [], [Binding(self.layers[0], "weight", 1)])

    def output_space(self) -> NeuronSpace:
        last = self.layers[-1]
        producers = [Binding(last, "weight", 0), Binding(last, "bias", 0)]
        if last.correction is not None:
            producers.append(Binding(last, "correction", 0))
        return NeuronSpace("output", "output", producers, [])

    def spaces(self) -> Dict[str, NeuronSpace]:
        return {f"hidden.{i}": self.space(i) for i in range(self.num_hidden)}

    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_hidden:
            raise ValueError(
                f"Expected argument `layer` to be an int in [0, {self.num_hidden - 1}] (the network has "
                f"{self.num_hidden} hidden layers), but got {layer!r}."
            )
        return layer

    def topology(self) -> Dict[str, Any]:
        """Plain-data description of the current shapes (stored in checkpoints)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden_widths": self.hidden_widths,
            "groups": [None if a.group_index is None else a.group_index.tolist()
                       for a in map(self.activation, range(self.num_hidden))],
        }

    def reshape_to(self, topology: Mapping[str, Any]) -> None:
        """Give every tensor the shape described by ``topology`` (from :meth:`topology`), without values.

        Used before loading a checkpoint taken after neuron operations: the tensors keep their
        identity and get uninitialised storage of the recorded shapes, which the state dict then
        fills. Raises ``ValueError`` for a record that does not fit this architecture.
        """
        from iso_lightning import surgery

        surgery.reshape_to(self, topology)

    # ------------------------------------------------------------------ surgery (see surgery.py)
    def singular_values(self, layer: int) -> Tensor:
        """Singular values of hidden space ``layer`` (of ``[W_l | psi_{l-1}]``), descending, float64."""
        from iso_lightning import surgery

        return surgery.singular_values(self.space(layer))

    def diagonalise(self, layer: int, mode: str = "left", *, optimizer: Any = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Rewrite hidden space ``layer`` in its singular basis (``"left"``) or make ``W_l`` diagonal (``"full"``)."""
        from iso_lightning import surgery

        return surgery.diagonalise(self, layer, mode, optimizer=optimizer, on_unknown=on_unknown)

    def grow(self, layer: int, n: int = 1, *, optimizer: Any = None, scale: Optional[float] = None,
             group: Union[None, int, str] = None, generator: Optional[torch.Generator] = None,
             on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Add ``n`` neurons to hidden space ``layer``; the function is exactly unchanged."""
        from iso_lightning import surgery

        return surgery.grow(self.space(layer), n, optimizer=optimizer,
                            scale=self.growth_scale if scale is None else scale, group=group,
                            generator=generator, on_unknown=on_unknown)

    def shrink(self, layer: int, n: int = 1, *, optimizer: Any = None, probe: Optional[Tensor] = None,
               expectation: Optional[Tensor] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Remove the ``n`` weakest directions of hidden space ``layer`` (found at once, for any ``n``).

        ``expectation``: inputs over which the removed neurons' mean output is folded into the next
        bias instead of into psi (see :func:`iso_lightning.surgery.shrink`).
        """
        from iso_lightning import surgery

        return surgery.shrink(self, layer, n, optimizer=optimizer, probe=probe, expectation=expectation,
                              on_unknown=on_unknown)

    def remove_group(self, layer: int, group: Optional[int] = None, *, optimizer: Any = None,
                     probe: Optional[Tensor] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Remove a whole neuron group of hidden space ``layer`` (see :func:`iso_lightning.surgery.remove_group`)."""
        from iso_lightning import surgery

        return surgery.remove_group(self, layer, group, optimizer=optimizer, probe=probe, on_unknown=on_unknown)

    def resize(self, layer: int, width: int, *, optimizer: Any = None, generator: Optional[torch.Generator] = None,
               on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Grow or shrink hidden space ``layer`` to ``width`` neurons."""
        from iso_lightning import surgery

        return surgery.resize(self, layer, width, optimizer=optimizer, generator=generator, on_unknown=on_unknown)

    def set_widths(self, widths: Union[Mapping[int, int], Sequence[int]], *, optimizer: Any = None,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Resize several hidden spaces, last hidden layer first (see :func:`iso_lightning.surgery.set_widths`)."""
        from iso_lightning import surgery

        return surgery.set_widths(self, widths, optimizer=optimizer, generator=generator, on_unknown=on_unknown)

    def add_inputs(self, n: int = 1, *, optimizer: Any = None, scale: float = 0.0,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Append ``n`` input features (zero weights by default: the function is unchanged)."""
        from iso_lightning import surgery

        return surgery.add_boundary(self, "input", n, optimizer=optimizer, scale=scale, generator=generator,
                                    on_unknown=on_unknown)

    def remove_inputs(self, indices: Sequence[int], *, optimizer: Any = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Delete input features ``indices``; the report carries the norm of the weights removed."""
        from iso_lightning import surgery

        return surgery.remove_boundary(self, "input", indices, optimizer=optimizer, on_unknown=on_unknown)

    def add_outputs(self, n: int = 1, *, optimizer: Any = None, scale: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Append ``n`` outputs (small random weights, zero bias); existing outputs are unchanged."""
        from iso_lightning import surgery

        return surgery.add_boundary(self, "output", n, optimizer=optimizer,
                                    scale=self.growth_scale if scale is None else scale,
                                    generator=generator, on_unknown=on_unknown)

    def remove_outputs(self, indices: Sequence[int], *, optimizer: Any = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Delete outputs ``indices``; the remaining outputs are unchanged."""
        from iso_lightning import surgery

        return surgery.remove_boundary(self, "output", indices, optimizer=optimizer, on_unknown=on_unknown)

    def sparsify(self, *, optimizer: Any = None, probe: Optional[Tensor] = None, on_unknown: str = "raise"):  # type: ignore[no-untyped-def]
        """Fully diagonalise alternate hidden-to-hidden layers (see :func:`iso_lightning.surgery.sparsify`)."""
        from iso_lightning import surgery

        return surgery.sparsify(self, optimizer=optimizer, probe=probe, on_unknown=on_unknown)


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
            _init_weight(cast(Tensor, layers[-1].weight), init, generator)
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
        paddings = [k // 2 if p is None else p for k, p in zip(kernels, per_layer("padding", padding))]
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        kwargs = _activation_kwargs(activation, length, length_init, max_length)
        acts: List[IsotropicActivation] = []
        layers: List[nn.Module] = []
        previous = in_channels
        for i, (c, k, s, p) in enumerate(zip(channels, kernels, strides, paddings)):
            layers.append(IsoConv2d(previous, c, k, s, p, acts[-1].groups if acts else None, psi))
            _init_weight(cast(Tensor, layers[-1].weight), init, generator)
            acts.append(IsotropicActivation(c, dim=1, group_size=group_size, **kwargs))
            h, w = _conv_out(h, k, s, p), _conv_out(w, k, s, p)
            if h < 1 or w < 1:
                raise ValueError(f"Expected the image to keep a positive size, but conv {i} leaves {h}x{w}.")
            previous = c
        features, spatial = previous * h * w, h * w
        for width in list(hidden) + [num_outputs]:
            layers.append(IsoLinear(features, width, acts[-1].groups * spatial, psi))
            _init_weight(cast(Tensor, layers[-1].weight), init, generator)
            if len(acts) < n + len(hidden):
                acts.append(IsotropicActivation(width, dim=-1, group_size=group_size, **kwargs))
            features, spatial = width, 1
        super().__init__(layers, acts, psi=psi, psi_decay=psi_decay, growth_scale=growth_scale)
