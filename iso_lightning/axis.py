r"""Linear transformations of one tensor axis: the single mechanism behind every neuron operation.

A neuron space is an axis shared by several tensors (rows of one weight, columns of the next, a bias,
a correction). Rotating, extending or cutting the space is one :class:`AxisTransform` applied to each
of them and to the optimizer state that shadows them.

Tensors are handled through a three-axis view ``(pre, n, rest)`` where ``n`` indexes the space. A
transform with matrix :math:`M \in \mathbb{R}^{n \times n'}` maps

.. math::

    X'_{p j r} = \sum_i M_{ij} X_{p i r},

which is :math:`W \leftarrow U^T W` for the rows of a producer and :math:`W \leftarrow W U` for the
columns of a consumer: both roles transform the same way. First moments of an optimizer follow the
same map; second moments follow :math:`(M \circ M)` (the squared-entry rule), which is exact for
permutations, selections and extensions and a diagonal approximation for a general rotation.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["AxisTransform", "DenseRotation", "Extension", "HouseholderRotation", "Selection"]

# Rotations of large tensors are applied in place, a slab at a time, so that a shrink of a layer with
# 150,528 inputs never holds a second copy of its weight.
_SLAB_ELEMENTS = 1 << 22


class AxisTransform:
    """A linear map of a tensor axis; subclasses implement the two rules."""

    def new_size(self, n: int) -> int:
        raise NotImplementedError

    def linear(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        """First-moment rule. ``view`` is ``(pre, n, rest)``; ``fill`` shapes ``(pre, k, rest)``."""
        raise NotImplementedError

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        """Second-moment rule :math:`(M \\circ M)`: keeps non-negative values non-negative."""
        raise NotImplementedError

    @property
    def is_rotation(self) -> bool:
        return False


def _slabbed(view: Tensor, fn) -> Tensor:  # type: ignore[no-untyped-def]
    """Apply ``fn`` (maps an ``(n, m)`` slab to ``(n, m)``) over ``view`` in place, slab by slab."""
    pre, n, rest = view.shape
    if view.numel() <= _SLAB_ELEMENTS:
        mat = view.permute(1, 0, 2).reshape(n, pre * rest)
        out = fn(mat).reshape(n, pre, rest).permute(1, 0, 2)
        view.copy_(out)
        return view
    if rest >= pre:
        step = max(1, _SLAB_ELEMENTS // max(1, n * pre))
        for start in range(0, rest, step):
            block = view[:, :, start : start + step]
            mat = block.permute(1, 0, 2).reshape(n, -1)
            block.copy_(fn(mat).reshape(n, pre, -1).permute(1, 0, 2))
    else:
        step = max(1, _SLAB_ELEMENTS // max(1, n * rest))
        for start in range(0, pre, step):
            block = view[start : start + step]
            mat = block.permute(1, 0, 2).reshape(n, -1)
            block.copy_(fn(mat).reshape(n, -1, rest).permute(1, 0, 2))
    return view


class DenseRotation(AxisTransform):
    """An orthogonal ``n x n`` matrix ``M`` (columns are the new basis vectors)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square rotation matrix, but got shape {tuple(matrix.shape)}.")
        self.matrix = matrix

    @property
    def is_rotation(self) -> bool:
        return True

    def new_size(self, n: int) -> int:
        return n

    def linear(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        mt = self.matrix.to(view.dtype).T.contiguous()
        return _slabbed(view, lambda x: mt @ x)

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        m2t = (self.matrix * self.matrix).to(view.dtype).T.contiguous()
        return _slabbed(view, lambda x: m2t @ x)


class HouseholderRotation(AxisTransform):
    r"""The orthogonal matrix :math:`M = I - V T V^T` of ``k`` Householder reflectors (compact WY form).

    Applying it costs :math:`O(k\,n)` per column instead of :math:`O(n^2)`, which is what makes removing
    a few neurons from a wide layer cheap. Built from :func:`torch.geqrf` output.
    """

    def __init__(self, reflectors: Tensor, tau: Tensor) -> None:
        n, k = reflectors.shape
        v = torch.tril(reflectors, diagonal=-1) + torch.eye(n, k, dtype=reflectors.dtype, device=reflectors.device)
        self._set(v, tau)

    @classmethod
    def from_vectors(cls, v: Tensor, tau: Tensor) -> HouseholderRotation:
        """From explicit reflector vectors ``v`` (columns, any support) and their ``tau``."""
        rotation = cls.__new__(cls)
        rotation._set(v, tau)
        return rotation

    def _set(self, v: Tensor, tau: Tensor) -> None:
        k = v.shape[1]
        t = torch.zeros(k, k, dtype=v.dtype, device=v.device)
        # LAPACK's larft recurrence: T[:i, i] = -tau_i T[:i, :i] V[:, :i]^T v_i.
        for i in range(k):
            t[i, i] = tau[i]
            if i:
                t[:i, i] = -tau[i] * (t[:i, :i] @ (v[:, :i].T @ v[:, i]))
        self.v = v
        self.t = t
        self._cache: Dict[Tuple[torch.dtype, torch.device, bool], Tuple[Optional[Tensor], Tensor, Tensor]] = {}

    @property
    def is_rotation(self) -> bool:
        return True

    def new_size(self, n: int) -> int:
        return n

    def dense(self) -> Tensor:
        n = self.v.shape[0]
        return torch.eye(n, dtype=self.v.dtype, device=self.v.device) - self.v @ self.t @ self.v.T

    def _factors(self, dtype: torch.dtype, device: torch.device, quadratic: bool) -> Tuple[Optional[Tensor], Tensor,
                                                                                              Tensor]:
        key = (dtype, device, quadratic)
        if key not in self._cache:
            if not quadratic:
                # M^T X = X - V (T^T V^T X): scale 1, left -V, right^T = T^T V^T.
                factors: Tuple[Optional[Tensor], Tensor, Tensor] = (None, -self.v, self.t.T @ self.v.T)
            else:
                # With Y = V T V^T = P Q^T (P = V T, Q = V): (M∘M)^T x = x - 2 diag(Y) x + Q2 (P2^T x), where
                # P2[i, ab] = P_ia P_ib and Q2[j, ab] = Q_ja Q_jb, since Y_ij^2 = sum_ab P_ia P_ib Q_ja Q_jb.
                n, k = self.v.shape
                p, q = self.v @ self.t, self.v
                diag = (p * q).sum(dim=1)
                p2 = (p[:, :, None] * p[:, None, :]).reshape(n, k * k)
                q2 = (q[:, :, None] * q[:, None, :]).reshape(n, k * k)
                factors = (1.0 - 2.0 * diag, q2, p2.T)
            self._cache[key] = tuple(None if f is None else _normal_or_zero(f, dtype, device)  # type: ignore[assignment]
                                     for f in factors)
        return self._cache[key]

    def linear(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        return _low_rank_update(view, *self._factors(view.dtype, view.device, quadratic=False))

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        n, k = self.v.shape
        if k * k > n:
            m2t = (self.dense() ** 2).T.to(view.dtype).contiguous()
            return _slabbed(view, lambda x: m2t @ x)
        scale, left, right_t = self._factors(view.dtype, view.device, quadratic=True)
        _low_rank_update(view, scale, left, right_t)
        # (M∘M) has no negative entry, but its low-rank form cancels: with one reflector only in the
        # rows where 1 - 2 diag(Y) < 0 (every other term is non-negative), with several anywhere.
        # Clamp those entries back to zero, as the exact rule gives (Adam takes their square root).
        if k > 1:
            return view.clamp_min_(0)
        assert scale is not None, "the squared-entry factors always carry their diagonal"
        rows = torch.nonzero(scale < 0).flatten()
        if rows.numel():
            view.index_copy_(1, rows, view.index_select(1, rows).clamp_min_(0))
        return view


def _normal_or_zero(factor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``factor`` in ``dtype``, contiguous, with entries below ``eps * max|factor|`` set to zero.

    A reflector built from a nearly axis-aligned vector has entries of 1e-14 and below; squared, and
    multiplied with small optimizer state, they give subnormal float32 products, which run an order
    of magnitude slower on x86. Their share of every output is below the dtype's resolution.
    """
    out = factor.to(dtype=dtype, device=device).contiguous()
    if out.is_floating_point() and out.numel():
        info = torch.finfo(dtype)
        cutoff = max(info.tiny, info.eps * float(out.abs().max()))
        out[out.abs() < cutoff] = 0
    return out


def _low_rank_update(view: Tensor, scale: Optional[Tensor], left: Tensor, right_t: Tensor) -> Tensor:
    r"""In place over the space axis of a ``(pre, n, rest)`` view: :math:`X \leftarrow \mathrm{diag}(s)\, X
    + L\,(R^T X)`, ``L`` and ``R`` of ``k`` columns (``s = 1`` when ``scale`` is ``None``).

    Each block is read for the small product and updated where it lies: no copy of the tensor, and
    only a ``k``-row temporary per slab. A weight's rows (``pre == 1``) and a next weight's columns
    (``rest == 1``) are updated in their own layout.
    """
    pre, n, rest = view.shape
    if pre == 1:
        mat = view[0]
        step = max(1, _SLAB_ELEMENTS // max(1, n))
        for start in range(0, rest, step):
            block = mat[:, start : start + step]
            small = right_t @ block
            if scale is not None:
                block.mul_(scale[:, None])
            block.addmm_(left, small)
    elif rest == 1:
        mat = view[:, :, 0]
        step = max(1, _SLAB_ELEMENTS // max(1, n))
        for start in range(0, pre, step):
            block = mat[start : start + step]
            small = block @ right_t.T
            if scale is not None:
                block.mul_(scale[None, :])
            block.addmm_(small, left.T)
    else:
        step = max(1, _SLAB_ELEMENTS // max(1, n * rest))
        for start in range(0, pre, step):
            block = view[start : start + step]
            small = torch.matmul(right_t, block)
            if scale is not None:
                block.mul_(scale[:, None])
            block.add_(torch.matmul(left, small))
    return view


class Selection(AxisTransform):
    """Keep the entries ``index`` (in that order) and drop the rest."""

    def __init__(self, index: Tensor) -> None:
        self.index = index.to(torch.long)
        first = int(self.index[0]) if self.index.numel() else 0
        # A run of consecutive entries is taken as a narrow view: no copy of a wide weight.
        span = torch.arange(first, first + self.index.numel())
        self.run = (first, self.index.numel()) if torch.equal(self.index.cpu(), span) else None

    def new_size(self, n: int) -> int:
        return int(self.index.numel())

    def linear(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        if self.run is not None:
            return view.narrow(1, *self.run)
        return view.index_select(1, self.index.to(view.device))

    quadratic = linear


class Extension(AxisTransform):
    """Append ``count`` entries; their values come from ``fill`` (zeros when not given)."""

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def new_size(self, n: int) -> int:
        return n + self.count

    def linear(self, view: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        pre, _, rest = view.shape
        if fill is None:
            fill = view.new_zeros(pre, self.count, rest)
        return torch.cat([view, fill.to(view.dtype)], dim=1)

    quadratic = linear
