r"""Weakest directions and singular bases of a matrix: pure linear algebra, no neurons.

Every routine takes a matrix :math:`A` (``n x d``, one row per neuron of a space, ``d`` possibly much
larger than ``n``) and never forms a ``d x d`` matrix or a second ``n x d`` copy in float64:

- :func:`weakest_directions`: the ``k`` smallest singular values of ``A`` and their left vectors,
  from an SVD of ``A`` for narrow matrices, from the float32 Gram matrix :math:`A A^T` for wider
  float32 (or lower precision) matrices (inverse subspace iteration, then a Rayleigh-Ritz step
  with ``A`` itself), from the float64 Gram matrix for wider float64 ones;
- :func:`left_basis`: the whole left singular basis and the singular values;
- :func:`singular_values`: the singular values only (no basis), for monitoring and policies.

Routines raise :class:`~iso_lightning.errors.NonFiniteError` (naming ``label``) instead of
returning a basis computed from non-finite values.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple, TypeVar, cast

import numpy as np
import scipy.linalg as scipy_linalg
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from iso_lightning.errors import NonFiniteError

__all__ = ["full_precision", "gram", "left_basis", "row_norms", "singular_values", "weakest_directions"]

# Above this many columns per row the Gram matrix (n x n) is used instead of an SVD of A.
_GRAM_RATIO = 4
# Columns per slab when the Gram matrix of a wide A is accumulated in float64.
_GRAM_SLAB = 8192

_F = TypeVar("_F", bound=Callable[..., Any])


def full_precision(fn: _F) -> _F:
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


def gram(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
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


def _bottom_eigenpairs(g: Tensor, count: int, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """The ``count`` smallest eigenvalues (ascending) and eigenvectors of a symmetric matrix, as float64.

    Reads the lower triangle only, decomposed in ``dtype``: float64 where the vectors themselves are
    the answer (a float32 decomposition of a float32 Gram matrix loses digits its weakest directions
    need); float32 for a basis that a Rayleigh-Ritz step with the weights refines (its backward error
    is of the order of the float32 Gram matrix's own rounding, at 0.65 times the time). On the CPU
    only the wanted pairs are computed (LAPACK ``syevr`` with an index range), about three times
    faster than a full decomposition for a few pairs of a 500 x 500 matrix.
    """
    n = g.shape[0]
    count = min(count, n)
    work = g.to(dtype)
    if g.device.type == "cpu" and count < n:
        # One BLAS thread: SciPy's OpenBLAS threads would otherwise keep spinning after the call and
        # compete with PyTorch's own threads for the same cores.
        with _blas_controller().limit(limits=1, user_api="blas"):
            vals, vecs = scipy_linalg.eigh(work.numpy(), subset_by_index=[0, count - 1], driver="evr", lower=True,
                                           check_finite=False)
        return torch.from_numpy(vals).double(), torch.from_numpy(np.ascontiguousarray(vecs)).double()
    vals_t, vecs_t = torch.linalg.eigh(work)
    return vals_t[:count].double(), vecs_t[:, :count].double()


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


def _weakest_float32(a: Tensor, count: int, label: str) -> Optional[Tuple[Tensor, Tensor, float]]:
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
    g = gram(a, torch.float32)
    diagonal = g.diagonal()
    # |G_ij| <= sqrt(G_ii G_jj): a finite diagonal (of finite weights) means a finite matrix.
    scale, frobenius = float(diagonal.max()), float(diagonal.sum())
    if not (math.isfinite(scale) and math.isfinite(frobenius)):
        raise NonFiniteError(f"{label}: its Gram matrix overflows; refusing to operate on it.")
    if scale == 0.0:  # every row is zero: every direction is a null direction
        return (torch.zeros(count, dtype=torch.float64), torch.eye(n, count, dtype=torch.float64, device=a.device),
                0.0)
    width = min(n, count + max(_ITER_EXTRA, count))
    factored = _factor_gram(g, scale)
    basis = None if factored is None else _bottom_subspace_iterative(g, factored, count, width, scale)
    if basis is None:
        basis = _bottom_eigenpairs(g, width, torch.float32)[1]
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


def weakest_directions(a: Tensor, count: int, label: str = "matrix") -> Tuple[Tensor, Tensor, float]:
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
        found = _weakest_float32(a, count, label) if a.dtype != torch.float64 and count > 0 else None
    if found is None:
        g = gram(a)
        if not bool(torch.isfinite(g.diagonal()).all()):  # |G_ij| <= sqrt(G_ii G_jj)
            raise NonFiniteError(f"{label}: its Gram matrix overflows; refusing to operate on it.")
        vals, vecs = _bottom_eigenpairs(g, count) if count > 0 else (g.new_zeros(0), g.new_zeros(n, 0))
        found = (vals.clamp_min(0).sqrt(), vecs, float(g.diagonal().sum()))
    if not (bool(torch.isfinite(found[0]).all()) and bool(torch.isfinite(found[1]).all())):
        raise NonFiniteError(f"{label}: its singular basis is not finite (degenerate spectrum).")
    return found


@full_precision
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
    _, vecs = torch.linalg.eigh(gram(a))
    u = vecs.flip(1)
    sigma = row_norms(u, a)
    order = torch.argsort(sigma, descending=True, stable=True)
    return u[:, order], sigma[order]


def row_norms(u: Tensor, a: Tensor) -> Tensor:
    # || u_k^T A || for every column k of u, slab by slab in float64.
    out = torch.zeros(u.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], _GRAM_SLAB):
        block = a[:, start : start + _GRAM_SLAB].to(torch.float64)
        out += (u.T @ block).pow(2).sum(dim=1)
    return out.sqrt()



@full_precision
def singular_values(a: Tensor, label: str = "matrix") -> Tensor:
    r"""Singular values of ``a`` (``n x d``), descending, float64, zero-padded to ``n``; no basis.

    Narrow matrices take ``svdvals``; for ``d > 4 n`` they are the square roots of the eigenvalues
    of the float64 Gram matrix :math:`A A^T`, accurate to about :math:`\sqrt{n\,\epsilon}\,
    \sigma_{max}` for the smallest values (what a policy's threshold or a histogram needs; use
    :func:`left_basis` where small values must be exact).
    """
    n, d = a.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if d <= _GRAM_RATIO * n:
        s = torch.linalg.svdvals(a.to(torch.float64))
        values = torch.cat([s, s.new_zeros(n - s.numel())])
    else:
        g = gram(a)
        if not bool(torch.isfinite(g.diagonal()).all()):
            raise NonFiniteError(f"{label}: its Gram matrix overflows; refusing to operate on it.")
        values = torch.linalg.eigvalsh(g).clamp_min(0).sqrt().flip(0)
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{label}: its singular values are not finite.")
    return values
