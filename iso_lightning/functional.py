r"""Pure tensor maths of isotropic activations.

An isotropic activation applies one scalar function to a whole vector of pre-activations:

.. math::

    f(z) = s(r)\, z, \qquad r = \sqrt{\lVert z \rVert^2 + o},

where ``o >= 0`` is the *intrinsic length*. Because ``s`` sees the vector only through its norm,
``f(Qz) = Q f(z)`` for every orthogonal ``Q``: the basis of the hidden space is a free choice.

With a partition of the channels into groups ``G_1 .. G_m`` each group gets its own norm and its own
intrinsic length, ``f(z)_G = s(r_G) z_G``. One group is the fully isotropic layer; groups of size one
give an ordinary elementwise network. Groups are described by ``group_index``, a long tensor that
maps each channel to its group; the channels of one group need not be contiguous.

The channel axis is ``dim`` (``-1`` or ``1`` for dense activations, ``1`` for images). Every
function here returns finite values and finite, correct gradients at ``z = 0``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from iso_lightning import _kernel

__all__ = [
    "PROFILES",
    "group_sq_norm",
    "isotropic",
    "isotropic_with_scale",
    "radial_scale",
    "scaled_squared_norm",
]

# Below this squared radius the profiles that are analytic in r**2 use their Taylor series. The
# series keeps terms to q**4; the neglected q**5 term is ~0.009 q**5: 1e-17 at q = 1e-3.
_SERIES_Q = 1e-3


def _tanh_scale(q: Tensor) -> Tensor:
    # s(r) = tanh(r) / r, analytic in q = r**2.
    small = q < _SERIES_Q
    q_big = torch.where(small, torch.ones_like(q), q)
    # The series only ever sees small values: a huge q would overflow q**4 in the unused branch and
    # send 0 * inf = NaN into the gradient.
    q_small = torch.where(small, q, torch.zeros_like(q))
    r = q_big.sqrt()
    big = torch.tanh(r) / r
    q2 = q_small * q_small
    series = 1.0 - q_small / 3.0 + q2 * (2.0 / 15.0) - q2 * q_small * (17.0 / 315.0) + q2 * q2 * (62.0 / 2835.0)
    return torch.where(small, series, big)


def _safe_root(q: Tensor) -> Tensor:
    # sqrt with a zero (instead of infinite) derivative at q == 0. The profiles below are not
    # analytic in q, but f(z) = s(|z|) z is still differentiable at z = 0 with df/dz = s(0) I: the
    # term z * ds/dz vanishes there, which is what the zero derivative encodes.
    positive = q > 0
    return torch.where(positive, torch.where(positive, q, torch.ones_like(q)).sqrt(), torch.zeros_like(q))


def _softsign_scale(q: Tensor) -> Tensor:
    return 1.0 / (1.0 + _safe_root(q))


def _gelu_scale(q: Tensor) -> Tensor:
    # Gaussian CDF of the radius: f(z) = Phi(|z|) z, the radial analogue of GELU.
    return 0.5 * (1.0 + torch.erf(_safe_root(q) * (1.0 / math.sqrt(2.0))))


def _swish_scale(q: Tensor) -> Tensor:
    # Logistic sigmoid of the radius: f(z) = sigmoid(|z|) z, the radial analogue of SiLU.
    return torch.sigmoid(_safe_root(q))


#: Radial profiles by name. Each maps the squared radius ``q = |z|**2 + o`` to the scale ``s``.
PROFILES: Dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": _tanh_scale,
    "softsign": _softsign_scale,
    "gelu": _gelu_scale,
    "swish": _swish_scale,
}


def _check_profile(profile: str) -> Callable[[Tensor], Tensor]:
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"Expected argument `profile` to be one of {sorted(PROFILES)}, but got {profile!r}."
        ) from None


def radial_scale(q: Tensor, profile: str = "tanh") -> Tensor:
    r"""The scalar factor :math:`s` of a profile as a function of the squared radius ``q``.

    Example:
        >>> import torch
        >>> radial_scale(torch.tensor([0.0, 1.0]), "tanh")
        tensor([1.0000, 0.7616])
    """
    return _check_profile(profile)(q)


def group_sq_norm(z: Tensor, dim: int, group_index: Optional[Tensor], groups: int) -> Tensor:
    """Squared norm of each channel group; the channel axis ``dim`` becomes an axis of size ``groups``.

    ``group_index=None`` means one group holding every channel.
    """
    sq = z * z
    if group_index is None:
        return sq.sum(dim=dim, keepdim=True)
    dim = dim % z.dim()
    shape = list(z.shape)
    shape[dim] = groups
    out = z.new_zeros(shape)
    return out.index_add(dim, group_index, sq)


def _broadcast_length(o: Tensor, dim: int, ndim: int) -> Tensor:
    # o has one entry per group; place it on the channel axis.
    shape = [1] * ndim
    shape[dim % ndim] = o.numel()
    return o.reshape(shape)


def _series_limit(dtype: torch.dtype) -> float:
    # The tanh series below keeps terms to q**4; the first neglected term is ~0.009 q**5, which is
    # below float64 resolution for q < 1e-3 and below float32 resolution for q < 1e-2.
    return 1e-3 if dtype == torch.float64 else 1e-2


def _scale_and_slope(q: Tensor, profile: str) -> Tuple[Tensor, Tensor]:
    """``s(q)`` and ``ds/dq`` of a profile, computed directly (no autograd graph)."""
    if profile == "tanh":
        small = q < _series_limit(q.dtype)
        if q.device.type == "cpu" and not bool(small.any()):
            # The common case, without the series branch (the test costs nothing on the CPU).
            r = q.sqrt()
            t = torch.tanh(r)
            s = t / r
            return s, ((1.0 - t * t) - s) / (2.0 * q)
        q_big = torch.where(small, torch.ones_like(q), q)
        r = q_big.sqrt()
        t = torch.tanh(r)
        s_big = t / r
        slope_big = ((1.0 - t * t) - s_big) / (2.0 * q_big)
        q2 = q * q
        s_small = 1.0 - q / 3.0 + q2 * (2.0 / 15.0) - q2 * q * (17.0 / 315.0) + q2 * q2 * (62.0 / 2835.0)
        slope_small = -1.0 / 3.0 + q * (4.0 / 15.0) - q2 * (51.0 / 315.0) + q2 * q * (248.0 / 2835.0)
        return torch.where(small, s_small, s_big), torch.where(small, slope_small, slope_big)
    positive = q > 0
    r = torch.where(positive, q, torch.ones_like(q)).sqrt()
    if profile == "softsign":
        s = 1.0 / (1.0 + torch.where(positive, r, torch.zeros_like(r)))
        ds_dr = -s * s
    elif profile == "gelu":
        rr = torch.where(positive, r, torch.zeros_like(r))
        s = 0.5 * (1.0 + torch.erf(rr * (1.0 / math.sqrt(2.0))))
        ds_dr = torch.exp(-0.5 * rr * rr) * (1.0 / math.sqrt(2.0 * math.pi))
    elif profile == "swish":
        rr = torch.where(positive, r, torch.zeros_like(r))
        s = torch.sigmoid(rr)
        ds_dr = s * (1.0 - s)
    else:
        _check_profile(profile)
        raise AssertionError("unreachable")
    # At q == 0 the slope is infinite but always multiplied by a vanishing z (see _safe_root).
    slope = torch.where(positive, ds_dr / (2.0 * r), torch.zeros_like(r))
    return s, slope


def _squared_radius(z: Tensor, dim: int, length: Optional[Tensor], group_index: Optional[Tensor],
                    groups: int) -> Tensor:
    """``|z_G|**2 + o_G``; recomputed in float64 when the working precision overflows.

    A float32 pre-activation of norm above ~1.8e19 overflows its square; the activation is then
    evaluated in float64 (the result, of norm at most ~1, is representable again).
    """
    q = group_sq_norm(z, dim, group_index, groups)
    if length is not None:
        q = q + _broadcast_length(length.to(q.dtype), dim, z.dim())
    # The check synchronises with the device, so it is made on the CPU only; on an accelerator a
    # pre-activation whose squared norm overflows gives s = 0.
    if z.device.type == "cpu" and z.dtype != torch.float64 and not bool(torch.isfinite(q).all()):
        return _squared_radius(z.double(), dim, length, group_index, groups)
    return q


def capped_abs(value: Tensor, cap: float) -> Tensor:
    """``min(|value|, cap)`` with derivative ``sign(value)`` (+1 at 0), passing at the cap too."""
    o = torch.where(value >= 0, value, -value)
    return torch.where(o <= cap, o, torch.full_like(o, cap))


def _overflowed(z: Tensor, q: Tensor) -> bool:
    return z.device.type == "cpu" and not bool(torch.isfinite(q).all()) and bool(torch.isfinite(z).all())


def _scale_from_radius(z: Tensor, dim: int, length: Optional[Tensor], group_index: Optional[Tensor], groups: int,
                       profile: str) -> Tensor:
    """``s`` for pre-activations whose squared norm overflows even in float64 (norm above ~1e154).

    The radius is computed as ``m * sqrt(sum (z/m)**2 + o/m**2)`` with ``m`` the largest entry of each
    group, as ``hypot`` does; at such radii every profile is at its asymptote.
    """
    mag = z.detach().abs()
    if group_index is None:
        m = mag.amax(dim=dim, keepdim=True)
    else:
        shape = list(z.shape)
        shape[dim] = groups
        m = mag.new_zeros(shape).index_reduce(dim, group_index, mag, "amax")
    m = torch.where(m > 0, m, torch.ones_like(m))
    q = group_sq_norm(z / _expand(m, dim, group_index), dim, group_index, groups)
    if length is not None:
        q = q + _broadcast_length(length.to(q.dtype), dim, z.dim()) / (m * m)
    r = m * q.sqrt()
    if profile == "tanh":
        return torch.tanh(r) / r
    if profile == "softsign":
        return 1.0 / (1.0 + r)
    if profile == "gelu":
        return 0.5 * (1.0 + torch.erf(r * (1.0 / math.sqrt(2.0))))
    return torch.sigmoid(r)


def _expand(s: Tensor, dim: int, group_index: Optional[Tensor]) -> Tensor:
    return s if group_index is None else s.index_select(dim, group_index)


class _IsotropicFunction(torch.autograd.Function):
    """Fused isotropic activation with an analytic backward (first order).

    With ``c = ds/dq * (sum_{i in G} z_i g_i + g_s)`` per group, ``dL/dz = s g + 2 c z`` and
    ``dL/do = c`` summed over the batch: two passes over ``z`` instead of a dozen autograd nodes.
    The tanh profile in float32 on the CPU, with one group per reduction (one group over ``dim``,
    or the blocked layout of grouped FFNs), runs in the compiled kernel of
    :mod:`iso_lightning._kernel` when it is available: one pass forward, one backward.
    """

    @staticmethod
    def forward(ctx, z, length, dim, profile, group_index, groups, length_cap):  # type: ignore[no-untyped-def]
        ctx.dim, ctx.group_index, ctx.groups = dim, group_index, groups
        ctx.length_shape = None if length is None else length.shape
        ctx.length_sign = None
        ctx.set_materialize_grads(False)
        ctx.fast = False
        common = group_index is None and profile == "tanh" and z.device.type == "cpu"
        if length is not None and length_cap is not None:
            # `length` is a raw parameter: the effective o is min(|length|, cap), with derivative
            # sign(length) (taken as +1 at 0) that also passes at the cap, so o never gets stuck.
            raw = length.detach()
            if common and raw.numel() == 1:
                # One group on the CPU: plain numbers, not four tiny tensor operations.
                value = float(raw)
                ctx.length_sign = (1.0 if value >= 0 else -1.0) if abs(value) <= length_cap else 0.0
                length = min(abs(value), length_cap)
            else:
                ctx.length_sign = torch.where(raw >= 0, 1.0, -1.0).to(raw.dtype) * (raw.abs() <= length_cap)
                length = raw.abs().clamp(max=length_cap)
        if common and z.dtype == torch.float32 and z.is_contiguous() and z.numel() \
                and (not isinstance(length, Tensor) or length.numel() == 1):
            # The compiled kernel: one pass forward, one backward (see iso_lightning._kernel).
            outer, size = math.prod(z.shape[:dim]), z.shape[dim]
            inner = z.numel() // (outer * size)
            done = _kernel.forward(z, outer, size, inner, 0.0 if length is None else float(length))
            if done is not None:
                h, s, t, q = done
                ctx.kernel = (outer, size, inner)
                ctx.save_for_backward(z, s, t, q)
                return h, s.view(z.shape[:dim] + (1,) + z.shape[dim + 1:])
        ctx.kernel = None
        if common:
            # The common case in as few operations as possible: at these sizes the cost of a step is
            # the number of small tensor operations, not arithmetic. The slope is left to backward.
            # Each fresh activation-sized tensor costs page faults as well as its pass, so the squares
            # are computed into the buffer that then receives the output.
            buffer = torch.mul(z, z)
            q = buffer.sum(dim, keepdim=True)
            if isinstance(length, float):
                q.add_(length)
            elif length is not None:
                q.add_(_broadcast_length(length.to(q.dtype), dim, z.dim()))
            lo, hi = torch.aminmax(q)
            if float(lo) >= _series_limit(q.dtype) and math.isfinite(float(hi)):
                r = q.sqrt()
                t = torch.tanh(r)
                s = t / r
                ctx.save_for_backward(z, s, q, t)
                ctx.fast = True
                return torch.mul(z, s, out=buffer), s
            if isinstance(length, float):
                length = q.new_full((1,), length)
        q = _squared_radius(z, dim, length, group_index, groups)
        if _overflowed(z, q):
            s = _scale_from_radius(z.double(), dim, length, group_index, groups, profile)
            slope = torch.zeros_like(s)  # ds/dq ~ r**-3 underflows at these radii
        else:
            s, slope = _scale_and_slope(q, profile)
        s, slope = s.to(z.dtype), slope.to(z.dtype)
        s_full = _expand(s, dim, group_index)
        ctx.save_for_backward(z, s_full, slope)
        return z * s_full, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_s):  # type: ignore[no-untyped-def]
        dim, group_index = ctx.dim, ctx.group_index
        if ctx.kernel is not None:
            return _IsotropicFunction._kernel_backward(ctx, grad_h, grad_s)
        if ctx.fast:
            z, s_full, q, t = ctx.saved_tensors
            slope = (1.0 - torch.addcmul(s_full, t, t)).div_(q).mul_(0.5)  # ds/dq of tanh(r)/r
        else:
            z, s_full, slope = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(z)
        # One activation-sized allocation: the products z * grad_h, then the gradient in their place.
        buffer = torch.mul(z, grad_h)
        if group_index is None:
            zg = buffer.sum(dim, keepdim=True)
        else:
            zg = z.new_zeros(slope.shape).index_add(dim, group_index, buffer)
        if grad_s is not None:
            zg = zg + grad_s
        c = zg.mul_(slope)
        grad_z = torch.mul(grad_h, s_full, out=buffer).addcmul_(_expand(c, dim, group_index), z, value=2.0)
        grad_length = _IsotropicFunction._length_grad(ctx, c) if _IsotropicFunction._wants_length_grad(ctx) else None
        return grad_z, grad_length, None, None, None, None, None

    @staticmethod
    def _kernel_backward(ctx, grad_h, grad_s):  # type: ignore[no-untyped-def]
        z, s, t, q = ctx.saved_tensors
        outer, size, inner = ctx.kernel
        grad_h = torch.zeros_like(z) if grad_h is None else grad_h.contiguous()
        grad_s = None if grad_s is None else grad_s.contiguous()
        want_c = _IsotropicFunction._wants_length_grad(ctx)
        grad_z, c = _kernel.backward(z, grad_h, grad_s, s, t, q, outer, size, inner, want_c)
        grad_length = None if c is None else _IsotropicFunction._length_grad(ctx, c)  # c only when wanted
        return grad_z, grad_length, None, None, None, None, None

    @staticmethod
    def _wants_length_grad(ctx) -> bool:  # type: ignore[no-untyped-def]
        return ctx.length_shape is not None and bool(ctx.needs_input_grad[1])

    @staticmethod
    def _length_grad(ctx, c: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        """``dL/do`` from the per-group ``c``: summed over everything but the group axis, times ``d o / d length``."""
        if ctx.group_index is None:
            grad = c.sum().reshape(ctx.length_shape)
        else:
            other = [d for d in range(c.dim()) if d != ctx.dim]
            grad = c.sum(dim=other).reshape(ctx.length_shape) if other else c.reshape(ctx.length_shape)
        return grad if ctx.length_sign is None else grad * ctx.length_sign


def isotropic_with_scale(
    z: Tensor,
    dim: int = -1,
    profile: str = "tanh",
    length: Optional[Tensor] = None,
    group_index: Optional[Tensor] = None,
    groups: int = 1,
    fused: bool = True,
    length_cap: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Apply an isotropic activation and also return the per-group scale.

    Args:
        z: pre-activations.
        dim: the channel axis.
        profile: a key of :data:`PROFILES`.
        length: intrinsic length ``o`` with one entry per group (shape ``(groups,)``), or ``None``
            for ``o = 0``. It must be non-negative; modules enforce that.
        group_index: long tensor of size ``z.shape[dim]`` mapping channels to groups; ``None`` for a
            single group.
        groups: number of groups (ignored when ``group_index`` is ``None``).
        fused: use the fused function with an analytic backward (fast, first-order gradients only;
            the compiled CPU kernel for the tanh profile in float32 where it is available);
            ``False`` builds the result from differentiable operations (supports double backward).
        length_cap: when given, ``length`` is a raw trainable value and the intrinsic length used is
            ``min(|length|, length_cap)``, differentiable at 0 and at the cap.

    Returns:
        ``(f(z), s)`` where ``s`` has the shape of ``z`` with the channel axis of size ``groups``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[3.0, 4.0]])
        >>> h, s = isotropic_with_scale(z)
        >>> torch.allclose(h, z * torch.tanh(torch.tensor(5.0)) / 5.0)
        True
    """
    fn = _check_profile(profile)
    dim = dim % z.dim()
    if group_index is None or groups == 1:
        group_index, groups = None, 1  # one group: the plain (and faster) computation
    if fused:
        return _IsotropicFunction.apply(z, length, dim, profile, group_index, groups,  # type: ignore[no-any-return]
                                        length_cap)
    if length is not None and length_cap is not None:
        length = capped_abs(length, length_cap)
    q = _squared_radius(z, dim, length, group_index, groups)
    if _overflowed(z, q):
        s = _scale_from_radius(z.double(), dim, length, group_index, groups, profile).to(z.dtype)
    else:
        s = fn(q).to(z.dtype)
    return z * _expand(s, dim, group_index), s


def isotropic(
    z: Tensor,
    dim: int = -1,
    profile: str = "tanh",
    length: Optional[Tensor] = None,
    group_index: Optional[Tensor] = None,
    groups: int = 1,
    fused: bool = True,
) -> Tensor:
    """Isotropic activation :math:`f(z) = s(\\sqrt{|z|^2 + o})\\, z` over the channel axis ``dim``.

    Example:
        >>> import torch
        >>> q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
        >>> z = torch.randn(2, 4, dtype=torch.float64)
        >>> torch.allclose(isotropic(z @ q.T), isotropic(z) @ q.T)
        True
    """
    return isotropic_with_scale(z, dim, profile, length, group_index, groups, fused)[0]


class _ScaledSquaredNorm(torch.autograd.Function):
    """``scale * sum_i ||t_i||^2`` in one node (a penalty over several small tensors)."""

    @staticmethod
    def forward(ctx, scale, *tensors):  # type: ignore[no-untyped-def]
        ctx.scale = scale
        ctx.save_for_backward(*tensors)
        total = tensors[0].new_zeros((), dtype=torch.promote_types(tensors[0].dtype, torch.float32))
        for t in tensors:
            flat = t.reshape(-1)
            total.add_(torch.dot(flat, flat))
        return total.mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        # Written with differentiable operations of the inputs, so double backward is right too.
        factor = grad * (2.0 * ctx.scale)
        return (None,) + tuple(t * factor for t in ctx.saved_tensors)


def scaled_squared_norm(tensors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    r""":math:`\text{scale} \sum_i \lVert t_i \rVert^2` of several tensors, as one autograd node.

    A penalty over a few small tensors is otherwise two operations per tensor plus the sums, each
    with its backward node, which costs more than the arithmetic at these sizes.

    Example:
        >>> import torch
        >>> scaled_squared_norm([torch.tensor([3.0]), torch.tensor([[4.0]])], 0.5)
        tensor(12.5000)
    """
    if not tensors:
        raise ValueError("Expected argument `tensors` to hold at least one tensor, but got none.")
    return _ScaledSquaredNorm.apply(float(scale), *tensors)  # type: ignore[no-any-return]
