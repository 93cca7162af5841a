r"""Neuron surgery on a :class:`~iso_lightning.spaces.NeuronSpace`: rotate, grow, shrink, diagonalise.

Every operation is checked completely before the first tensor changes (layer index, counts, finite
values, optimizer compatibility), so a refused operation leaves the model and its optimizer exactly
as they were. Each one is built from the axis transforms of :mod:`iso_lightning.axis`, applied to
every tensor of the space, to their gradients and to the optimizer state.

.. rubric:: Order rule for several layers

Changing hidden space ``l`` rewrites the columns of the next weight ``W_{l+1}`` (new neurons bring
random columns, removed ones take theirs away, the folds change ``psi_l``), so it changes the
spectrum of space ``l + 1``. Apply changes from the **last hidden layer to the first**: then every
space is changed with the spectrum that was measured for it, and a neuron found to have a zero
singular value is still exactly removable when its turn comes. :func:`set_widths` does this; the
Lightning callback does too.

.. rubric:: Shrink

Removing the ``k`` weakest directions of a space finds them once for any ``k``, as left singular
vectors of :math:`A = [W_l \mid \psi_{l-1}]` (never a ``d x d`` matrix): from an SVD of ``A`` for
spaces of up to 64 neurons (256 in float64); from the float32 Gram matrix :math:`A A^T` for wider
spaces of float32 (or lower precision) weights, by inverse subspace iteration and a Rayleigh-Ritz
step with the weights themselves (:func:`_weakest_float32`); from the float64 Gram matrix for wider
float64 spaces. Then a rotation of ``k`` Householder reflectors, applied in place, brings those directions
to the first ``k`` positions, the folds

.. math::

    o_G \mathrel{+}= \textstyle\sum_{k} b_k^2, \qquad \psi_l[:, G] \mathrel{+}= \textstyle\sum_k W_{l+1}[:, k]\, b_k,

and a selection of the remaining neurons. When the removed rows of ``A`` are zero the removal is
exact: the neurons' pre-activations are the constants ``b_k``, which the folds reproduce.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union, cast

import numpy as np
import scipy.linalg as scipy_linalg
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from iso_lightning._validation import check_int
from iso_lightning.axis import AxisTransform, DenseRotation, Extension, HouseholderRotation, Selection
from iso_lightning.functional import radial_scale as act_scale
from iso_lightning.optim import StateRemapper
from iso_lightning.spaces import Binding, NeuronSpace

__all__ = [
    "NonFiniteError",
    "SparsifyReport",
    "SurgeryReport",
    "add_boundary",
    "diagonalise",
    "grow",
    "left_basis",
    "remove_boundary",
    "remove_group",
    "resize",
    "set_widths",
    "shrink",
    "singular_values",
    "sparsify",
]

# Above this many columns per row the Gram matrix (n x n) is used instead of an SVD of A.
_GRAM_RATIO = 4
# Columns per slab when the Gram matrix of a wide A is accumulated in float64.
_GRAM_SLAB = 8192


class NonFiniteError(FloatingPointError):
    """A tensor of a neuron space holds NaN or Inf; no surgery is computed from it."""


@dataclass
class SurgeryReport:
    """What one operation did.

    Attributes:
        op: ``"grow"``, ``"shrink"``, ``"diagonalise"``, ``"add_inputs"`` ...
        space: the space's name (``"hidden.0"``, ``"input"``, ``"output"``).
        old_width, new_width: sizes before and after.
        singular_values: singular values involved (removed ones for a shrink, all for a
            diagonalisation), float64.
        error_estimate: first-order size of the change of the next pre-activation per unit input
            (0 for exact operations). For a shrink it adds the dropped input-dependent part
            ``||A_removed|| * ||W_{l+1}[:, removed]||`` and every part a disabled fold could not absorb.
        exact: the operation keeps the function unchanged up to round-off.
        measured_error: max |Δ output| on ``probe`` inputs when a probe was given, else ``None``.
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
    """Result of :func:`sparsify`: structurally zero weights and the function error they cost."""

    layers: List[int]
    zero_weights: int
    total_weights: int
    max_abs_error: float
    max_rel_error: float
    seconds: float

    @property
    def zero_fraction(self) -> float:
        return self.zero_weights / max(1, self.total_weights)


_F = TypeVar("_F", bound=Callable[..., Any])


def _full_precision(fn: _F) -> _F:
    """Run ``fn`` with full float32 matrix products (no TF32 or bfloat16 passes), then restore the setting.

    ``torch.set_float32_matmul_precision("high")``, which Lightning suggests on GPUs, rounds the
    inputs of float32 products to 10 or 8 bits: rotations and decompositions computed that way are
    not function-preserving to float32 accuracy any more.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = torch.get_float32_matmul_precision()
        if previous == "highest":
            return fn(*args, **kwargs)
        torch.set_float32_matmul_precision("highest")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_float32_matmul_precision(previous)

    return cast(_F, wrapper)


# ---------------------------------------------------------------------------- checks
def _check_count(name: str, n: Any, minimum: int = 1) -> int:
    check_int(name, n, minimum)
    return int(n)


def _check_finite(space: NeuronSpace) -> None:
    for name, t in space.tensors():
        # One reduction first: a NaN or Inf anywhere makes the sum non-finite. Only then (or on an
        # overflowing sum of finite values) pay for the element-wise test.
        if t.is_floating_point() and bool(torch.isfinite(t.detach().sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"Space `{space.name}`: tensor {name} holds {bad} non-finite value(s); refusing to operate on it."
            )


def _params(space: NeuronSpace, *extra: NeuronSpace) -> Tuple[List[Tensor], Dict[int, str]]:
    tensors: Dict[int, Tensor] = {}
    names: Dict[int, str] = {}
    for sp in (space,) + extra:
        for b, _ in sp.neuron_bindings():
            tensors[id(b.tensor)] = b.tensor
            names[id(b.tensor)] = f"{type(b.module).__name__}.{b.name}"
        for b in sp.group_bindings():
            tensors[id(b.tensor)] = b.tensor
            names[id(b.tensor)] = f"{type(b.module).__name__}.{b.name}"
    return list(tensors.values()), names


def _remapper(optimizer: Any, on_unknown: str, *spaces: NeuronSpace) -> StateRemapper:
    remapper = StateRemapper(optimizer, on_unknown)
    params, names = _params(*spaces)
    remapper.validate(params, names)
    return remapper


# ---------------------------------------------------------------------------- applying transforms
def _apply(binding: Binding, transform: AxisTransform, remapper: StateRemapper, fill: Optional[Tensor] = None) -> None:
    """Apply ``transform`` to one bound tensor, its gradient and its optimizer state."""
    t = binding.tensor
    shape = t.shape
    remapper.apply(t, binding.view, lambda v: binding.shape_back(v, shape), transform)
    with torch.no_grad():
        grad = t.grad
        new_grad = None
        if grad is not None:
            new_grad = binding.shape_back(transform.linear(binding.view(grad)), shape)
        view = binding.view(t.detach())
        new = binding.shape_back(transform.linear(view, fill), shape)
        if new.data_ptr() != t.data_ptr() or new.shape != t.shape:
            # set_ keeps the Parameter object (and so every optimizer and hook reference) alive and
            # is safe even when an old autograd graph still refers to the parameter.
            t.set_(new)  # type: ignore[call-overload]
        if grad is not None:
            t.grad = new_grad


def _random(shape: Sequence[int], scale: float, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if scale == 0:
        return like.new_zeros(shape)
    noise = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (scale * noise).to(dtype=like.dtype, device=like.device)


def _transform_space(space: NeuronSpace, transform: AxisTransform, remapper: StateRemapper,
                     consumer_fill: Optional[Any] = None) -> None:
    for binding, role in space.neuron_bindings():
        fill = consumer_fill(binding) if (role == "consumer" and consumer_fill is not None) else None
        _apply(binding, transform, remapper, fill)


def _set_group_index(space: NeuronSpace, index: Tensor) -> None:
    act = space.activation
    if act is not None and act.group_index is not None:
        act.group_index = index.to(act.group_index.device)


# ---------------------------------------------------------------------------- spectra
# Spaces up to this width take the removal directions from an SVD of A (backward stable, any
# conditioning). Wider float64 spaces use the float64 Gram matrix A A^T, whose eigenvectors are
# accurate to about eps * cond(A)**2: exactness of a zero-singular-value removal then holds to the
# stated bounds for condition numbers up to ~1e4. Wider float32 spaces use the float32 Gram matrix
# with a final step on the weights (see _weakest_float32), and the float64 route when that cannot
# resolve their weakest directions (tests/test_wide_spaces.py).
_SVD_WIDTH = 256
# The float32 route is so much cheaper (a 256 x 784 layer: 1.4-7.5 ms instead of ~20 ms) that
# float32 spaces take it from this width on; the SVD keeps the narrow ones at any conditioning.
_SVD_WIDTH_FLOAT32 = 64
# ... as long as the SVD's float64 copy of A stays small (128 MiB).
_SVD_ELEMENTS = 1 << 24


def _gram(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``A A^T`` in ``dtype``, never materialising more than a slab of ``A`` in that dtype.

    Only the blocks on and below the diagonal are multiplied (about 5/8 of a full product with
    four row blocks), so only the **lower triangle** (with the diagonal) is defined; every consumer
    (Cholesky, ``eigh``, LAPACK ``syevr``) reads that triangle only.
    """
    n, d = a.shape
    g = torch.empty(n, n, dtype=dtype, device=a.device)
    rows = max(1, -(-n // 4)) if n >= 64 else n
    for start in range(0, max(d, 1), _GRAM_SLAB):
        block = a[:, start : start + _GRAM_SLAB].to(dtype)
        for i in range(0, n, rows):
            out = g[i : i + rows, : i + rows]
            if start == 0:
                torch.mm(block[i : i + rows], block[: i + rows].T, out=out)
            else:
                out.addmm_(block[i : i + rows], block[: i + rows].T)
    return g


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _bottom_eigenpairs(g: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    """The ``count`` smallest eigenvalues (ascending) and eigenvectors of a symmetric matrix, as float64.

    Reads the lower triangle only, in float64 (a float32 decomposition of a float32 Gram matrix
    loses digits its weakest directions need). On the CPU only the wanted pairs are computed
    (LAPACK ``syevr`` with an index range), about three times faster than a full decomposition for
    a few pairs of a 500 x 500 matrix.
    """
    n = g.shape[0]
    count = min(count, n)
    work = g.to(torch.float64)
    if g.device.type == "cpu" and count < n:
        # One BLAS thread: SciPy's OpenBLAS threads would otherwise keep spinning after the call and
        # compete with PyTorch's own threads for the same cores.
        with _blas_controller().limit(limits=1, user_api="blas"):
            vals, vecs = scipy_linalg.eigh(work.numpy(), subset_by_index=[0, count - 1], driver="evr", lower=True,
                                           check_finite=False)
        return torch.from_numpy(vals), torch.from_numpy(np.ascontiguousarray(vecs))
    vals_t, vecs_t = torch.linalg.eigh(work)
    return vals_t[:count], vecs_t[:, :count]


# Wider spaces whose weights are not float64 work on the float32 Gram matrix (a float32 product,
# half the cost of a float64 one) with an inverse subspace iteration (a few triangular solves
# instead of a dense eigen-decomposition); see :func:`_weakest_float32`. The wanted Ritz values
# must be within this fraction of the largest of them (plus the Gram matrix's rounding) of their
# limits.
_ITER_TOL = 1e-4
# Iterations allowed per neuron of the space: a dense decomposition costs ~n^3, an iteration ~n^2,
# so beyond ~n/32 iterations the dense decomposition (the fallback) is the cheaper one. A slower
# convergence ratio than this (estimated from the Ritz values) switches to it at once.
_ITER_PER_NEURON = 1 / 32
_ITER_SLOW = 0.9
# Extra directions iterated beside the wanted ones (at least as many as wanted): the wanted ones
# converge at the rate lambda_k / lambda_(p+1).
_ITER_EXTRA = 8
# Preconditioned corrections of weak directions below the Gram matrix's resolution; when they have
# not settled after these, the float64 route is taken.
_CORRECTIONS = 2


def _cholesky_shifted(g: Tensor, shift: float) -> Optional[Tensor]:
    """Cholesky factor of ``g + shift * I`` (``g`` is restored), or ``None`` if not positive definite."""
    diag = g.diagonal()
    diag.add_(shift)
    factor, info = torch.linalg.cholesky_ex(g)
    diag.sub_(shift)
    return factor if int(info) == 0 else None


def _factor_gram(g: Tensor, scale: float) -> Optional[Tuple[Tensor, float]]:
    """Cholesky factor of ``g + shift I`` with the smallest shift (from ``eps * scale``) that works."""
    shift = torch.finfo(torch.float32).eps * scale  # a singular G (a zero row) needs a small one
    for _ in range(6):
        factor = _cholesky_shifted(g, shift)
        if factor is not None:
            return factor, shift
        shift *= 10
    return None


def _bottom_subspace_iterative(g: Tensor, factored: Tuple[Tensor, float], count: int, width: int,
                               scale: float) -> Optional[Tensor]:
    """Orthonormal ``n x width`` basis whose Ritz pairs include the ``count`` smallest of ``g``, or ``None``.

    Inverse subspace iteration (``factored`` from :func:`_factor_gram`) from a fixed random start
    (every rank computes the same basis), shifted once towards the bottom of the spectrum when the
    block separates the wanted values poorly. Products with ``g`` go through its factor,
    :math:`G x = L (L^T x) - s x`, so only the lower triangle of ``g`` is read. ``None`` when it does
    not converge within the iteration budget or converges too slowly.
    """
    factor, shift = factored
    n = g.shape[0]
    floor = _gram_floor(scale)
    generator = torch.Generator(device=g.device).manual_seed(0)
    x = torch.randn(n, width, generator=generator, dtype=g.dtype, device=g.device)
    previous: Optional[Tensor] = None
    change: Optional[float] = None
    shifted = False
    budget = max(4, int(n * _ITER_PER_NEURON))
    for step in range(1, budget + 1):
        x = torch.linalg.qr(torch.cholesky_solve(x, factor)).Q
        gx = factor @ (factor.T @ x) - shift * x
        theta, vecs = torch.linalg.eigh((x.T @ gx).double())
        bottom = theta[:count]
        tol = _ITER_TOL * float(bottom[-1]) + floor
        # Converged when every wanted Ritz value is within `tol` of an eigenvalue (its residual
        # bounds that distance), or when the geometric tail of its decrease is below `tol`: Ritz
        # values fall monotonically to their limits, by a ratio estimated from the last two steps.
        wanted = vecs[:, :count]
        residual = float((gx.double() @ wanted - (x.double() @ wanted) * bottom).norm(dim=0).max())
        if residual <= tol:
            return x.double() @ vecs
        last = None if previous is None else float((previous - bottom).abs().max())
        if last is not None and change is not None and change > 0:
            ratio = last / change
            if last <= tol and last * ratio / max(1.0 - ratio, 1e-3) <= tol:
                return x.double() @ vecs
            # Steps still needed at this ratio for the change to fall below `tol`: hand over to the
            # dense decomposition at once when they would exceed the budget (or the ratio is slow).
            needed = math.log(tol / last) / math.log(ratio) if 0 < ratio < 1 and last > tol else 0.0
            if step > 2 and (ratio > _ITER_SLOW or step + needed > budget):
                return None
        previous, change = bottom, last
        if step == 2 and not shifted and float(theta[0]) > floor and float(theta[count - 1]) > 0.5 * float(theta[-1]):
            # The block barely separates the wanted values from the rest (rate ~ theta_k / theta_p
            # > 1/2): shift towards the bottom of the spectrum, to theta_0 minus its residual (a
            # factorisation that succeeds proves the shift lies below the spectrum), or hand over to
            # the dense decomposition when even that is not below it.
            target = float(theta[0]) - residual
            candidate = _cholesky_shifted(g, -target) if target > floor else None
            if candidate is None:
                return None
            factor, shift, shifted = candidate, -target, True
    return None


def _weakest_float32(a: Tensor, count: int, space: NeuronSpace) -> Optional[Tuple[Tensor, Tensor, float]]:
    r"""The ``count`` smallest singular values and left vectors of ``a`` from its float32 Gram matrix.

    A basis of ``count + max(8, count)`` directions holding the weakest ones comes from an inverse
    subspace iteration on :math:`\hat G = \mathrm{fl}_{32}(A A^T)` (or, when that converges slowly,
    as on tightly clustered spectra, from a dense decomposition of the same matrix). A final
    Rayleigh-Ritz step in the metric of ``a`` itself (the basis images :math:`x^T A`, computed from
    the weights) then resolves near-null directions to about :math:`10\,\epsilon\,\sigma_{max}`,
    where :math:`\hat G` alone resolves only :math:`\sqrt{\epsilon}\,\sigma_{max}`; weak directions
    the Gram matrix cannot resolve get up to two preconditioned corrections. ``None`` when those
    have not settled (more weak directions below the Gram matrix's resolution than the basis holds):
    the caller then takes the float64 route. The third value is :math:`\lVert A \rVert_F^2`.
    """
    n = a.shape[0]
    g = _gram(a, torch.float32)
    diagonal = g.diagonal()
    # |G_ij| <= sqrt(G_ii G_jj): a finite diagonal (of finite weights) means a finite matrix.
    scale, frobenius = float(diagonal.max()), float(diagonal.sum())
    if not (math.isfinite(scale) and math.isfinite(frobenius)):
        raise NonFiniteError(f"Space `{space.name}`: its Gram matrix overflows; refusing to shrink it.")
    if scale == 0.0:  # every row is zero: every direction is a null direction
        return (torch.zeros(count, dtype=torch.float64), torch.eye(n, count, dtype=torch.float64, device=a.device),
                0.0)
    width = min(n, count + max(_ITER_EXTRA, count))
    factored = _factor_gram(g, scale)
    basis = None if factored is None else _bottom_subspace_iterative(g, factored, count, width, scale)
    if basis is None:
        basis = _bottom_eigenpairs(g, width)[1]
    weights = a if a.dtype == torch.float32 else a.to(torch.float32)  # one float32 copy for lower precisions
    x, images, values, inner = _ritz_with_weights(weights, basis.to(device=a.device))
    null_level = (10 * torch.finfo(torch.float32).eps) ** 2 * scale  # the float32 floor, in eigenvalue units
    settled = True
    for _ in range(_CORRECTIONS):
        weakest = float(values[count - 1])
        if factored is None or not null_level < weakest <= 1e3 * _gram_floor(scale):
            settled = True  # at the float32 floor, or resolved by the Gram matrix
            break
        # Weak directions the Gram matrix does not resolve, above the float32 floor: a
        # preconditioned correction, its residual computed from the weights (G q = A (A^T q)).
        wanted = inner[:, :count]
        q = x @ wanted
        previous = values[:count]
        residual = (weights @ (wanted.T @ images).T.to(torch.float32)).double() - q * previous
        correction = torch.cholesky_solve(residual.to(torch.float32), factored[0]).double()
        x, images, values, inner = _ritz_with_weights(weights, torch.cat([x, correction], dim=1))
        moved = float((previous - values[:count]).abs().max())
        settled = moved <= 1e-2 * float(values[count - 1]) + null_level
        if settled:
            break
    if not settled:
        return None
    return values[:count].clamp_min(0).sqrt(), (x @ inner)[:, :count], frobenius


def _gram_floor(scale: float) -> float:
    """Rounding of a float32 Gram matrix whose largest diagonal entry is ``scale``, in eigenvalue units."""
    return 10 * torch.finfo(torch.float32).eps * scale


def _ritz_with_weights(a: Tensor, basis: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz of ``A A^T`` on ``span(basis)`` from the images ``x^T A`` (one pass over ``a``, float32).

    Returns the orthonormal basis ``x`` (float64), the images, and the Ritz values (ascending) with
    their coefficients in ``x``.
    """
    x = torch.linalg.qr(basis.double()).Q
    # x^T A in the weights' layout (rows of A are contiguous).
    images = (x.T.to(a.dtype) @ a).double()
    values, inner = torch.linalg.eigh(images @ images.T)
    return x, images, values, inner


def _weakest_directions(a: Tensor, count: int, space: NeuronSpace) -> Tuple[Tensor, Tensor, float]:
    """The ``count`` smallest singular values of ``a`` (ascending), their left vectors (float64), and
    :math:`\\lVert a \\rVert_F^2` (a by-product of every route)."""
    n, d = a.shape
    svd_width = _SVD_WIDTH if a.dtype == torch.float64 else _SVD_WIDTH_FLOAT32
    found: Optional[Tuple[Tensor, Tensor, float]] = None
    if n <= svd_width and n * d <= _SVD_ELEMENTS:
        u, s, _ = torch.linalg.svd(a.to(torch.float64), full_matrices=d < n)
        sigma = torch.zeros(n, dtype=torch.float64)
        sigma[: s.numel()] = s
        found = (sigma.flip(0)[:count], u.flip(1)[:, :count], float((s * s).sum()))
    else:
        found = _weakest_float32(a, count, space) if a.dtype != torch.float64 and count > 0 else None
    if found is None:
        g = _gram(a)
        if not bool(torch.isfinite(g.diagonal()).all()):  # |G_ij| <= sqrt(G_ii G_jj)
            raise NonFiniteError(f"Space `{space.name}`: its Gram matrix overflows; refusing to shrink it.")
        vals, vecs = _bottom_eigenpairs(g, count) if count > 0 else (g.new_zeros(0), g.new_zeros(n, 0))
        found = (vals.clamp_min(0).sqrt(), vecs, float(g.diagonal().sum()))
    if not (bool(torch.isfinite(found[0]).all()) and bool(torch.isfinite(found[1]).all())):
        raise NonFiniteError(f"Space `{space.name}`: its singular basis is not finite (degenerate spectrum).")
    return found


@_full_precision
def left_basis(a: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Left singular basis of ``a`` (``n x d``) and its singular values, both float64, descending.

    Returns ``U`` (``n x n``, orthogonal, columns are the basis) and ``sigma`` (``n``, zero-padded).
    For ``d > 4 n`` the basis comes from the eigenvectors of the float64 Gram matrix :math:`A A^T`
    (never a ``d x d`` or ``n x d`` factor), and the singular values are recomputed as the row norms
    of :math:`U^T A`, which stays accurate for small values where the eigenvalues are not.
    """
    n, d = a.shape
    if d <= _GRAM_RATIO * n:
        u, s, _ = torch.linalg.svd(a.to(torch.float64), full_matrices=d < n)
        sigma = torch.zeros(n, dtype=torch.float64, device=a.device)
        sigma[: s.numel()] = s
        return u, sigma
    _, vecs = torch.linalg.eigh(_gram(a))
    u = vecs.flip(1)
    sigma = _row_norms(u, a)
    order = torch.argsort(sigma, descending=True, stable=True)
    return u[:, order], sigma[order]


def _row_norms(u: Tensor, a: Tensor) -> Tensor:
    # || u_k^T A || for every column k of u, slab by slab in float64.
    out = torch.zeros(u.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], _GRAM_SLAB):
        block = a[:, start : start + _GRAM_SLAB].to(torch.float64)
        out += (u.T @ block).pow(2).sum(dim=1)
    return out.sqrt()


def _group_rows(space: NeuronSpace) -> List[Tensor]:
    index = space.group_index()
    return [torch.nonzero(index == g).flatten() for g in range(space.groups())]


@_full_precision
def singular_values(space: NeuronSpace) -> Tensor:
    """Singular values of the space's incoming matrix, per group, concatenated and sorted descending."""
    _check_finite(space)
    a = space.incoming_matrix()
    values = []
    for rows in _group_rows(space):
        sub = a[rows]
        if sub.shape[1] <= _GRAM_RATIO * sub.shape[0]:
            s = torch.linalg.svdvals(sub.to(torch.float64))
            values.append(torch.cat([s, s.new_zeros(sub.shape[0] - s.numel())]))
        else:
            values.append(left_basis(sub)[1])
    return torch.sort(torch.cat(values), descending=True).values


def _check_basis(u: Tensor, space: NeuronSpace) -> None:
    if not bool(torch.isfinite(u).all()):
        raise NonFiniteError(f"Space `{space.name}`: the singular basis is not finite (degenerate spectrum).")


def _block_rotation(space: NeuronSpace) -> Tuple[Tensor, Tensor]:
    """Per-group left bases embedded in one ``n x n`` matrix, and every neuron's singular value."""
    a = space.incoming_matrix()
    n = a.shape[0]
    m = torch.zeros(n, n, dtype=torch.float64, device=a.device)
    sigma = torch.zeros(n, dtype=torch.float64, device=a.device)
    for rows in _group_rows(space):
        u, s = left_basis(a[rows])
        m[rows.unsqueeze(1), rows.unsqueeze(0)] = u
        sigma[rows] = s
    _check_basis(m, space)
    return m, sigma


# ---------------------------------------------------------------------------- operations
@_full_precision
def diagonalise(network: Any, layer: int, mode: str = "left", *, optimizer: Any = None,
                on_unknown: str = "raise") -> SurgeryReport:
    """Rewrite a hidden space in its singular basis; the function is unchanged.

    ``mode="left"`` rotates space ``layer`` so that row ``k`` of ``W_l`` carries the ``k``-th singular
    value (within each group). ``mode="full"`` also rotates the previous hidden space so that ``W_l``
    itself becomes diagonal (off-diagonal entries are set to exact zeros); it exists only for a
    hidden-to-hidden layer whose weight is a matrix (dense, or a 1x1 convolution) between two
    single-group spaces.
    """
    if mode not in ("left", "full"):
        raise ValueError(f"Expected argument `mode` to be 'left' or 'full', but got {mode!r}.")
    space = network.space(layer)
    if mode == "left":
        _check_finite(space)
        remapper = _remapper(optimizer, on_unknown, space)
        m, sigma = _block_rotation(space)
        _transform_space(space, DenseRotation(m), remapper)
        return SurgeryReport("diagonalise", space.name, space.width, space.width, sigma)
    return _diagonalise_full(network, layer, optimizer, on_unknown)


def _full_weight(network: Any, layer: int) -> Tensor:
    w = network.layers[layer].weight
    if layer == 0:
        raise ValueError(
            "Expected argument `layer` >= 1 for mode='full': layer 0 reads the network input, which has no "
            "rotational freedom."
        )
    if w.dim() == 4 and w.shape[2:] != (1, 1):
        raise ValueError(
            f"Full diagonalisation of layer {layer} needs a 1x1 kernel, but its kernel is "
            f"{tuple(w.shape[2:])}; use mode='left'."
        )
    if w.shape[1] != network.layers[layer - 1].weight.shape[0]:
        raise ValueError(f"Full diagonalisation of layer {layer} needs a square channel map (no flatten before it).")
    for sp in (network.space(layer - 1), network.space(layer)):
        if sp.groups() != 1:
            raise ValueError(f"Full diagonalisation needs single-group spaces; `{sp.name}` has {sp.groups()} groups.")
    return w.detach().reshape(w.shape[0], w.shape[1])


def _diagonalise_full(network: Any, layer: int, optimizer: Any, on_unknown: str) -> SurgeryReport:
    w = _full_weight(network, layer)
    this, previous = network.space(layer), network.space(layer - 1)
    _check_finite(this)
    _check_finite(previous)
    remapper = _remapper(optimizer, on_unknown, this, previous)
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=True)
    _check_basis(u, this)
    _check_basis(vh, previous)
    _transform_space(previous, DenseRotation(vh.T), remapper)
    _transform_space(this, DenseRotation(u), remapper)
    weight = network.layers[layer].weight
    with torch.no_grad():
        flat = weight.view(weight.shape[0], weight.shape[1])
        diag = torch.diagonal(flat).clone()
        flat.zero_()
        torch.diagonal(flat).copy_(diag)
    sigma = torch.zeros(this.width, dtype=torch.float64)
    sigma[: s.numel()] = s
    return SurgeryReport("diagonalise", this.name, this.width, this.width, sigma, details={"mode": "full"})


@_full_precision
def grow(space: NeuronSpace, n: int = 1, *, optimizer: Any = None, scale: float = 0.01,
         group: Union[None, int, str] = None, generator: Optional[torch.Generator] = None,
         on_unknown: str = "raise") -> SurgeryReport:
    """Append ``n`` neurons: zero incoming rows, bias and correction, outgoing columns ``scale * N(0, 1)``.

    The new pre-activations are exactly zero for every input, so norms and outputs are unchanged.
    The outgoing columns must not be zero: a neuron with a zero column receives no gradient.
    ``group`` picks the group of a grouped space (default: each new neuron joins the group that is
    smallest at that moment, so groups stay balanced); ``"new"`` makes the
    new neurons a group of their own, with the initial intrinsic length and a zero correction
    column (its scale is multiplied by exact zeros, so that is exact too).
    """
    n = _check_count("n", n)
    if not (isinstance(scale, (int, float)) and scale >= 0):
        raise ValueError(f"Expected argument `scale` to be a number >= 0, but got {scale!r}.")
    groups = space.groups()
    index = space.group_index()
    assignment: Optional[List[int]] = None
    if group is None and groups > 1:
        sizes = torch.bincount(index, minlength=groups).tolist()
        assignment = []
        for _ in range(n):
            smallest = min(range(groups), key=lambda g: (sizes[g], g))
            assignment.append(smallest)
            sizes[smallest] += 1
        group = assignment[0]
    elif group is None:
        group = 0
    new_group = group == "new"
    if new_group:
        group = groups
    elif isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < groups:
        raise ValueError(
            f"Expected argument `group` to be None, 'new' or an int in [0, {groups - 1}], but got {group!r}."
        )
    if new_group and space.activation is None:
        raise ValueError(f"Space `{space.name}` has no activation, so it has no groups.")
    _check_finite(space)
    remapper = _remapper(optimizer, on_unknown, space)
    old = space.width

    def fill(binding: Binding) -> Tensor:
        view = binding.view(binding.tensor)
        return _random((view.shape[0], n, view.shape[2]), scale, view, generator)

    _transform_space(space, Extension(n), remapper, consumer_fill=fill)
    if new_group:
        act = space.activation
        assert act is not None
        for binding in space.group_bindings():
            view = binding.view(binding.tensor)
            value = act.length_init if binding.name == "length" else 0.0
            _apply(binding, Extension(1), remapper, view.new_full((view.shape[0], 1, view.shape[2]), value))
        act.group_index = torch.cat([index, index.new_full((n,), group)]).to(index.device)
    else:
        added = index.new_tensor(assignment) if assignment is not None else index.new_full((n,), group)
        _set_group_index(space, torch.cat([index, added]))
    groups_of_new = assignment if assignment is not None else [int(group)] * n
    details = {"groups": groups_of_new, "scale": scale, "new_group": new_group}
    return SurgeryReport("grow", space.name, old, old + n, details=details)


@_full_precision
def remove_group(network: Any, layer: int, group: Optional[int] = None, *, optimizer: Any = None,
                 probe: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
    r"""Remove a whole group of hidden space ``layer`` (default: the weakest, smallest :math:`\lVert A_G \rVert_F`).

    When the group's rows of :math:`A = [W_l \mid \psi_{l-1}]` are zero its output is the constant
    :math:`c = s_G(\lVert b_G \rVert^2 + o_G)\, b_G`, and its whole contribution to the next layer,
    :math:`s_G (W_{l+1}[:, G]\, b_G + \psi_l[:, g])`, is folded into the next bias. That is exact when the
    next layer is dense; a padded convolution sees the constant map cut at the border, so there the
    report carries the error.
    """
    space = network.space(layer)
    groups = space.groups()
    if groups < 2:
        raise ValueError(
            f"Expected argument `layer` to name a space with at least two groups (a space keeps one), but "
            f"`{space.name}` (layer {layer}) has {groups}."
        )
    _check_finite(space)
    a = space.incoming_matrix().to(torch.float64)
    rows_by_group = _group_rows(space)
    norms = torch.stack([a[rows].norm() for rows in rows_by_group])
    if group is None:
        group = int(torch.argmin(norms))
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < groups:
        raise ValueError(f"Expected argument `group` to be None or an int in [0, {groups - 1}], but got {group!r}.")
    remapper = _remapper(optimizer, on_unknown, space)
    before = _probe(network, probe)
    rows = rows_by_group[group]
    act = space.activation
    assert act is not None
    nxt = network.affine(layer + 1)
    with torch.no_grad():
        b = space.bias.tensor.detach()[rows].to(torch.float64)  # type: ignore[union-attr]
        length = act.effective_length()
        q = (b * b).sum() + (0.0 if length is None else float(length[group]))
        s = float(act_scale(q, act.profile))
        w_out = space.weight_out
        assert w_out is not None
        view = w_out.view(w_out.tensor.detach())[:, rows].to(torch.float64)  # (out, |G|, rest)
        constant = (view * b[None, :, None]).sum(dim=1)  # (out, rest)
        if space.correction_out is not None:
            psi = space.correction_out
            constant = constant + psi.view(psi.tensor.detach())[:, group].to(torch.float64)
        # The next layer's response to a constant input map, read at one output position: exact for
        # a dense layer; for a convolution the interior value (taps summed).
        contribution = s * constant.sum(dim=1)
        nxt.bias.add_(contribution.to(nxt.bias.dtype))
    residual = float(a[rows].norm())
    old_index = space.group_index()
    keep = torch.nonzero(old_index != group).flatten()
    old = space.width
    _transform_space(space, Selection(keep), remapper)
    group_keep = torch.tensor([g for g in range(groups) if g != group], dtype=torch.long)
    for binding in space.group_bindings():
        _apply(binding, Selection(group_keep), remapper)
    index = old_index[keep]
    act.group_index = index - (index > group).to(index.dtype)
    tol = 10 * old * torch.finfo(space.bias.tensor.dtype).eps * max(1.0, float(a.norm()))  # type: ignore[union-attr]
    padded_conv = nxt.weight.dim() == 4 and getattr(nxt, "padding", 0) > 0
    exact = residual <= tol and not padded_conv
    report = SurgeryReport("remove_group", space.name, old, space.width, norms[group:group + 1], residual,
                           exact=exact, details={"group": group, "bias_fold": contribution.tolist()})
    report.measured_error = _probe_error(network, probe, before)
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


@_full_precision
def shrink(network: Any, layer: int, n: int = 1, *, optimizer: Any = None, probe: Optional[Tensor] = None,
           expectation: Optional[Tensor] = None, on_unknown: str = "raise") -> SurgeryReport:
    r"""Remove the ``n`` weakest directions of hidden space ``layer`` (see the module docstring).

    Refuses to leave a space (or a group) without neurons. The report lists the removed singular
    values and biases, the folds applied and an error estimate; with ``probe`` inputs it also
    measures the largest change of the network output.

    ``expectation`` (inputs, e.g. a training batch) selects the *expectation fold* instead of the
    psi fold: the removed neurons' mean output over those inputs, :math:`W_{l+1}[:, k]\,
    \mathbb{E}[h_k]`, is added to the next layer's bias. It needs no psi, is exact only for outputs
    that do not vary, and its error estimate is :math:`\lVert W_{l+1}[:, removed] \rVert` times the
    removed outputs' standard deviation. Only for a dense next layer.
    """
    space = network.space(layer)
    n = _check_count("n", n)
    if expectation is not None:
        if not isinstance(expectation, Tensor) or expectation.dim() < 2 or expectation.shape[0] < 1:
            raise ValueError(
                f"Expected argument `expectation` to be a batch of inputs (a tensor of shape (N, ...)), but got "
                f"{type(expectation).__name__}."
            )
        nxt = network.affine(layer + 1)
        if nxt.weight.dim() != 2 or space.weight_out.inner != 1:  # type: ignore[union-attr]
            raise ValueError("Expected a dense layer after the space for `expectation`; the next layer is not one.")
    if n >= space.width:
        raise ValueError(
            f"Expected argument `n` to be smaller than the width of `{space.name}` ({space.width}): a space keeps "
            f"at least one neuron, but got n={n}."
        )
    _check_finite(space)
    remapper = _remapper(optimizer, on_unknown, space)
    before = _probe(network, probe)
    a = space.incoming_matrix()
    rows_by_group = _group_rows(space)
    # Each group can give at most n candidates and must keep one neuron.
    eig = [_weakest_directions(a if len(rows_by_group) == 1 else a[rows], min(n, rows.numel() - 1), space)
           for rows in rows_by_group]
    counts = _pick_removals([sigma for sigma, _, _ in eig], n, space)

    # Householder reflectors that bring each group's weakest directions to its first positions.
    width = space.width
    reflectors, taus, removed = [], [], []
    for rows, (_, vecs, _), k in zip(rows_by_group, eig, counts):
        if k == 0:
            continue
        bottom = vecs[:, :k]  # weakest first
        qr, tau = torch.geqrf(bottom)
        v = torch.zeros(width, k, dtype=torch.float64)
        v[rows] = torch.tril(qr, -1) + torch.eye(rows.numel(), k, dtype=torch.float64)
        reflectors.append(v)
        taus.append(tau)
        removed.append(rows[:k])
    v_all, tau_all = torch.cat(reflectors, 1), torch.cat(taus)
    rotation: AxisTransform = HouseholderRotation.from_vectors(v_all, tau_all)
    if v_all.shape[1] ** 2 > width:
        rotation = DenseRotation(rotation.dense())  # type: ignore[attr-defined]
    removed_idx = torch.sort(torch.cat(removed)).values

    index_before = space.group_index()
    _transform_space(space, rotation, remapper)
    if expectation is None:
        details = _fold(space, removed_idx)
    else:
        details = _expectation_fold(network, layer, space, removed_idx, expectation)
    a_removed = space.incoming_matrix()[removed_idx].to(torch.float64)
    residual = float(a_removed.norm())
    # Per group: rows removed from different groups are not orthogonal to each other.
    removed_groups = index_before[removed_idx]
    parts = []
    for g in torch.unique(removed_groups):
        block = a_removed[removed_groups == g]
        values = torch.zeros(block.shape[0], dtype=torch.float64)
        found = torch.linalg.svdvals(block)  # min(k, d) values; the rest are zero
        values[: found.numel()] = found
        parts.append(values)
    sigma_removed = torch.sort(torch.cat(parts)).values
    out_view = space.weight_out.view(space.weight_out.tensor.detach())  # type: ignore[union-attr]
    out_norm = float(out_view[:, removed_idx].norm())

    keep = torch.ones(width, dtype=torch.bool)
    keep[removed_idx] = False
    keep_idx = torch.nonzero(keep).flatten()
    index = space.group_index()
    _transform_space(space, Selection(keep_idx), remapper)
    _set_group_index(space, index[keep_idx])  # every group keeps a neuron: numbering unchanged

    # Round-off of the rotation itself: a few ulps of |A| per neuron.
    norm = math.sqrt(sum(frobenius for _, _, frobenius in eig))  # ||A||_F, from the decompositions
    tol = 10 * width * torch.finfo(a.dtype).eps * max(1.0, norm)
    estimate = residual * out_norm + details["unabsorbed"] if expectation is None else details["spread"]
    report = SurgeryReport("shrink", space.name, width, width - n, sigma_removed, estimate,
                           exact=(residual <= tol and details["unabsorbed"] == 0.0 and not details["clamped"]
                                  and details.get("spread", 0.0) == 0.0),
                           details=details)
    report.details["residual"] = residual
    report.measured_error = _probe_error(network, probe, before)
    return report


def _expectation_fold(network: Any, layer: int, space: NeuronSpace, removed: Tensor, inputs: Tensor) -> Dict[str, Any]:
    """Add the removed neurons' mean contribution over ``inputs`` to the next layer's bias."""
    with torch.no_grad():
        first = network.affine(0).weight
        h = network.hidden_output(inputs.to(device=first.device, dtype=first.dtype), layer)[:, removed]
        h = h.to(torch.float64)
        mean, spread = h.mean(dim=0), h.std(dim=0, unbiased=False)
        w_out = network.affine(layer + 1).weight.detach()[:, removed].to(torch.float64)
        bias = network.affine(layer + 1).bias
        bias.add_((w_out @ mean).to(bias.dtype))
    return {"removed_mean": mean.tolist(), "spread": float(torch.linalg.matrix_norm(w_out, 2) * spread.norm()),
            "unabsorbed": 0.0, "clamped": False, "folded_length": False, "folded_psi": False,
            "expectation_fold": True}


def _fold(space: NeuronSpace, removed: Tensor) -> Dict[str, Any]:
    """Absorb the constant part of the removed neurons into ``o`` and the next correction."""
    bias = space.bias.tensor.detach()  # type: ignore[union-attr]
    b = bias[removed].to(torch.float64)
    groups = space.group_index()[removed]
    act = space.activation
    clamped = False
    unabsorbed = 0.0
    w_out = space.weight_out
    assert w_out is not None, "a hidden space always has a consumer"
    out_view = w_out.view(w_out.tensor.detach())[:, removed].to(torch.float64)  # (pre, k, rest)
    contribution = out_view * b[None, :, None]
    with torch.no_grad():
        length = None if act is None else act.length
        if act is not None and length is not None:
            add = torch.zeros(length.shape[0], dtype=torch.float64).index_add(0, groups, b * b)
            new = length.detach().to(torch.float64).abs() + add
            if act.length_mode == "trainable" and bool((new > act.max_length).any()):
                # The forward pass caps o at max_length: the excess is not absorbed.
                clamped = True
                unabsorbed += float((new - act.max_length).clamp_min(0).sum())
            length.copy_(new.to(length.dtype))
        else:
            unabsorbed += float((b * b).sum())
        if space.correction_out is not None:
            psi = space.correction_out
            view = psi.view(psi.tensor.detach())
            delta = torch.zeros(view.shape, dtype=torch.float64).index_add(1, groups, contribution)
            psi.tensor.copy_(psi.shape_back(view.to(torch.float64) + delta, psi.tensor.shape).to(psi.tensor.dtype))
        else:
            unabsorbed += float(contribution.norm())
    return {"removed_bias": b.tolist(), "unabsorbed": unabsorbed, "clamped": clamped,
            "folded_length": length is not None, "folded_psi": space.correction_out is not None}


def _probe(network: Any, probe: Optional[Tensor]) -> Optional[Tensor]:
    if probe is None:
        return None
    with torch.no_grad():
        return network(probe).detach().clone()


def _probe_error(network: Any, probe: Optional[Tensor], before: Optional[Tensor]) -> Optional[float]:
    if probe is None or before is None:
        return None
    after = _probe(network, probe)
    return float((after - before).abs().max())  # type: ignore[operator]


@_full_precision
def resize(network: Any, layer: int, width: int, *, optimizer: Any = None, generator: Optional[torch.Generator] = None,
           on_unknown: str = "raise") -> Optional[SurgeryReport]:
    """Grow or shrink hidden space ``layer`` to ``width`` neurons (``None`` when it already has that width)."""
    width = _check_count("width", width)
    current = network.space(layer).width
    if width > current:
        return network.grow(layer, width - current, optimizer=optimizer, generator=generator, on_unknown=on_unknown)
    if width < current:
        return network.shrink(layer, current - width, optimizer=optimizer, on_unknown=on_unknown)
    return None


@_full_precision
def set_widths(network: Any, widths: Union[Mapping[int, int], Sequence[int]], *, optimizer: Any = None,
               generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> List[SurgeryReport]:
    """Resize several hidden spaces, **last hidden layer first** (the order rule of this module).

    ``widths`` is a list with one width per hidden space, or a mapping ``{layer: width}``. All entries
    are validated before any space changes.
    """
    if isinstance(widths, Mapping):
        plan = dict(widths)
    elif isinstance(widths, (list, tuple)):
        if len(widths) != network.num_hidden:
            raise ValueError(
                f"Expected argument `widths` to have {network.num_hidden} entries (one per hidden layer), "
                f"but got {len(widths)}."
            )
        plan = dict(enumerate(widths))
    else:
        raise ValueError(f"Expected argument `widths` to be a list or a mapping, but got {type(widths).__name__}.")
    for layer, width in plan.items():
        network._check_layer(layer)
        _check_count("widths", width)
    # Everything that could refuse a change is checked for every space before the first one changes.
    touched = [network.space(layer) for layer in plan if plan[layer] != network.space(layer).width]
    for space in touched:
        _check_finite(space)
    if touched:
        _remapper(optimizer, on_unknown, *touched)
    reports = []
    for layer in sorted(plan, reverse=True):
        report = resize(network, layer, plan[layer], optimizer=optimizer, generator=generator, on_unknown=on_unknown)
        if report is not None:
            reports.append(report)
    return reports


def _boundary(network: Any, which: str) -> NeuronSpace:
    return network.input_space() if which == "input" else network.output_space()


@_full_precision
def add_boundary(network: Any, which: str, n: int, *, optimizer: Any = None, scale: float = 0.0,
                 generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> SurgeryReport:
    """Append ``n`` input features (new columns of ``W_1``) or outputs (new rows of ``W_L``)."""
    n = _check_count("n", n)
    if not (isinstance(scale, (int, float)) and scale >= 0):
        raise ValueError(f"Expected argument `scale` to be a number >= 0, but got {scale!r}.")
    space = _boundary(network, which)
    _check_finite(space)
    remapper = _remapper(optimizer, on_unknown, space)
    old = space.width
    for binding, _ in space.neuron_bindings():
        view = binding.view(binding.tensor)
        is_weight = binding.name == "weight"
        fill = _random((view.shape[0], n, view.shape[2]), scale if is_weight else 0.0, view, generator)
        _apply(binding, Extension(n), remapper, fill)
    exact = which == "output" or scale == 0
    return SurgeryReport(f"add_{which}s", space.name, old, old + n, exact=exact, details={"scale": scale})


@_full_precision
def remove_boundary(network: Any, which: str, indices: Sequence[int], *, optimizer: Any = None,
                    on_unknown: str = "raise") -> SurgeryReport:
    """Delete input features or outputs by index."""
    space = _boundary(network, which)
    width = space.width
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
    _check_finite(space)
    remapper = _remapper(optimizer, on_unknown, space)
    keep = torch.tensor([i for i in range(width) if i not in set(chosen)], dtype=torch.long)
    removed_norm = 0.0
    if which == "input":
        b = space.consumers[0]
        removed_norm = float(b.view(b.tensor.detach())[:, chosen].to(torch.float64).norm())
    for binding, _ in space.neuron_bindings():
        _apply(binding, Selection(keep), remapper)
    return SurgeryReport(f"remove_{which}s", space.name, width, width - len(chosen), error_estimate=removed_norm,
                         exact=removed_norm == 0.0, details={"indices": chosen})


@_full_precision
def sparsify(network: Any, *, optimizer: Any = None, probe: Optional[Tensor] = None,
             on_unknown: str = "raise") -> SparsifyReport:
    r"""Alternating full diagonalisation: make hidden-to-hidden weights ``W_1, W_3, ...`` diagonal.

    Diagonalising ``W_l`` rotates spaces ``l - 1`` and ``l``, which undoes any diagonal form of
    ``W_{l-1}`` and ``W_{l+1}``, so every other layer is diagonalised; in a deep dense network about
    half of the weights become structurally zero. ``probe`` inputs (default: 256 standard normal
    samples) measure the function error.
    """
    import time

    layers = list(range(1, network.num_hidden, 2))
    spaces = []
    for layer in layers:
        _full_weight(network, layer)
        spaces += [network.space(layer - 1), network.space(layer)]
    for space in spaces:
        _check_finite(space)
    if spaces:
        _remapper(optimizer, on_unknown, *spaces)
    if probe is None:
        g = torch.Generator().manual_seed(0)
        first = network.layers[0].weight
        shape = (256, network.in_features) if first.dim() == 2 else None
        if shape is None:
            raise ValueError("Expected argument `probe` for a convolutional network (its input shape is not known).")
        probe = torch.randn(*shape, generator=g).to(first.dtype)
    before = _probe(network, probe)
    start = time.perf_counter()
    for layer in layers:
        _diagonalise_full(network, layer, optimizer, on_unknown)
    seconds = time.perf_counter() - start
    after = _probe(network, probe)
    zero = sum(int((network.layers[layer].weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in network.layers)
    err = float((after - before).abs().max())  # type: ignore[operator]
    rel = err / max(float(before.abs().max()), 1e-30)  # type: ignore[union-attr]
    return SparsifyReport(layers, zero, total, err, rel, seconds)


def _check_topology(network: Any, topology: Any) -> Tuple[int, int, List[int], List[Optional[List[int]]]]:
    def bad(why: str) -> ValueError:
        return ValueError(f"Expected a topology record of this network ({why}), but got {topology!r}.")

    if not isinstance(topology, Mapping):
        raise bad("a mapping")
    widths, groups = topology.get("hidden_widths"), topology.get("groups")
    fan_in, fan_out = topology.get("in_features"), topology.get("out_features")
    if not isinstance(widths, list) or len(widths) != network.num_hidden:
        raise bad(f"{network.num_hidden} hidden widths")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths + [fan_in, fan_out]):
        raise bad("positive int widths")
    if not isinstance(groups, list) or len(groups) != network.num_hidden:
        raise bad("one group list or None per hidden layer")
    for width, index in zip(widths, groups):
        if index is None:
            continue
        if not isinstance(index, list) or len(index) != width or not all(isinstance(g, int) for g in index):
            raise bad("a group number for every neuron")
        if set(index) != set(range(max(index) + 1)):
            raise bad("groups numbered 0..m-1, each used")
    return int(fan_in), int(fan_out), list(widths), list(groups)  # type: ignore[arg-type]


def reshape_to(network: Any, topology: Mapping[str, Any]) -> None:
    """Resize every tensor of ``network`` to a recorded topology (see ``IsotropicNetwork.reshape_to``)."""
    fan_in, fan_out, widths, groups = _check_topology(network, topology)
    targets: Dict[int, Tuple[Binding, List[int]]] = {}

    def want(binding: Binding, n: int) -> None:
        t = binding.tensor
        shape = list(targets[id(t)][1]) if id(t) in targets else list(t.shape)
        shape[binding.axis] = n * binding.inner
        targets[id(t)] = (binding, shape)

    for layer, (width, index) in enumerate(zip(widths, groups)):
        space = network.space(layer)
        m = 1 if index is None else max(index) + 1
        for binding, _ in space.neuron_bindings():
            want(binding, width)
        for binding in space.group_bindings():
            want(binding, m)
    for binding, _ in network.input_space().neuron_bindings():
        want(binding, fan_in)
    for binding, _ in network.output_space().neuron_bindings():
        want(binding, fan_out)
    with torch.no_grad():
        for binding, shape in targets.values():
            t = binding.tensor
            if list(t.shape) != shape:
                t.set_(t.new_zeros(shape))  # type: ignore[call-overload]
                t.grad = None
    for layer, index in enumerate(groups):
        act = network.activation(layer)
        act.group_index = None if index is None else torch.tensor(index, dtype=torch.long, device=act.length.device
                                                                   if act.length is not None else None)
