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
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "PROFILES",
    "group_sq_norm",
    "isotropic",
    "isotropic_with_scale",
    "radial_scale",
]

# Below this squared radius the profiles that are analytic in r**2 use their Taylor series. The
# series is truncated after the q**3 term, whose neglected successor is ~q**4/10: at q = 1e-3 that is
# 1e-13, far below float64 resolution of the O(1) result.
_SERIES_Q = 1e-3


def _tanh_scale(q: Tensor) -> Tensor:
    # s(r) = tanh(r) / r, analytic in q = r**2.
    small = q < _SERIES_Q
    q_big = torch.where(small, torch.ones_like(q), q)
    r = q_big.sqrt()
    big = torch.tanh(r) / r
    series = 1.0 - q / 3.0 + q * q * (2.0 / 15.0) - q * q * q * (17.0 / 315.0)
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


def isotropic_with_scale(
    z: Tensor,
    dim: int = -1,
    profile: str = "tanh",
    length: Optional[Tensor] = None,
    group_index: Optional[Tensor] = None,
    groups: int = 1,
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
    if group_index is None:
        groups = 1
    q = group_sq_norm(z, dim, group_index, groups)
    if length is not None:
        q = q + _broadcast_length(length.to(q.dtype), dim, z.dim())
    s = fn(q)
    if group_index is None:
        return z * s, s
    return z * s.index_select(dim % z.dim(), group_index), s


def isotropic(
    z: Tensor,
    dim: int = -1,
    profile: str = "tanh",
    length: Optional[Tensor] = None,
    group_index: Optional[Tensor] = None,
    groups: int = 1,
) -> Tensor:
    """Isotropic activation :math:`f(z) = s(\\sqrt{|z|^2 + o})\\, z` over the channel axis ``dim``.

    Example:
        >>> import torch
        >>> q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
        >>> z = torch.randn(2, 4, dtype=torch.float64)
        >>> torch.allclose(isotropic(z @ q.T), isotropic(z) @ q.T)
        True
    """
    return isotropic_with_scale(z, dim, profile, length, group_index, groups)[0]
