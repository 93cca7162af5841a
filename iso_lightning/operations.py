r"""Neuron operations on a :class:`~iso_lightning.spaces.NeuronSpace`: grow, shrink, rotate, fold.

Every operation is addressed by a space, whatever model it belongs to. It validates its arguments,
the space's tensors, their gradients and the optimizer state first; then it computes the change
and applies it, through an :func:`~iso_lightning.transaction.atomic` block, to every bound tensor,
its gradient and its optimizer state, with the axis transforms of :mod:`iso_lightning.axis`. A
refused or failed operation leaves model and optimizer bit-identical.

.. rubric:: Order rule for several spaces

Changing a space rewrites the columns of the weight that reads it, i.e. the spectrum of the space
that weight produces. :func:`set_widths` therefore changes the spaces that are read *later* first
(the last hidden layer of an MLP first): each space is changed with the spectrum measured for it,
and a neuron found to have a zero singular value is still exactly removable when its turn comes.

.. rubric:: Shrink

In an isotropic space, removing the ``k`` weakest directions finds them at once for any ``k``, as
left singular vectors of :math:`A = [W_{in} \mid \psi_{in}]` (:func:`~iso_lightning.linalg.weakest_directions`).
A rotation of ``k`` Householder reflectors brings them to the first positions, the folds

.. math::

    o_G \mathrel{+}= \textstyle\sum_{k} b_k^2, \qquad
    \psi_{out}[:, G] \mathrel{+}= \textstyle\sum_k W_{out}[:, k]\, b_k,

absorb their constant part, and a selection drops them. When their rows of ``A`` are zero the
removal is exact. Neurons whose rows are exactly zero (grown and not trained yet) already are null
directions: when there are at least ``k`` of them, the last ones are removed as they are, without a
decomposition or a rotation of the others. Each group keeps at least one neuron
(:func:`remove_group` removes a whole group).

In a space whose groups are single neurons (an elementwise activation such as GELU or ReLU, or
``group_size=1``), shrink removes the ``k`` neurons with the smallest incoming row norm (the
singular value of a one-neuron group) and folds each one's constant output into the next bias,

.. math::

    b_{out} \mathrel{+}= W_{out}[:, j]\, f(b_j) \;(+\, \psi_{out}[:, j]\, s_j),

which is exact when the neuron's row is zero and the next layer is dense (or sees no padding).
The report's error estimate is :math:`L_f \lVert A_{removed} \rVert_F \lVert W_{out}[:, removed] \rVert_F`
with :math:`L_f` a bound on :math:`|f'|`; a ``probe`` measures the actual change.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from iso_lightning import transaction
from iso_lightning._validation import check_int
from iso_lightning.axis import (
    AxisTransform,
    DenseRotation,
    Extension,
    HouseholderRotation,
    Selection,
    all_finite,
    leading_view,
)
from iso_lightning.errors import NonFiniteError
from iso_lightning.linalg import full_precision, left_basis, weakest_directions
from iso_lightning.linalg import singular_values as matrix_singular_values
from iso_lightning.optim import OptimizerArg, StateRemapper
from iso_lightning.spaces import Binding, IsotropicSpaceActivation, NeuronSpace, Role
from iso_lightning.transaction import Transaction, atomic

__all__ = [
    "ON_UNKNOWN",
    "SparsifyReport",
    "SurgeryReport",
    "check_space",
    "diagonalise",
    "downstream_first",
    "grow",
    "remapper_for",
    "remove_group",
    "resize",
    "set_widths",
    "shrink",
    "singular_values",
    "spectrum",
    "transform_space",
]

#: Values of ``on_unknown`` (an optimizer with no remapping rule).
ON_UNKNOWN = ("raise", "reset")


@dataclass
class SurgeryReport:
    """What one operation did.

    Attributes:
        op: ``"grow"``, ``"shrink"``, ``"diagonalise"``, ``"remove_group"``, ``"add_inputs"`` ...
        space: the space's name.
        old_width, new_width: sizes before and after.
        singular_values: singular values involved (removed ones for a shrink, all for a
            diagonalisation), float64.
        error_estimate: first-order size of the change of the next pre-activation per unit input
            (0 for exact operations): the dropped input-dependent part and every part a fold could
            not absorb.
        exact: the operation keeps the function unchanged up to round-off.
        measured_error: max |Δ output| on ``probe`` inputs when a probe was given (the owner run in eval
            mode, its modes restored after), else ``None``.
        details: extra figures (removed biases, folds applied, ...).
    """

    op: str
    space: str
    old_width: int
    new_width: int
    singular_values: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    error_estimate: float = 0.0
    exact: bool = True
    measured_error: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "op": self.op, "space": self.space, "old_width": self.old_width, "new_width": self.new_width,
            "singular_values": [float(v) for v in self.singular_values], "error_estimate": self.error_estimate,
            "exact": self.exact, "measured_error": self.measured_error,
        }


@dataclass
class SparsifyReport:
    """Result of a sparsification: structurally zero weights and the function error they cost."""

    layers: List[int]
    zero_weights: int
    total_weights: int
    max_abs_error: float
    max_rel_error: float
    seconds: float

    @property
    def zero_fraction(self) -> float:
        return self.zero_weights / max(1, self.total_weights)


# ------------------------------------------------------------------------------------ checks
def check_count(name: str, n: Any, minimum: int = 1) -> int:
    check_int(name, n, minimum)
    return int(n)


def check_scale(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"Expected argument `{name}` to be a finite number >= 0, but got {value!r}.")
    return float(value)


def check_generator(generator: Any) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"Expected argument `generator` to be None or a torch.Generator, but got {type(generator).__name__} "
            f"({generator!r})."
        )
    return generator


def _check_on_unknown(on_unknown: Any) -> None:
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"Expected argument `on_unknown` to be one of {list(ON_UNKNOWN)}, but got {on_unknown!r}.")


def _check_finite_tensor(label: str, what: str, t: Tensor, space: NeuronSpace) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise NonFiniteError(
            f"Space `{space.name}`: {what} `{label}` holds {bad} non-finite value(s); refusing to operate on it."
        )


def _check_result(label: str, what: str, t: Tensor, before: Optional[Tensor] = None,
                  space: Optional[NeuronSpace] = None) -> None:
    """Refuse a new value that is not finite (finite inputs whose transform overflows the dtype).

    ``before`` (with ``space``): the input, whose own check was deferred to this one (see
    :func:`check_space`); a non-finite input is then reported as such.
    """
    if all_finite(t):
        return
    if before is not None and space is not None:
        _check_finite_tensor(label, what, before, space)
    raise NonFiniteError(
        f"The operation would write non-finite values into {what} `{label}` (its values are too large for "
        f"{t.dtype}); refusing it, nothing was changed."
    )


def _neuron_tensors(spaces: Sequence[NeuronSpace]) -> set:
    return {id(b.tensor) for sp in spaces for b in sp.neuron_bindings()}


def check_space(space: NeuronSpace, defer: bool = False, defer_values: bool = False) -> None:
    """Refuse a space whose tensors cannot be changed safely (raises before anything changes).

    Checks that surgery is not inside ``torch.inference_mode()`` (it would turn gradients and
    optimizer state into inference tensors), that every bound tensor is a registered parameter or
    buffer without a parametrization, and that values and gradients are finite.

    ``defer=True`` leaves the gradients of the neuron-indexed tensors to the operation, which must
    change each of them first, with ``verify=True``, by a transform that carries its input into its
    result (:attr:`~iso_lightning.axis.AxisTransform.carries_input`, a Householder rotation or an
    extension): a NaN or an infinity of the input then reaches the result, whose check (needed
    anyway against overflow) covers the input too, one pass over each gradient instead of two. A refusal there is
    undone by the transaction like any other. ``defer_values`` (with ``defer``) leaves their values
    to the operation too, for an operation that reads none of them before changing them (a grow:
    an :class:`~iso_lightning.axis.Extension` copies its input into its result, whose check then
    reads memory just written instead of a second cold pass over the input).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"Space `{space.name}`: neuron operations cannot run inside `torch.inference_mode()` (the new tensors "
            "would be inference tensors and every later optimizer step would fail); use `torch.no_grad()` instead."
        )
    deferred = _neuron_tensors([space]) if defer else set()
    for b in space.bindings:
        module = b.module
        if nn.utils.parametrize.is_parametrized(module, b.name):
            kind = type(module.parametrizations[b.name][0]).__name__  # type: ignore[index]
            raise ValueError(
                f"Space `{space.name}`: tensor `{b.label}` is parametrized ({kind}); neuron operations change "
                "registered tensors only. Remove the parametrization first "
                "(`torch.nn.utils.parametrize.remove_parametrizations`)."
            )
        if b.name not in module._parameters and b.name not in module._buffers:
            raise ValueError(
                f"Space `{space.name}`: `{b.label}` is not a registered parameter or buffer of "
                f"{type(module).__name__}, so it cannot be resized in place."
            )
        t = b.tensor
        if t.is_inference():
            raise RuntimeError(f"Space `{space.name}`: tensor `{b.label}` is an inference tensor; it cannot be "
                               "resized.")
        if not (defer_values and id(t) in deferred):
            _check_finite_tensor(b.label, "tensor", t, space)
        if t.grad is not None and id(t) not in deferred:
            _check_finite_tensor(b.label, "the gradient of", t.grad, space)


def _params(spaces: Sequence[NeuronSpace]) -> Tuple[List[Tensor], Dict[int, str]]:
    tensors: Dict[int, Tensor] = {}
    names: Dict[int, str] = {}
    for sp in spaces:
        for b in sp.bindings:
            tensors[id(b.tensor)] = b.tensor
            names[id(b.tensor)] = b.label
    return list(tensors.values()), names


def remapper_for(optimizer: OptimizerArg, on_unknown: str, *spaces: NeuronSpace, defer: bool = False
                 ) -> StateRemapper:
    """A :class:`~iso_lightning.optim.StateRemapper` validated for every tensor of ``spaces``
    (``defer``: the state of the neuron-indexed tensors is checked finite later, as in :func:`check_space`)."""
    _check_on_unknown(on_unknown)
    remapper = StateRemapper(optimizer, on_unknown)
    params, names = _params(spaces)
    remapper.validate(params, names, unchecked=_neuron_tensors(spaces) if defer else ())
    return remapper


# ------------------------------------------------------------------------------------ applying transforms
def _in_place(t: Tensor, transform: AxisTransform) -> bool:
    limit = transaction.IN_PLACE_ELEMENTS
    return transform.is_rotation and limit is not None and t.numel() > limit and t.is_contiguous()


def _apply(space: NeuronSpace, binding: Binding, transform: AxisTransform, remapper: StateRemapper,
           tx: Transaction, fill: Optional[Tensor] = None, verify: bool = False) -> None:
    """Apply ``transform`` to one bound tensor, its gradient and its optimizer state.

    ``verify``: the gradient and the state have not been checked finite yet (``check_space`` and
    ``remapper_for`` with ``defer=True``); ``transform`` must then carry its input (see there).
    """
    t = binding.tensor
    shape = tuple(t.shape)
    inplace = _in_place(t, transform)
    assert not verify or transform.carries_input, "a deferred check needs a result that carries the input"
    remapper.apply(t, binding.view, lambda v: binding.shape_back(v, shape), transform, inplace, verify=verify,
                   axis=binding.axis if binding.inner == 1 else None)
    grad = t.grad
    if inplace and verify and grad is not None:  # overwritten below: checked first
        _check_finite_tensor(binding.label, "the gradient of", grad, space)
    if inplace:
        inverse = transform.inverse()
        for target in (t.detach(), grad):
            if target is not None:
                view = binding.view(target)
                transform.linear(view, inplace=True)
                tx.on_rollback(functools.partial(inverse.linear, view, inplace=True))
        return
    # One tensor at a time, each swapped in before the next is made, so that the old one is freed
    # first (an extension's undo restores from a view of its result) and a grow holds one new copy
    # at a time. The gradient keeps its object: its storage is swapped as the parameter's is.
    new, restore = _transformed(binding, transform, t.detach(), shape, fill)
    # The values and gradients were checked finite (check_space, unless deferred to here): only a
    # rotation can make them overflow; a selection or an extension copies them, and only its new
    # entries need a look.
    if transform.may_overflow or verify:
        _check_result(binding.label, "tensor", new, t if verify else None, space)
    elif fill is not None:
        _check_result(binding.label, "tensor", fill)
    tx.replace(t, new, restore=restore)
    del new, restore
    if grad is not None:
        new_grad, grad_restore = _transformed(binding, transform, grad, shape)
        if transform.may_overflow or verify:
            _check_result(binding.label, "the gradient of", new_grad, grad if verify else None, space)
        tx.replace(grad, new_grad, restore=grad_restore)


def _transformed(binding: Binding, transform: AxisTransform, t: Tensor, shape: Tuple[int, ...],
                 fill: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``t`` transformed, and, for an extension, a view of the result that an undo restores ``t`` from
    (so that ``t``'s own storage need not be kept: it is freed once the operation drops it)."""
    if binding.inner == 1:  # one entry per neuron on the axis: the tensor itself, where the transform allows
        direct = transform.along(t, binding.axis, None if fill is None else
                                 fill.reshape(binding.shape_for(shape, fill.shape[1])))
        if direct is not None:
            return direct
    view = binding.view(t)
    new_view = transform.linear(view, fill)
    restore = leading_view(t, view, new_view) if transform.keeps_prefix else None
    return binding.shape_back(new_view, shape), restore


def _random(shape: Sequence[int], scale: float, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if scale == 0:
        return like.new_zeros(shape)
    noise = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (scale * noise).to(dtype=like.dtype, device=like.device)


def _transform_neurons(space: NeuronSpace, transform: AxisTransform, remapper: StateRemapper, tx: Transaction,
                       fills: Optional[Callable[[Binding], Optional[Tensor]]] = None, verify: bool = False) -> None:
    for binding in space.neuron_bindings():
        _apply(space, binding, transform, remapper, tx, None if fills is None else fills(binding), verify)


@full_precision
def transform_space(space: NeuronSpace, transform: AxisTransform, *, optimizer: OptimizerArg = None,
                    on_unknown: str = "raise", fills: Optional[Callable[[Binding], Optional[Tensor]]] = None) -> None:
    """Apply one axis transform to every neuron-indexed tensor of ``space``, its gradient and its state.

    The building block of every operation, for transforms of your own (a permutation is a
    :class:`~iso_lightning.axis.Selection`). ``fills(binding)`` gives the new entries of an
    :class:`~iso_lightning.axis.Extension` (zeros by default). Group-indexed tensors are not touched.
    """
    check_space(space)
    remapper = remapper_for(optimizer, on_unknown, space)
    with atomic() as tx:
        _transform_neurons(space, transform, remapper, tx, fills)


def _set_group_index(space: NeuronSpace, index: Tensor, tx: Transaction) -> None:
    if space.activation is not None:
        space.activation.set_group_index(index, tx)


# ------------------------------------------------------------------------------------ spectra
def _group_rows(space: NeuronSpace) -> List[Tensor]:
    index = space.group_index()
    if space.singleton_groups:
        return [torch.tensor([j]) for j in range(space.width)]
    return [torch.nonzero(index == g).flatten() for g in range(space.groups())]


@full_precision
def singular_values(space: NeuronSpace) -> Tensor:
    """Singular values of the space's incoming matrix, per group, concatenated and sorted descending.

    Exact for small values too (the left basis of wide groups, then the row norms of ``U^T A``).
    """
    check_space(space)
    a = space.incoming_matrix()
    if space.singleton_groups:
        return torch.sort(a.double().norm(dim=1), descending=True).values
    values = []
    for rows in _group_rows(space):
        sub = a[rows]
        values.append(matrix_singular_values(sub) if sub.shape[1] <= 4 * sub.shape[0] else left_basis(sub)[1])
    return torch.sort(torch.cat(values), descending=True).values


@full_precision
def spectrum(space: NeuronSpace, out_norms: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Singular values (descending, float64) of each group, and, with ``out_norms``, the norm of each
    singular direction's outgoing column (in the same order); what a policy looks at.

    Without ``out_norms`` no basis is computed (cheaper for wide spaces; the smallest values are then
    accurate to about :math:`\\sqrt{n\\epsilon}\\,\\sigma_{max}`).
    """
    check_space(space)
    a = space.incoming_matrix()
    w_out = space.weight_out
    if space.singleton_groups:
        sigma = a.double().norm(dim=1)
        norms = None
        if out_norms and w_out is not None:
            norms = w_out.view(w_out.tensor.detach()).double().pow(2).sum(dim=(0, 2)).sqrt()
    else:
        sigmas, parts = [], []
        out_view = None if (w_out is None or not out_norms) else w_out.view(w_out.tensor.detach()).double()
        for rows in _group_rows(space):
            if out_view is None:
                sigmas.append(matrix_singular_values(a[rows], f"Space `{space.name}`"))
                continue
            u, s = left_basis(a[rows])
            sigmas.append(s)
            parts.append(torch.einsum("pir,ij->pjr", out_view[:, rows], u).pow(2).sum(dim=(0, 2)).sqrt())
        sigma = torch.cat(sigmas)
        norms = torch.cat(parts) if parts else None
    if not bool(torch.isfinite(sigma).all()):
        raise NonFiniteError(f"Space `{space.name}`: its singular values are not finite.")
    order = torch.argsort(sigma, descending=True, stable=True)
    return sigma[order], None if norms is None else norms[order]


def _block_rotation(space: NeuronSpace) -> Tuple[Tensor, Tensor]:
    """Per-group left bases embedded in one ``n x n`` matrix, and every neuron's singular value.

    A one-neuron group keeps its neuron as it is (a sign flip is no symmetry of most elementwise
    activations).
    """
    a = space.incoming_matrix()
    n = a.shape[0]
    m = torch.zeros(n, n, dtype=torch.float64)
    sigma = torch.zeros(n, dtype=torch.float64)
    for rows in _group_rows(space):
        if rows.numel() == 1:
            m[rows, rows] = 1.0
            sigma[rows] = a[rows].double().norm()
            continue
        u, s = left_basis(a[rows])
        m[rows.unsqueeze(1), rows.unsqueeze(0)] = u.cpu()
        sigma[rows] = s.cpu()
    if not bool(torch.isfinite(m).all()):
        raise NonFiniteError(f"Space `{space.name}`: the singular basis is not finite (degenerate spectrum).")
    return m, sigma


# ------------------------------------------------------------------------------------ probes
def _probe(space: NeuronSpace, probe: Optional[Tensor]) -> Optional[Tensor]:
    if probe is None:
        return None
    owner = space.owner
    if owner is None:
        raise ValueError(f"Expected argument `probe` to be None for space `{space.name}`: it has no owner module.")
    return probe_outputs(owner, probe, f" (the module that owns `{space.name}`)")


@contextlib.contextmanager
def evaluating(owner: Optional[nn.Module]) -> Iterator[None]:
    """Run ``owner`` in eval mode, every submodule's mode restored after: a probe or an expectation
    batch must not see dropout (two runs would differ) or update batch-norm statistics."""
    modes = [] if owner is None else [(m, m.training) for m in owner.modules()]
    if owner is not None:
        owner.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def probe_outputs(owner: nn.Module, probe: Any, whose: str = "") -> Tensor:
    """``owner(probe)``, detached, in eval mode: what an operation's measured error compares; ``probe`` is
    checked first."""
    if not isinstance(probe, Tensor):
        raise ValueError(f"Expected argument `probe` to be a tensor of inputs, but got {type(probe).__name__}.")
    if probe.is_floating_point() and not bool(torch.isfinite(probe).all()):
        raise NonFiniteError("Expected argument `probe` to hold finite inputs, but it holds NaN or Inf.")
    with torch.no_grad(), evaluating(owner):
        try:
            out = owner(probe)
        except Exception as err:  # a wrong shape or dtype: name the argument, not the layer
            raise ValueError(
                f"Expected argument `probe` to be a batch of inputs of {type(owner).__name__}{whose}, but it has "
                f"shape {tuple(probe.shape)} and running it failed: {err}"
            ) from None
    if not isinstance(out, Tensor):
        raise ValueError(f"Expected {type(owner).__name__} to return a tensor for `probe`, but got "
                         f"{type(out).__name__}.")
    return out.detach().clone()


def _probe_error(space: NeuronSpace, probe: Optional[Tensor], before: Optional[Tensor]) -> Optional[float]:
    if probe is None or before is None:
        return None
    after = _probe(space, probe)
    return float((after - before).abs().max())  # type: ignore[operator]


def _expectation(space: NeuronSpace, inputs: Any) -> Tensor:
    """The space's activations over ``inputs`` as ``(samples, width)`` float64 (validated)."""
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(
            f"Expected argument `expectation` to be a batch of inputs (a tensor of shape (N, ...)), but got "
            f"{type(inputs).__name__}."
        )
    if not bool(torch.isfinite(inputs).all()):
        raise NonFiniteError("Expected argument `expectation` to hold finite inputs, but it holds NaN or Inf.")
    if space.hidden is None:
        raise ValueError(f"Expected no `expectation` for space `{space.name}`: its provider cannot compute its "
                         "activations.")
    if any(b.tensor.dim() != 2 or b.inner != 1 for b in space.role(Role.WEIGHT_OUT)):
        raise ValueError("Expected a dense layer after the space for `expectation`; the next layer is not one.")
    with torch.no_grad(), evaluating(space.owner):
        try:
            h = space.hidden(inputs)
        except Exception as err:
            raise ValueError(
                f"Expected argument `expectation` to be a batch of inputs of the module that owns `{space.name}`, "
                f"but it has shape {tuple(inputs.shape)} and running it failed: {err}"
            ) from None
    h = h.detach().double().cpu()
    if h.dim() != 2 or h.shape[1] != space.width:
        raise ValueError(f"Space `{space.name}`: its activations have shape {tuple(h.shape)}, expected "
                         f"(N, {space.width}).")
    if not bool(torch.isfinite(h).all()):
        raise NonFiniteError(f"Space `{space.name}`: its activations over `expectation` are not finite.")
    return h


# ------------------------------------------------------------------------------------ grow
@full_precision
def grow(space: NeuronSpace, n: int = 1, *, optimizer: OptimizerArg = None, scale: float = 0.01,
         group: Union[None, int, str] = None, generator: Optional[torch.Generator] = None,
         on_unknown: str = "raise", zero: Optional[str] = None) -> SurgeryReport:
    """Append ``n`` neurons to ``space``; the function is exactly unchanged.

    By default (``zero="in"``) the new incoming rows, biases and corrections are zero and the outgoing
    columns ``scale * N(0, 1)``: the new pre-activations are exactly zero, so the output is unchanged
    for any activation with f(0) = 0, and the columns (not zero: a neuron with a zero column gets no
    gradient) let the neurons learn when f'(0) != 0. For activations with f'(0) = 0 (ReLU) the
    default is ``zero="out"``: random incoming rows (``scale * N(0, 1)``), bias ``scale`` and zero
    outgoing columns, which receive gradient ``f(b) * delta`` at once.

    ``group`` picks the group of a grouped isotropic space (default: each new neuron joins the group
    that is smallest at that moment; in a space of one-neuron groups each new neuron is a group of
    its own); ``"new"`` makes the new neurons one group of their own, with the initial intrinsic
    length and a zero correction column (exact too).
    """
    n = check_count("n", n)
    scale = check_scale("scale", scale)
    check_generator(generator)
    act = space.activation
    if act is None:
        raise ValueError(f"Space `{space.name}` is the model's {space.kind}, not a hidden space; use the model's "
                         f"add_{space.kind}s instead.")
    if zero is None:
        zero = "in" if act.grows_from_zero_row else "out"
    if zero not in ("in", "out"):
        raise ValueError(f"Expected argument `zero` to be 'in' or 'out', but got {zero!r}.")
    groups = space.groups()
    index = space.group_index()
    isotropic = isinstance(act, IsotropicSpaceActivation)
    assignment: List[int]
    new_groups = 0
    if not isotropic:
        if group is not None:
            raise ValueError(f"Expected argument `group` to be None for the elementwise space `{space.name}` (every "
                             f"neuron is its own group), but got {group!r}.")
        assignment = list(range(groups, groups + n))
    elif group == "new":
        assignment, new_groups = [groups] * n, 1
    elif group is None and space.singleton_groups:
        assignment, new_groups = list(range(groups, groups + n)), n
    elif group is None:
        sizes = torch.bincount(index, minlength=groups).tolist()
        assignment = []
        for _ in range(n):
            smallest = min(range(groups), key=lambda g: (sizes[g], g))
            assignment.append(smallest)
            sizes[smallest] += 1
    elif isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < groups:
        raise ValueError(
            f"Expected argument `group` to be None, 'new' or an int in [0, {groups - 1}], but got {group!r}."
        )
    else:
        assignment = [group] * n
    # The values, gradients and state of the neuron-indexed tensors are checked through their
    # extended copies, while these are in cache (an extension carries its input).
    check_space(space, defer=True, defer_values=True)
    remapper = remapper_for(optimizer, on_unknown, space, defer=True)
    old = space.width

    def fills(binding: Binding) -> Tensor:
        view = binding.view(binding.tensor)
        shape = (view.shape[0], n, view.shape[2])
        if binding.role == Role.WEIGHT_OUT:
            return _random(shape, scale if zero == "in" else 0.0, view, generator)
        if zero == "out" and binding.role == Role.WEIGHT_IN:
            return _random(shape, scale, view, generator)
        if zero == "out" and binding.role == Role.BIAS_IN:
            return view.new_full(shape, scale)
        return view.new_zeros(shape)

    with atomic() as tx:
        _transform_neurons(space, Extension(n), remapper, tx, fills, verify=True)
        if new_groups:
            assert isinstance(act, IsotropicSpaceActivation)
            for binding in space.group_bindings():
                view = binding.view(binding.tensor)
                value = act.activation.length_init if binding.role == Role.LENGTH else 0.0
                _apply(space, binding, Extension(new_groups), remapper, tx,
                       view.new_full((view.shape[0], new_groups, view.shape[2]), value))
        if isotropic:
            _set_group_index(space, torch.cat([index, torch.tensor(assignment, dtype=torch.long)]), tx)
    details = {"groups": assignment, "scale": scale, "new_group": group == "new", "zero": zero}
    return SurgeryReport("grow", space.name, old, old + n, details=details)


# ------------------------------------------------------------------------------------ removals
def _consumers_exact_for_constants(space: NeuronSpace) -> bool:
    """A constant input map reaches every output of each reading layer the same way (no padding)."""
    for b in space.role(Role.WEIGHT_OUT):
        t = b.tensor
        if t.dim() <= 2 or math.prod(t.shape[2:]) == 1:
            continue
        padding = getattr(b.module, "padding", 0)
        values = padding if isinstance(padding, (tuple, list)) else (padding,)
        if isinstance(padding, str) or any(int(p) != 0 for p in values):
            return False
    return True


def _partner(space: NeuronSpace, consumer: Binding, role: Role) -> Optional[Binding]:
    for b in space.role(role):
        if b.module is consumer.module:
            return b
    return None


def _fold_constants(space: NeuronSpace, neurons: Tensor, outputs: Tensor, group_terms: Optional[Tensor],
                    tx: Transaction) -> float:
    """Add ``W_out[:, neurons] @ outputs`` (and ``psi_out[:, g] * s_g`` for removed groups) to the next biases.

    ``group_terms`` is ``(groups removed, scale)``-shaped: a ``(k_groups, 2)`` tensor of group numbers
    and scales, or ``None``. Returns the norm of what no bias could absorb.
    """
    unabsorbed = 0.0
    for consumer in space.role(Role.WEIGHT_OUT):
        view = consumer.view(consumer.tensor.detach()).double()  # (out, n, rest)
        contribution = torch.einsum("pkr,k->p", view[:, neurons], outputs)
        psi = _partner(space, consumer, Role.CORRECTION_OUT)
        if psi is not None and group_terms is not None and group_terms.numel():
            pview = psi.view(psi.tensor.detach()).double()
            contribution = contribution + torch.einsum("pgr,g->p", pview[:, group_terms[:, 0].long()],
                                                       group_terms[:, 1])
        bias = _partner(space, consumer, Role.BIAS_OUT)
        if bias is None or bias.tensor.numel() != contribution.numel():
            unabsorbed += float(contribution.norm())
            continue
        t = bias.tensor
        folded = (t.detach().double() + contribution.reshape(t.shape).to(t.device)).to(t.dtype)
        _check_result(bias.label, "the bias", folded)
        tx.replace(t, folded)
    return unabsorbed


def _remove_groups(space: NeuronSpace, groups: Sequence[int], remapper: StateRemapper, tx: Transaction,
                   mean: Optional[Tensor] = None) -> Dict[str, Any]:
    """Remove whole groups, their constant output folded into the next biases (or their mean over
    inputs, ``mean`` being the space's mean activations)."""
    act = space.activation
    assert act is not None
    width, count = space.width, space.groups()
    index = space.group_index()
    removed_groups = torch.tensor(sorted(groups), dtype=torch.long)
    gone = torch.isin(index, removed_groups)
    neurons = torch.nonzero(gone).flatten()
    bias = space.bias
    b = torch.zeros(width, dtype=torch.float64) if bias is None else bias.tensor.detach().double().cpu()
    scales = act.constant_scales(b, index, count)
    if mean is None:
        outputs = scales[index[neurons]] * b[neurons]
        terms = torch.stack([removed_groups.double(), scales[removed_groups]], dim=1)
    else:
        outputs = mean[neurons]
        terms = None
    unabsorbed = _fold_constants(space, neurons.to(_device(space)), outputs.to(_device(space)),
                                 None if terms is None else terms.to(_device(space)), tx)
    if mean is not None and space.correction_out is not None:
        pview = space.correction_out.view(space.correction_out.tensor.detach()).double()
        unabsorbed += float(pview[:, removed_groups.to(pview.device)].norm())  # its mean scale is not known
    keep = torch.nonzero(~gone).flatten()
    _transform_neurons(space, Selection(keep), remapper, tx)
    keep_groups = torch.tensor([g for g in range(count) if g not in set(groups)], dtype=torch.long)
    for binding in space.group_bindings():
        _apply(space, binding, Selection(keep_groups), remapper, tx)
    if isinstance(act, IsotropicSpaceActivation):
        remaining = index[keep]
        renumber = torch.full((count,), -1, dtype=torch.long)
        renumber[keep_groups] = torch.arange(keep_groups.numel())
        _set_group_index(space, renumber[remaining], tx)
    return {"removed_bias": b[neurons].tolist(), "bias_fold": outputs.tolist(), "unabsorbed": unabsorbed,
            "neurons": neurons.tolist()}


def _device(space: NeuronSpace) -> torch.device:
    return space.bindings[0].tensor.device


def _tolerance(width: int, dtype: torch.dtype, norm: float) -> float:
    # Round-off of a rotation: a few ulps of |A| per neuron.
    return 10 * width * torch.finfo(dtype).eps * max(1.0, norm)


@full_precision
def remove_group(space: NeuronSpace, group: Optional[int] = None, *, optimizer: OptimizerArg = None,
                 probe: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
    r"""Remove a whole group of ``space`` (default: the weakest, smallest :math:`\lVert A_G \rVert_F`).

    When the group's rows of :math:`A = [W_{in} \mid \psi_{in}]` are zero its output is the constant
    :math:`c = s_G(\lVert b_G \rVert^2 + o_G)\, b_G`, and its whole contribution to the next layer,
    :math:`s_G (W_{out}[:, G]\, b_G + \psi_{out}[:, g])`, is folded into the next bias. That is exact
    when the next layer is dense; a padded convolution sees the constant map cut at the border, so
    there the report carries the error.
    """
    groups = space.groups()
    if groups < 2:
        raise ValueError(
            f"Expected argument `space` to have at least two groups (a space keeps one), but `{space.name}` has "
            f"{groups}."
        )
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < groups):
        raise ValueError(f"Expected argument `group` to be None or an int in [0, {groups - 1}], but got {group!r}.")
    check_space(space)
    a = space.incoming_matrix().double()
    rows_by_group = [torch.nonzero(space.group_index() == g).flatten() for g in range(groups)]
    norms = torch.stack([a[rows.to(a.device)].norm() for rows in rows_by_group]).cpu()
    if group is None:
        group = int(torch.argmin(norms))
    remapper = remapper_for(optimizer, on_unknown, space)
    before = _probe(space, probe)
    old = space.width
    residual = float(norms[group])
    with atomic() as tx:
        details = _remove_groups(space, [group], remapper, tx)
    exact = residual <= _tolerance(old, a.dtype, float(a.norm())) and _consumers_exact_for_constants(space) \
        and details["unabsorbed"] == 0.0
    lipschitz = space.activation.lipschitz if space.activation is not None else 1.0
    report = SurgeryReport("remove_group", space.name, old, space.width, norms[group:group + 1],
                           lipschitz * residual + details["unabsorbed"], exact=exact,
                           details={"group": group, **details})
    report.measured_error = _probe_error(space, probe, before)
    return report


def _pick_removals(sigma_by_group: List[Tensor], n: int, space: NeuronSpace) -> List[int]:
    """How many directions to take from each group: the ``n`` smallest candidates overall.

    ``sigma_by_group`` holds each group's removable candidates (never its strongest direction).
    """
    candidates = []
    for g, s in enumerate(sigma_by_group):
        candidates += [(float(v), g) for v in s]
    if n > len(candidates):
        raise ValueError(
            f"Expected argument `n` to leave at least one neuron per group in `{space.name}` "
            f"(width {space.width}, {len(sigma_by_group)} group(s)), but got n={n}."
        )
    candidates.sort(key=lambda c: c[0])
    counts = [0] * len(sigma_by_group)
    for _, g in candidates[:n]:
        counts[g] += 1
    return counts


def _fold_directions(space: NeuronSpace, removed: Tensor, tx: Transaction) -> Dict[str, Any]:
    """Absorb the constant part of the removed directions into ``o`` and the next correction."""
    bias = space.bias
    device = _device(space)
    b = torch.zeros(removed.numel(), dtype=torch.float64) if bias is None else \
        bias.tensor.detach()[removed.to(bias.tensor.device)].double().cpu()
    groups = space.group_index()[removed]
    act = space.activation
    assert isinstance(act, IsotropicSpaceActivation)
    clamped = False
    unabsorbed = 0.0
    length = space.first(Role.LENGTH)
    if length is not None:
        t = length.tensor
        add = torch.zeros(t.shape[0], dtype=torch.float64).index_add(0, groups, b * b)
        new = t.detach().double().cpu().abs() + add
        if act.activation.length_mode == "trainable" and bool((new > act.activation.max_length).any()):
            # The forward pass caps o at max_length: the excess is not absorbed.
            clamped = True
            unabsorbed += float((new - act.activation.max_length).clamp_min(0).sum())
        new = new.to(device=t.device, dtype=t.dtype)
        _check_result(length.label, "the intrinsic length", new)
        tx.replace(t, new)
    else:
        unabsorbed += float((b * b).sum())
    for consumer in space.role(Role.WEIGHT_OUT):
        out_view = consumer.view(consumer.tensor.detach())[:, removed.to(device)].double()  # (pre, k, rest)
        contribution = out_view * b.to(device)[None, :, None]
        psi = _partner(space, consumer, Role.CORRECTION_OUT)
        if psi is None:
            unabsorbed += float(contribution.norm())
            continue
        t = psi.tensor
        view = psi.view(t.detach()).double()
        delta = torch.zeros(view.shape, dtype=torch.float64, device=device).index_add(1, groups.to(device),
                                                                                      contribution)
        folded = psi.shape_back(view + delta, t.shape).to(t.dtype)
        _check_result(psi.label, "the correction", folded)
        tx.replace(t, folded)
    return {"removed_bias": b.tolist(), "unabsorbed": unabsorbed, "clamped": clamped,
            "folded_length": length is not None, "folded_psi": space.correction_out is not None}


def _fold_mean(space: NeuronSpace, removed: Tensor, mean: Tensor, spread: Tensor, tx: Transaction) -> Dict[str, Any]:
    """Add the removed neurons' mean contribution over the inputs to the next layer's bias."""
    device = _device(space)
    unabsorbed = _fold_constants(space, removed.to(device), mean.to(device), None, tx)
    w_out = space.weight_out
    assert w_out is not None
    cols = w_out.view(w_out.tensor.detach())[:, removed.to(device)].double()[:, :, 0]
    return {"removed_mean": mean.tolist(), "spread": float(torch.linalg.matrix_norm(cols.cpu(), 2) * spread.norm()),
            "unabsorbed": unabsorbed, "clamped": False, "folded_length": False, "folded_psi": False,
            "expectation_fold": True}


@full_precision
def shrink(space: NeuronSpace, n: int = 1, *, optimizer: OptimizerArg = None, probe: Optional[Tensor] = None,
           expectation: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
    r"""Remove the ``n`` weakest directions (or, with one-neuron groups, neurons) of ``space``.

    See the module docstring. Refuses to leave a space (or a group of several neurons) empty. The
    report lists the removed singular values and biases, the folds applied and an error estimate;
    with ``probe`` inputs of the space's owner it also measures the largest change of its output.

    ``expectation`` (inputs of the owner, e.g. a training batch) selects the *expectation fold*
    instead of the psi fold: the removed neurons' mean output over those inputs, :math:`W_{out}[:, k]\,
    \mathbb{E}[h_k]`, is added to the next bias. It needs no psi, is exact only for outputs that do
    not vary, and its error estimate is :math:`\lVert W_{out}[:, removed] \rVert` times the removed
    outputs' standard deviation. Only for a dense next layer. Probe and expectation batches run the owner
    in eval mode (no dropout, batch-norm statistics untouched), its modes restored after.
    """
    n = check_count("n", n)
    if space.activation is None:
        raise ValueError(f"Space `{space.name}` is the model's {space.kind}, not a hidden space; use the model's "
                         f"remove_{space.kind}s instead.")
    width = space.width
    if n > width - space.min_width:
        what = "one neuron" if space.min_width == 1 else f"one neuron in each of its {space.min_width} groups"
        raise ValueError(
            f"Expected argument `n` to be at most {width - space.min_width} for `{space.name}` (width {width}): a "
            f"space keeps at least {what}, but got n={n}."
        )
    # Exact zero rows of the incoming matrix (neurons grown and not trained yet) are null directions:
    # removing them needs no decomposition and no rotation. Otherwise every neuron-indexed tensor is
    # rotated first, by Householder reflectors (unless they are many), whose result checks cover
    # their inputs.
    zero = None if space.singleton_groups else _zero_row_removals(space, n)
    defer = zero is None and not space.singleton_groups and not _dense_removal(n, width)
    check_space(space, defer=defer)
    h = None if expectation is None else _expectation(space, expectation)
    remapper = remapper_for(optimizer, on_unknown, space, defer=defer)
    before = _probe(space, probe)
    if space.singleton_groups:
        report = _shrink_neurons(space, n, remapper, h)
    else:
        report = _shrink_directions(space, n, remapper, h, verify=defer, zero_rows=zero)
    report.measured_error = _probe_error(space, probe, before)
    return report


def _shrink_neurons(space: NeuronSpace, n: int, remapper: StateRemapper, h: Optional[Tensor]) -> SurgeryReport:
    a = space.incoming_matrix()
    norms = a.double().norm(dim=1).cpu()
    if not bool(torch.isfinite(norms).all()):
        raise NonFiniteError(f"Space `{space.name}`: its incoming rows overflow; refusing to shrink it.")
    order = torch.argsort(norms, stable=True)
    removed = torch.sort(order[:n]).values
    width = space.width
    w_out = space.weight_out
    assert w_out is not None
    out_norm = float(w_out.view(w_out.tensor.detach())[:, removed.to(_device(space))].double().norm())
    residual = float(norms[removed].norm())
    act = space.activation
    assert act is not None
    with atomic() as tx:
        index = space.group_index()
        groups = sorted(set(index[removed].tolist()))
        if h is None:
            details = _remove_groups(space, groups, remapper, tx)
            estimate = act.lipschitz * residual * out_norm + details["unabsorbed"]
        else:
            details = _remove_groups(space, groups, remapper, tx, mean=h.mean(dim=0))
            spread = h[:, removed].std(dim=0, unbiased=False)
            details["spread"] = float(out_norm * spread.norm())
            details["expectation_fold"] = True
            estimate = details["spread"] + details["unabsorbed"]
    exact = residual <= _tolerance(width, a.dtype, float(a.double().norm())) and details["unabsorbed"] == 0.0 \
        and _consumers_exact_for_constants(space) and details.get("spread", 0.0) == 0.0
    details["residual"] = residual
    return SurgeryReport("shrink", space.name, width, width - n, torch.sort(norms[removed]).values, estimate,
                         exact=exact, details=details)


def _dense_removal(k: int, width: int) -> bool:
    # k reflectors cost O(k n) per column and their squared-entry rule O(k^2 n): a dense n x n
    # rotation is the cheaper one beyond k^2 > n.
    return k * k > width


def _zero_row_removals(space: NeuronSpace, n: int) -> Optional[Tensor]:
    """``n`` neurons with zero incoming rows to remove (each group keeps a neuron), or ``None``."""
    zero = space.zero_rows()
    if zero.numel() < n:
        return None
    mask = torch.zeros(space.width, dtype=torch.bool)
    mask[zero] = True
    # The last ones of each group: grown neurons sit at the end, and a removal there leaves a run of
    # the first neurons, which is a narrow view of every tensor rather than a copy.
    candidates = [rows[mask[rows]][-(rows.numel() - 1):] if rows.numel() > 1 else rows[:0]
                  for rows in _group_rows(space)]
    if sum(c.numel() for c in candidates) < n:
        return None
    counts = _pick_removals([torch.zeros(c.numel(), dtype=torch.float64) for c in candidates], n, space)
    return torch.sort(torch.cat([c[c.numel() - k:] for c, k in zip(candidates, counts)])).values


def _shrink_directions(space: NeuronSpace, n: int, remapper: StateRemapper, h: Optional[Tensor],
                       verify: bool = False, zero_rows: Optional[Tensor] = None) -> SurgeryReport:
    """Remove ``n`` weakest directions; ``zero_rows`` (from :func:`_zero_row_removals`): these neurons,
    null directions already, without a rotation."""
    width = space.width
    if zero_rows is not None:
        rotation: Optional[AxisTransform] = None
        removed_idx, tol = zero_rows, 0.0
    else:
        rotation, removed_idx, tol = _weakest_rotation(space, n)
    index_before = space.group_index()
    device = _device(space)
    with atomic() as tx:
        if rotation is not None:
            _transform_neurons(space, rotation, remapper, tx, verify=verify)
        if h is None:
            details = _fold_directions(space, removed_idx, tx)
        else:
            rotated = h if rotation is None else rotation.linear(h[:, :, None])[:, :, 0]  # in the new basis
            details = _fold_mean(space, removed_idx, rotated[:, removed_idx].mean(dim=0),
                                 rotated[:, removed_idx].std(dim=0, unbiased=False), tx)
        a_removed = space.incoming_matrix(removed_idx).double()
        residual = float(a_removed.norm())
        # Per group: rows removed from different groups are not orthogonal to each other.
        removed_groups = index_before[removed_idx]
        parts = []
        for g in torch.unique(removed_groups):
            block = a_removed[(removed_groups == g).to(device)]
            values = torch.zeros(block.shape[0], dtype=torch.float64)
            found = torch.linalg.svdvals(block).cpu()  # min(k, d) values; the rest are zero
            values[: found.numel()] = found
            parts.append(values)
        sigma_removed = torch.sort(torch.cat(parts)).values
        w_out = space.weight_out
        assert w_out is not None
        out_norm = float(w_out.view(w_out.tensor.detach())[:, removed_idx.to(device)].double().norm())
        keep = torch.ones(width, dtype=torch.bool)
        keep[removed_idx] = False
        keep_idx = torch.nonzero(keep).flatten()
        _transform_neurons(space, Selection(keep_idx), remapper, tx)
        _set_group_index(space, index_before[keep_idx], tx)  # every group keeps a neuron: numbering unchanged
    estimate = residual * out_norm + details["unabsorbed"] if h is None else details["spread"]
    exact = (residual <= tol and details["unabsorbed"] == 0.0 and not details["clamped"]
             and details.get("spread", 0.0) == 0.0)
    details["residual"] = residual
    return SurgeryReport("shrink", space.name, width, width - n, sigma_removed, estimate, exact=exact,
                         details=details)


def _weakest_rotation(space: NeuronSpace, n: int) -> Tuple[AxisTransform, Tensor, float]:
    """The rotation that brings the ``n`` weakest directions to the first positions of their groups,
    those positions, and the residual below which their removal is exact."""
    a = space.incoming_matrix()
    rows_by_group = _group_rows(space)
    label = f"Space `{space.name}`"
    # Each group can give at most n candidates and must keep one neuron.
    eig = [weakest_directions(a if len(rows_by_group) == 1 else a[rows.to(a.device)], min(n, rows.numel() - 1),
                              label) for rows in rows_by_group]
    counts = _pick_removals([sigma for sigma, _, _ in eig], n, space)
    # Householder reflectors that bring each group's weakest directions to its first positions.
    width = space.width
    reflectors, taus, removed = [], [], []
    for rows, (_, vecs, _), k in zip(rows_by_group, eig, counts):
        if k == 0:
            continue
        bottom = vecs[:, :k].cpu()  # weakest first
        qr, tau = torch.geqrf(bottom)
        v = torch.zeros(width, k, dtype=torch.float64)
        v[rows] = torch.tril(qr, -1) + torch.eye(rows.numel(), k, dtype=torch.float64)
        reflectors.append(v)
        taus.append(tau)
        removed.append(rows[:k])
    v_all, tau_all = torch.cat(reflectors, 1), torch.cat(taus)
    rotation: AxisTransform = HouseholderRotation.from_vectors(v_all, tau_all)
    if _dense_removal(v_all.shape[1], width):
        rotation = DenseRotation(rotation.dense())  # type: ignore[attr-defined]
    removed_idx = torch.sort(torch.cat(removed)).values
    norm = math.sqrt(sum(frobenius for _, _, frobenius in eig))  # ||A||_F, from the decompositions
    return rotation, removed_idx, _tolerance(width, a.dtype, norm)


@full_precision
def resize(space: NeuronSpace, width: int, *, optimizer: OptimizerArg = None,
           generator: Optional[torch.Generator] = None, on_unknown: str = "raise",
           scale: float = 0.01) -> Optional[SurgeryReport]:
    """Grow or shrink ``space`` to ``width`` neurons (``None`` when it already has that width)."""
    width = check_count("width", width)
    current = space.width
    if width == current:  # nothing to do, but the arguments are still checked
        check_scale("scale", scale)
        check_generator(generator)
        remapper_for(optimizer, on_unknown, space)
    if width > current:
        return grow(space, width - current, optimizer=optimizer, scale=scale, generator=generator,
                    on_unknown=on_unknown)
    if width < current:
        return shrink(space, current - width, optimizer=optimizer, on_unknown=on_unknown)
    return None


# ------------------------------------------------------------------------------------ diagonalise
@full_precision
def diagonalise(space: NeuronSpace, mode: str = "left", *, previous: Optional[NeuronSpace] = None,
                optimizer: OptimizerArg = None, on_unknown: str = "raise") -> SurgeryReport:
    """Rewrite ``space`` in its singular basis; the function is unchanged.

    ``mode="left"`` rotates the space so that row ``k`` of its incoming weight carries the ``k``-th
    singular value (within each group; one-neuron groups and elementwise spaces are left as they
    are). ``mode="full"`` also rotates ``previous`` (the space the incoming weight reads) so that
    the weight itself becomes diagonal (off-diagonal entries exact zeros); it needs a weight that
    is a matrix (dense, or a 1x1 convolution) between two single-group isotropic spaces.
    """
    if mode not in ("left", "full"):
        raise ValueError(f"Expected argument `mode` to be 'left' or 'full', but got {mode!r}.")
    if mode == "full":
        if previous is None:
            raise ValueError("Expected argument `previous` (the space the weight reads) for mode='full'.")
        return _diagonalise_full(space, previous, optimizer, on_unknown)
    check_space(space)
    remapper = remapper_for(optimizer, on_unknown, space)
    m, sigma = _block_rotation(space)
    if not bool(torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype))):
        with atomic() as tx:
            _transform_neurons(space, DenseRotation(m.to(_device(space))), remapper, tx)
    return SurgeryReport("diagonalise", space.name, space.width, space.width, sigma)


def full_weight(space: NeuronSpace, previous: NeuronSpace) -> Binding:
    """The weight between ``previous`` and ``space`` for a full diagonalisation (refuses other layouts)."""
    w = space.weight_in
    read = previous.weight_out
    if w is None or read is None or w.tensor is not read.tensor:
        raise ValueError(f"Expected `{previous.name}` to be the space that the incoming weight of `{space.name}` "
                         "reads.")
    t = w.tensor
    if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
        raise ValueError(f"Full diagonalisation of `{space.name}` needs a 1x1 kernel, but its kernel is "
                         f"{tuple(t.shape[2:])}; use mode='left'.")
    if read.inner != 1:
        raise ValueError(f"Full diagonalisation of `{space.name}` needs a square channel map (no flatten before it).")
    for sp in (previous, space):
        if not isinstance(sp.activation, IsotropicSpaceActivation) or sp.groups() != 1:
            raise ValueError(f"Full diagonalisation needs single-group isotropic spaces; `{sp.name}` has "
                             f"{sp.groups()} group(s).")
    return w


def _diagonalise_full(space: NeuronSpace, previous: NeuronSpace, optimizer: OptimizerArg,
                      on_unknown: str) -> SurgeryReport:
    binding = full_weight(space, previous)
    check_space(space)
    check_space(previous)
    remapper = remapper_for(optimizer, on_unknown, space, previous)
    weight = binding.tensor
    w = weight.detach().reshape(weight.shape[0], weight.shape[1])
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=True)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(vh).all())):
        raise NonFiniteError(f"Space `{space.name}`: the singular basis is not finite (degenerate spectrum).")
    with atomic() as tx:
        _transform_neurons(previous, DenseRotation(vh.T), remapper, tx)
        _transform_neurons(space, DenseRotation(u), remapper, tx)
        flat = weight.detach().reshape(weight.shape[0], weight.shape[1])
        diagonal = torch.zeros_like(flat)
        torch.diagonal(diagonal).copy_(torch.diagonal(flat))
        tx.replace(weight, diagonal.reshape(weight.shape))
    sigma = torch.zeros(space.width, dtype=torch.float64)
    sigma[: s.numel()] = s.cpu()
    return SurgeryReport("diagonalise", space.name, space.width, space.width, sigma, details={"mode": "full"})


# ------------------------------------------------------------------------------------ several spaces
def downstream_first(spaces: Mapping[str, NeuronSpace]) -> List[str]:
    """Names ordered so that a space comes before every space that feeds it (the order rule).

    Space ``B`` feeds ``A`` when a weight that reads ``B`` produces ``A``.
    """
    produced_by = {name: {id(b.tensor) for b in sp.role(Role.WEIGHT_IN)} for name, sp in spaces.items()}
    read_by = {name: {id(b.tensor) for b in sp.role(Role.WEIGHT_OUT)} for name, sp in spaces.items()}
    feeds = {b: {a for a in spaces if a != b and produced_by[a] & read_by[b]} for b in spaces}
    order: List[str] = []
    placed: set = set()
    pending = list(spaces)
    while pending:
        for name in pending:
            if feeds[name] <= placed:  # every space it feeds is already placed
                order.append(name)
                placed.add(name)
                pending.remove(name)
                break
        else:  # a cycle (recurrent weights): keep the given order for the rest
            order += pending
            break
    return order


@full_precision
def set_widths(spaces: Mapping[str, NeuronSpace], widths: Mapping[str, int], *, optimizer: OptimizerArg = None,
               generator: Optional[torch.Generator] = None, on_unknown: str = "raise",
               scale: Union[float, Mapping[str, float]] = 0.01, argument: str = "widths") -> List[SurgeryReport]:
    """Resize several spaces at once, all or nothing, in the order of :func:`downstream_first`.

    ``widths`` maps space names (keys of ``spaces``) to new widths; every entry is checked before any
    space changes, and a failure part-way undoes the spaces already changed. ``argument`` is the
    name error messages give ``widths`` (a caller's own argument name).
    """
    if not isinstance(widths, Mapping):
        raise ValueError(f"Expected argument `{argument}` to be a mapping of space names to widths, but got "
                         f"{type(widths).__name__}.")
    hidden = {name: sp for name, sp in spaces.items() if sp.kind == "hidden"}
    for name, width in widths.items():
        if name not in hidden:
            raise ValueError(f"Expected the names in `{argument}` to be spaces of the model {sorted(hidden)}, but "
                             f"got {name!r}.")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"Expected argument `{argument}` to give every space an int >= 1, but got {width!r} "
                             f"for `{name}`.")
        space = hidden[name]
        if width < space.width and width < space.min_width:
            raise ValueError(
                f"Expected argument `{argument}` to give `{name}` at least {space.min_width} neurons (a space keeps "
                f"one neuron per group), but got {width}."
            )
    check_generator(generator)
    _check_on_unknown(on_unknown)
    touched = {name: hidden[name] for name, width in widths.items() if width != hidden[name].width}
    for space in touched.values():
        check_space(space)
    remapper = remapper_for(optimizer, on_unknown, *touched.values())
    # `optimizer` must train the model even where nothing changes (a no-op included): the spaces left
    # as they are are checked as the optimizer's (held, a rule, state shaped like its parameter), not
    # their values.
    params, names = _params([sp for name, sp in hidden.items() if name not in touched])
    remapper.validate(params, names, unchecked={id(p) for p in params})
    reports = []
    with atomic():
        for name in [n for n in downstream_first(hidden) if n in touched]:
            step = scale if not isinstance(scale, Mapping) else scale.get(name, 0.01)
            report = resize(touched[name], widths[name], optimizer=optimizer, generator=generator,
                            on_unknown=on_unknown, scale=step)
            if report is not None:
                reports.append(report)
    return reports
