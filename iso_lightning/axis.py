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

A transform that needs no view where the space's axis holds one entry per neuron (an extension: a
concatenation along that axis; a selection: a narrow view or an index selection) is also applied to
the tensor itself (:meth:`AxisTransform.along`), which saves making the view and reshaping the result
back, per tensor, gradient and moment.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["AxisTransform", "DenseRotation", "Extension", "HouseholderRotation", "Selection", "all_finite",
           "leading_view"]

# Rotations of large tensors are applied in place, a slab at a time, so that a shrink of a layer with
# 150,528 inputs never holds a second copy of its weight.
_SLAB_ELEMENTS = 1 << 22


class AxisTransform:
    """A linear map of a tensor axis; subclasses implement the two rules."""

    #: Whether finite values can map to non-finite ones: a rotation of values near the dtype's
    #: largest overflows; a selection or an extension only copies them (and the new entries).
    may_overflow = False
    #: Whether every output entry adds its own input entry (:math:`X' = \mathrm{diag}(s) X + \ldots`),
    #: so that a NaN or an infinity of the input always reaches the result and the result's check
    #: covers the input too (a dense product may skip zero coefficients in BLAS; a selection drops).
    carries_input = False
    #: Whether the result's first ``n`` entries along the axis are the input, bit for bit (an
    #: extension): the old tensor is then a view of the new one (see :func:`leading_view`).
    keeps_prefix = False

    def new_size(self, n: int) -> int:
        raise NotImplementedError

    def linear(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        """First-moment rule. ``view`` is ``(pre, n, rest)``; ``fill`` shapes ``(pre, k, rest)``.

        The result is a new tensor (``view`` is left as it was) or a view of ``view``'s storage
        whose values are unchanged (a run of a :class:`Selection`); a rotation with ``inplace``
        overwrites ``view`` instead, which saves a copy of a very wide tensor.
        """
        raise NotImplementedError

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        """Second-moment rule :math:`(M \\circ M)`: keeps non-negative values non-negative."""
        raise NotImplementedError

    def along(self, t: Tensor, axis: int, fill: Union[None, float, Tensor] = None
              ) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """The transform applied along ``axis`` of ``t`` itself, for a space with one entry per neuron
        there: no ``(pre, n, rest)`` view to make and reshape back. ``None`` for a transform with no
        such form (use :meth:`linear` on a view); else the result and, for a :attr:`keeps_prefix`
        transform, a view of it with ``t``'s shape, strides and values (see :func:`leading_view`), or
        ``None``. ``fill``: the new entries, shaped as ``t`` with the new count along ``axis``, or one
        value for all of them.
        """
        return None

    def inverse(self) -> AxisTransform:
        """The inverse map (rotations only)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse.")

    @property
    def is_rotation(self) -> bool:
        return False


def _slabbed(view: Tensor, fn, inplace: bool) -> Tensor:  # type: ignore[no-untyped-def]
    """Apply ``fn`` (maps an ``(n, m)`` slab to ``(n, m)``) over ``view``, slab by slab.

    The result is a new tensor, or ``view`` itself, overwritten, when ``inplace``.
    """
    pre, n, rest = view.shape
    if view.numel() <= _SLAB_ELEMENTS and not inplace:
        mat = view.permute(1, 0, 2).reshape(n, pre * rest)
        return fn(mat).reshape(n, pre, rest).permute(1, 0, 2)
    out = view if inplace else torch.empty_like(view)
    if rest >= pre:
        step = max(1, _SLAB_ELEMENTS // max(1, n * pre))
        for start in range(0, rest, step):
            block = view[:, :, start : start + step]
            mat = block.permute(1, 0, 2).reshape(n, -1)
            out[:, :, start : start + step].copy_(fn(mat).reshape(n, pre, -1).permute(1, 0, 2))
    else:
        step = max(1, _SLAB_ELEMENTS // max(1, n * rest))
        for start in range(0, pre, step):
            block = view[start : start + step]
            mat = block.permute(1, 0, 2).reshape(n, -1)
            out[start : start + step].copy_(fn(mat).reshape(n, -1, rest).permute(1, 0, 2))
    return out


class DenseRotation(AxisTransform):
    """An orthogonal ``n x n`` matrix ``M`` (columns are the new basis vectors)."""

    may_overflow = True

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square rotation matrix, but got shape {tuple(matrix.shape)}.")
        self.matrix = matrix

    @property
    def is_rotation(self) -> bool:
        return True

    def new_size(self, n: int) -> int:
        return n

    def linear(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        mt = self.matrix.to(device=view.device, dtype=view.dtype).T.contiguous()
        return _slabbed(view, lambda x: mt @ x, inplace)

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        m2t = (self.matrix * self.matrix).to(device=view.device, dtype=view.dtype).T.contiguous()
        return _slabbed(view, lambda x: m2t @ x, inplace)

    def inverse(self) -> DenseRotation:
        return DenseRotation(self.matrix.T)


class HouseholderRotation(AxisTransform):
    r"""The orthogonal matrix :math:`M = I - V T V^T` of ``k`` Householder reflectors (compact WY form).

    Applying it costs :math:`O(k\,n)` per column instead of :math:`O(n^2)`, which is what makes removing
    a few neurons from a wide layer cheap. Built from :func:`torch.geqrf` output.
    """

    may_overflow = True
    carries_input = True

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

    def linear(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        return _low_rank_update(view, *self._factors(view.dtype, view.device, quadratic=False), inplace=inplace)

    def quadratic(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        n, k = self.v.shape
        if k * k > n:
            m2t = (self.dense() ** 2).T.to(device=view.device, dtype=view.dtype).contiguous()
            return _slabbed(view, lambda x: m2t @ x, inplace)
        scale, left, right_t = self._factors(view.dtype, view.device, quadratic=True)
        out = _low_rank_update(view, scale, left, right_t, inplace=inplace)
        # (M∘M) has no negative entry, but its low-rank form cancels: with one reflector only in the
        # rows where 1 - 2 diag(Y) < 0 (every other term is non-negative), with several anywhere.
        # Clamp those entries back to zero, as the exact rule gives (Adam takes their square root).
        if k > 1:
            return out.clamp_min_(0)
        assert scale is not None, "the squared-entry factors always carry their diagonal"
        rows = torch.nonzero(scale < 0).flatten()
        if rows.numel():
            out.index_copy_(1, rows, out.index_select(1, rows).clamp_min_(0))
        return out

    def inverse(self) -> HouseholderRotation:
        # M^T = I - V T^T V^T: the same reflectors with the triangular factor transposed.
        rotation = HouseholderRotation.__new__(HouseholderRotation)
        rotation.v, rotation.t = self.v, self.t.T.contiguous()
        rotation._cache = {}
        return rotation


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


def _low_rank_update(view: Tensor, scale: Optional[Tensor], left: Tensor, right_t: Tensor,
                     inplace: bool = False) -> Tensor:
    r""":math:`X' = \mathrm{diag}(s)\, X + L\,(R^T X)` over the space axis of a ``(pre, n, rest)``
    view, ``L`` and ``R`` of ``k`` columns (``s = 1`` when ``scale`` is ``None``).

    Written into a new tensor, or into ``view`` itself when ``inplace`` (no copy of the tensor, and
    only a ``k``-row temporary per slab). A weight's rows (``pre == 1``) and a next weight's columns
    (``rest == 1``) are read and written in their own layout.
    """
    pre, n, rest = view.shape
    out = view if inplace else torch.empty_like(view, memory_format=torch.contiguous_format)
    if pre == 1:
        mat, dst = view[0], out[0]
        step = max(1, _SLAB_ELEMENTS // max(1, n))
        for start in range(0, rest, step):
            block, target = mat[:, start : start + step], dst[:, start : start + step]
            small = right_t @ block
            if scale is not None:
                torch.mul(block, scale[:, None], out=target)
                target.addmm_(left, small)
            elif inplace:
                target.addmm_(left, small)
            elif left.shape[1] == 1:  # one reflector: an element-wise pass (addmm copies, then updates)
                torch.addcmul(block, left, small, out=target)
            else:
                torch.addmm(block, left, small, out=target)
    elif rest == 1:
        mat, dst = view[:, :, 0], out[:, :, 0]
        step = max(1, _SLAB_ELEMENTS // max(1, n))
        for start in range(0, pre, step):
            block, target = mat[start : start + step], dst[start : start + step]
            small = block @ right_t.T
            if scale is not None:
                torch.mul(block, scale[None, :], out=target)
                target.addmm_(small, left.T)
            elif inplace:
                target.addmm_(small, left.T)
            elif left.shape[1] == 1:
                torch.addcmul(block, small, left.T, out=target)
            else:
                torch.addmm(block, small, left.T, out=target)
    else:
        step = max(1, _SLAB_ELEMENTS // max(1, n * rest))
        for start in range(0, pre, step):
            block, target = view[start : start + step], out[start : start + step]
            small = torch.matmul(right_t, block)
            if scale is not None:
                torch.mul(block, scale[:, None], out=target)
                target.add_(torch.matmul(left, small))
            elif inplace:
                target.add_(torch.matmul(left, small))
            else:
                torch.add(block, torch.matmul(left, small), out=target)
    return out


def leading_view(old: Tensor, old_view: Tensor, new_view: Tensor) -> Optional[Tensor]:
    """A view of ``new_view`` (a :attr:`~AxisTransform.keeps_prefix` result, ``(pre, n', rest)``) with
    the shape, strides and values of ``old`` (whose view is ``old_view``), or ``None`` where its
    leading entries are not laid out as ``old`` is (the columns of a matrix)."""
    if old_view.shape[0] == 1 and old.is_contiguous() and old_view.is_contiguous() and new_view.is_contiguous() \
            and old_view.data_ptr() == old.data_ptr():
        # The axis leads (rows of a weight, a bias): the old entries are the first of the storage.
        return new_view.as_strided(old.shape, old.stride(), new_view.storage_offset())
    part = new_view[:, : old_view.shape[1], :]
    try:
        out = part.view(old.shape)
    except RuntimeError:
        return None
    return out if out.stride() == old.stride() else None


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (a NaN or infinity makes the sum
    non-finite), the element-wise test only when the sum is not finite (large finite values too)."""
    t = t.detach()
    return not t.is_floating_point() or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


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

    def linear(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        if self.run is not None:
            return view.narrow(1, *self.run)
        return view.index_select(1, self.index.to(view.device))

    quadratic = linear

    def along(self, t: Tensor, axis: int, fill: Union[None, float, Tensor] = None
              ) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        out = t.narrow(axis, *self.run) if self.run is not None else t.index_select(axis, self.index.to(t.device))
        return out.contiguous(), None  # a run of rows stays a view; of columns, a copy (as the view rule gives)


class Extension(AxisTransform):
    """Append ``count`` entries; their values come from ``fill`` (zeros when not given)."""

    keeps_prefix = True
    carries_input = True

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def new_size(self, n: int) -> int:
        return n + self.count

    def linear(self, view: Tensor, fill: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        pre, _, rest = view.shape
        if fill is None:
            fill = view.new_zeros(pre, self.count, rest)
        return torch.cat([view, fill.to(device=view.device, dtype=view.dtype)], dim=1)

    quadratic = linear

    def along(self, t: Tensor, axis: int, fill: Union[None, float, Tensor] = None
              ) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        if not isinstance(fill, Tensor):
            shape = list(t.shape)
            shape[axis] = self.count
            fill = t.new_full(shape, 0.0 if fill is None else fill)
        new = torch.cat((t, fill.to(device=t.device, dtype=t.dtype)), dim=axis)
        if axis != 0 or not t.is_contiguous():
            return new, None  # the old entries are not the first of the storage
        restore = new.narrow(0, 0, t.shape[0])
        return new, restore if restore.stride() == t.stride() else None
