"""Tests of :mod:`iso_lightning.functional` against an independent float64 reference.

The reference below is written directly from the formula

    f(z)_G = s(r_G) z_G,   r_G = sqrt(|z_G|^2 + o_G),

with ``s`` one of ``tanh(r) / r``, ``1 / (1 + r)``, ``Phi(r)``, ``sigmoid(r)``. It shares no code with
the library (no series, no ``index_add``, no ``torch.where``): it loops over groups with boolean masks
and evaluates the textbook expression of each profile in float64. ``tanh(r) / r`` is accurate to a few
ulp for every ``r >= 1e-300`` in float64 because ``tanh`` is correctly rounded near 0, so the only
special case is ``r == 0`` exactly, where the limit is used.

Tolerances (float64, eps = 2.2e-16):

* values: ``rtol = 1e-13``. The library switches to a Taylor series of ``tanh(r)/r`` below
  ``q = r**2 = 1e-3`` (float64); even a series cut after its ``q**3`` term is within
  ``62/2835 q**4 ~ 2.2e-14`` there. The other profiles differ from the reference by rounding only.
* isotropy, Jacobians: ``atol = 1e-12`` on O(1) quantities built from a handful of rotations and
  products (each contributes O(n eps) ~ 1e-15; 1e-12 leaves three orders of margin).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch import Tensor

from iso_lightning.functional import (
    PROFILES,
    group_sq_norm,
    isotropic,
    isotropic_with_scale,
    radial_scale,
    scaled_squared_norm,
)

DT = torch.float64
RTOL = 1e-13  # series truncation 2.2e-14 at the switch plus rounding; see module docstring
ATOL = 1e-12  # O(1) values after a few orthogonal products; see module docstring


# ----------------------------------------------------------------------------- independent reference
def _tanh_ref(r: Tensor) -> Tensor:
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, torch.tanh(safe) / safe, torch.ones_like(r))


def _softsign_ref(r: Tensor) -> Tensor:
    return 1.0 / (1.0 + r)


def _gelu_ref(r: Tensor) -> Tensor:
    # Standard normal CDF, via erfc (accurate for all r >= 0).
    return 0.5 * torch.erfc(-r / math.sqrt(2.0))


def _swish_ref(r: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-r))


REF_SCALE: Dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": _tanh_ref,
    "softsign": _softsign_ref,
    "gelu": _gelu_ref,
    "swish": _swish_ref,
}


def _ref_dscale(profile: str, r: Tensor) -> Tensor:
    """ds/dr of each profile, for r > 0."""
    if profile == "tanh":
        return (1.0 - torch.tanh(r) ** 2) / r - torch.tanh(r) / r**2
    if profile == "softsign":
        return -1.0 / (1.0 + r) ** 2
    if profile == "gelu":
        return torch.exp(-0.5 * r**2) / math.sqrt(2.0 * math.pi)
    sig = 1.0 / (1.0 + torch.exp(-r))
    return sig * (1.0 - sig)


def reference(z: Tensor, profile: str, o: Optional[Tensor] = None, dim: int = -1,
              groups: Optional[List[int]] = None) -> Tensor:
    """f(z) in float64 from the formula; ``groups[c]`` is the group of channel c (None: one group)."""
    z = z.to(DT).movedim(dim, -1)
    n = z.shape[-1]
    groups = [0] * n if groups is None else list(groups)
    out = torch.empty_like(z)
    for g in sorted(set(groups)):
        mask = torch.tensor([c == g for c in groups])
        zg = z[..., mask]
        og = 0.0 if o is None else float(o.reshape(-1)[g if o.numel() > 1 else 0])
        r = torch.sqrt((zg * zg).sum(-1, keepdim=True) + og)
        out[..., mask] = REF_SCALE[profile](r) * zg
    return out.movedim(-1, dim)


def _random_direction(*shape: int) -> Tensor:
    v = torch.randn(*shape, dtype=DT)
    return v / v.norm(dim=-1, keepdim=True)


def _orthogonal(n: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def _block_rotation(groups: List[int]) -> Tensor:
    """A random orthogonal matrix that only mixes channels of the same group."""
    n = len(groups)
    q = torch.zeros(n, n, dtype=DT)
    for g in set(groups):
        idx = torch.tensor([c for c in range(n) if groups[c] == g])
        q[idx.unsqueeze(1), idx.unsqueeze(0)] = _orthogonal(len(idx))
    return q


def _index(groups: List[int]) -> Dict[str, object]:
    return {"group_index": torch.tensor(groups), "groups": max(groups) + 1}


PROFILE_NAMES = sorted(PROFILES)
#: Both implementations: the fused kernel with an analytic backward, and the plain autograd graph.
FUSED = pytest.mark.parametrize("fused", (True, False), ids=("fused", "autograd"))
LENGTHS = (None, 0.0, 0.37)  # o absent, o = 0 given explicitly, o > 0


def _length(o: Optional[float], groups: int = 1) -> Optional[Tensor]:
    return None if o is None else torch.full((groups,), o, dtype=DT)


def test_profiles_are_the_documented_ones():
    # The reference covers exactly these; a new profile must get a reference before it ships.
    assert set(PROFILES) == set(REF_SCALE)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_random_points_match_reference(profile, o, fused):
    z = 2.0 * torch.randn(7, 5, dtype=DT)
    out = isotropic(z, profile=profile, fused=fused, length=_length(o))
    torch.testing.assert_close(out, reference(z, profile, _length(o)), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_images_channel_dim_match_reference(profile, o, fused):
    z = torch.randn(2, 4, 3, 5, dtype=DT)
    out = isotropic(z, dim=1, profile=profile, fused=fused, length=_length(o))
    expected = reference(z, profile, _length(o), dim=1)
    assert out.shape == z.shape
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=0)
    # The channel axis really is axis 1: treating axis -1 as channels gives something else.
    assert (isotropic(z, dim=-1, profile=profile, fused=fused, length=_length(o)) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", (None, 1e-12, 5e-4, 0.37))
@FUSED
def test_tiny_radii_match_reference(profile, o, fused):
    # Radii from 1e-8 to 1e-2, plus points straddling the series switch q = |z|^2 + o = 1e-3.
    base = torch.tensor([1e-8, 1e-6, 1e-4, 1e-3, 1e-2], dtype=DT)
    q_target = torch.tensor([1e-3 * (1 - 1e-6), 1e-3, 1e-3 * (1 + 1e-6)], dtype=DT)
    o_val = 0.0 if o is None else o
    switch = torch.sqrt((q_target - o_val).clamp(min=0))
    radii = torch.cat([base, switch])
    z = radii.unsqueeze(1) * _random_direction(len(radii), 6)
    out = isotropic(z, profile=profile, fused=fused, length=_length(o))
    torch.testing.assert_close(out, reference(z, profile, _length(o)), rtol=RTOL, atol=0)


def test_tanh_series_is_continuous_across_switch():
    # s(q) just below and just above q = 1e-3 come from different formulas; they must agree to the
    # series truncation error (2.2e-14) plus rounding.
    q = torch.tensor([1e-3 * (1 - 1e-12), 1e-3 * (1 + 1e-12)], dtype=DT)
    s = radial_scale(q, "tanh")
    assert abs(float(s[0] - s[1])) < 1e-13
    torch.testing.assert_close(s, _tanh_ref(q.sqrt()), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_large_radii_match_reference(profile, o, fused):
    z = 1e3 * _random_direction(4, 5) * torch.tensor([[1.0], [2.0], [10.0], [100.0]], dtype=DT)
    out = isotropic(z, profile=profile, fused=fused, length=_length(o))
    torch.testing.assert_close(out, reference(z, profile, _length(o)), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_exact_zero(profile, o, fused):
    z = torch.zeros(3, 4, dtype=DT)
    out, s = isotropic_with_scale(z, profile=profile, fused=fused, length=_length(o))
    assert torch.equal(out, z)
    r0 = torch.tensor([0.0 if o is None else math.sqrt(o)], dtype=DT)
    expected_s = REF_SCALE[profile](r0)
    assert s.shape == (3, 1)
    torch.testing.assert_close(s, expected_s.expand(3, 1), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_radial_scale_matches_reference(profile):
    q = torch.cat([torch.zeros(1, dtype=DT), torch.logspace(-16, 6, 45, dtype=DT)])
    torch.testing.assert_close(radial_scale(q, profile), REF_SCALE[profile](q.sqrt()), rtol=RTOL, atol=0)


def test_radial_scale_docstring_values():
    # tanh(1) / 1 = 0.76159..., s(0) = 1.
    s = radial_scale(torch.tensor([0.0, 1.0], dtype=DT), "tanh")
    assert float(s[0]) == 1.0
    assert abs(float(s[1]) - math.tanh(1.0)) < 1e-15


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@FUSED
def test_scale_output_and_shape(profile, fused):
    # isotropic_with_scale returns s with the channel axis of size `groups`, and f = s z.
    z = torch.randn(2, 6, 3, 3, dtype=DT)
    out, s = isotropic_with_scale(z, dim=1, profile=profile, fused=fused)
    assert s.shape == (2, 1, 3, 3)
    torch.testing.assert_close(out, s * z, rtol=0, atol=0)
    groups = [0, 1, 1, 2, 0, 2]
    out, s = isotropic_with_scale(z, dim=1, profile=profile, fused=fused, **_index(groups))
    assert s.shape == (2, 3, 3, 3)
    r = torch.stack([z[:, [c for c in range(6) if groups[c] == g]].pow(2).sum(1).sqrt() for g in range(3)], 1)
    torch.testing.assert_close(s, REF_SCALE[profile](r), rtol=RTOL, atol=0)


def test_group_sq_norm():
    z = torch.randn(3, 5, dtype=DT)
    idx = torch.tensor([1, 0, 1, 2, 0])
    got = group_sq_norm(z, -1, idx, 3)
    expected = torch.stack([(z[:, idx == g] ** 2).sum(1) for g in range(3)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(group_sq_norm(z, -1, None, 1), (z**2).sum(1, keepdim=True), rtol=1e-15, atol=0)


def test_bad_profile_raises():
    with pytest.raises(ValueError, match="`profile`"):
        isotropic(torch.zeros(2, 3), profile="relu")
    with pytest.raises(ValueError, match="`profile`"):
        radial_scale(torch.zeros(2), "sigmoid")


# ----------------------------------------------------------------------------- gradients
def _gradcheck_points(kind: str) -> Tensor:
    if kind == "random":
        return torch.randn(3, 4, dtype=DT)
    if kind == "near_zero":
        # radii 1e-4 (deep in the series branch) and ~sqrt(1e-3) (at the switch)
        return torch.cat([1e-4 * _random_direction(1, 4), 0.0316 * _random_direction(2, 4)])
    return torch.zeros(3, 4, dtype=DT)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("point", ("random", "near_zero", "zero"))
@pytest.mark.parametrize("o_mode", ("none", "constant", "input"))
@FUSED
def test_gradcheck(profile, point, o_mode, fused):
    z = _gradcheck_points(point).requires_grad_(True)
    if o_mode == "none":
        assert torch.autograd.gradcheck(lambda z: isotropic(z, profile=profile, fused=fused), (z,))
    elif o_mode == "constant":
        o = torch.tensor([0.3], dtype=DT)
        assert torch.autograd.gradcheck(lambda z: isotropic(z, profile=profile, fused=fused, length=o), (z,))
    else:
        o = torch.tensor([0.3], dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z, o: isotropic(z, profile=profile, fused=fused, length=o), (z, o))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("point", ("random", "zero"))
@FUSED
def test_gradcheck_grouped_images(profile, point, fused):
    # Per-group o as an input, non-contiguous groups, channel axis 1; one group is exactly zero in
    # the "random" case as well (channels 1 and 3).
    z = torch.randn(2, 5, 2, 2, dtype=DT) if point == "random" else torch.zeros(2, 5, 2, 2, dtype=DT)
    z[:, [1, 3]] = 0.0
    z.requires_grad_(True)
    groups = [0, 1, 0, 1, 2]
    o = torch.tensor([0.2, 0.5, 1.5], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, o: isotropic(z, dim=1, profile=profile, fused=fused, length=o, **_index(groups)), (z, o)
    )


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_jacobian_at_zero_is_scaled_identity(profile, o, fused):
    # f(z) = s(r) z with z = 0 gives df/dz = s(sqrt(o)) I exactly: the z ds/dz term vanishes.
    n = 5
    length = _length(o)
    jac = torch.autograd.functional.jacobian(lambda z: isotropic(z, profile=profile, fused=fused, length=length),
                                             torch.zeros(n, dtype=DT))
    s0 = float(REF_SCALE[profile](torch.tensor(0.0 if o is None else math.sqrt(o), dtype=DT)))
    torch.testing.assert_close(jac, s0 * torch.eye(n, dtype=DT), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", LENGTHS)
@FUSED
def test_jacobian_matches_analytic_formula(profile, o, fused):
    # df/dz = s I + (s'(r) / r) z z^T at a random point.
    z = torch.randn(5, dtype=DT)
    length = _length(o)
    jac = torch.autograd.functional.jacobian(lambda z: isotropic(z, profile=profile, fused=fused, length=length), z)
    r = torch.sqrt(z @ z + (0.0 if o is None else o))
    expected = REF_SCALE[profile](r) * torch.eye(5, dtype=DT) + (_ref_dscale(profile, r) / r) * torch.outer(z, z)
    torch.testing.assert_close(jac, expected, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- isotropy
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", (None, 0.37))
@FUSED
def test_isotropy_dense(profile, o, fused):
    q = _orthogonal(6)
    z = torch.randn(8, 6, dtype=DT)
    length = _length(o)
    torch.testing.assert_close(isotropic(z @ q.T, profile=profile, fused=fused, length=length),
                               isotropic(z, profile=profile, fused=fused, length=length) @ q.T, rtol=0, atol=ATOL)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", (None, 0.37))
@FUSED
def test_isotropy_image_channels(profile, o, fused):
    q = _orthogonal(5)
    z = torch.randn(2, 5, 4, 3, dtype=DT)
    length = _length(o)

    def rotate(t: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", q, t)

    kw = {"dim": 1, "profile": profile, "fused": fused, "length": length}
    torch.testing.assert_close(isotropic(rotate(z), **kw), rotate(isotropic(z, **kw)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("groups", ([0, 0, 1, 1, 2, 2], [1, 0, 2, 1, 0, 2, 2]))
@FUSED
def test_grouped_equivariance(profile, groups, fused):
    n = len(groups)
    kw = _index(groups)
    length = torch.linspace(0.1, 0.9, kw["groups"], dtype=DT)
    z = torch.randn(6, n, dtype=DT)
    out = isotropic(z, profile=profile, fused=fused, length=length, **kw)
    torch.testing.assert_close(out, reference(z, profile, length, groups=groups), rtol=RTOL, atol=0)
    block = _block_rotation(groups)
    torch.testing.assert_close(isotropic(z @ block.T, profile=profile, fused=fused, length=length, **kw), out @ block.T,
                               rtol=0, atol=ATOL)
    # A rotation that mixes groups is not a symmetry: the error is O(1), far above ATOL.
    mixing = _orthogonal(n)
    err = (isotropic(z @ mixing.T, profile=profile, fused=fused, length=length, **kw) - out @ mixing.T).abs().max()
    assert err > 1e-2


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@FUSED
def test_grouped_equivariance_images(profile, fused):
    groups = [0, 1, 0, 1, 1]
    kw = _index(groups)
    z = torch.randn(2, 5, 3, 3, dtype=DT)
    block = _block_rotation(groups)
    mixing = _orthogonal(5)

    def rotate(q: Tensor, t: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", q, t)

    kw.update(dim=1, profile=profile, fused=fused)
    out = isotropic(z, **kw)
    torch.testing.assert_close(isotropic(rotate(block, z), **kw), rotate(block, out), rtol=0, atol=ATOL)
    assert (isotropic(rotate(mixing, z), **kw) - rotate(mixing, out)).abs().max() > 1e-2


@pytest.mark.parametrize(("profile", "elementwise"), (("tanh", torch.tanh),
                                                      ("softsign", torch.nn.functional.softsign)))
@FUSED
def test_group_size_one_is_elementwise(profile, elementwise, fused):
    # tanh(|z|)/|z| * z = tanh(z) and z/(1+|z|) = softsign(z): groups of one give the usual network.
    z = torch.cat([torch.randn(4, 6, dtype=DT) * 3, torch.tensor([[0.0, 1e-9, -1e-5, 0.03, -40.0, 1e3]], dtype=DT)])
    out = isotropic(z, profile=profile, fused=fused, group_index=torch.arange(6), groups=6)
    torch.testing.assert_close(out, elementwise(z), rtol=RTOL, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", (None, 0.37))
@FUSED
def test_single_group_equals_ungrouped(profile, o, fused):
    z = torch.randn(4, 5, dtype=DT)
    length = _length(o)
    grouped = isotropic_with_scale(z, profile=profile, fused=fused, length=length,
                                   group_index=torch.zeros(5, dtype=torch.long), groups=1)
    plain = isotropic_with_scale(z, profile=profile, fused=fused, length=length)
    torch.testing.assert_close(grouped[0], plain[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(grouped[1], plain[1], rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- float32 robustness
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("o", (None, 0.37))
@FUSED
def test_float32_zero_finite(profile, o, fused):
    z = torch.zeros(3, 4, requires_grad=True)
    length = None if o is None else torch.tensor([o], requires_grad=True)
    out = isotropic(z, profile=profile, fused=fused, length=length)
    out.pow(2).sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(z.grad).all()
    z.grad = None
    # d(sum f)/dz at z = 0 is s(sqrt(o)) in every entry.
    isotropic(z, profile=profile, fused=fused, length=length).sum().backward()
    s0 = float(REF_SCALE[profile](torch.tensor(0.0 if o is None else math.sqrt(o), dtype=DT)))
    # float32 rounding of s(0): 1e-6 relative.
    torch.testing.assert_close(z.grad, torch.full_like(z, s0), rtol=1e-6, atol=0)
    if length is not None:
        assert torch.isfinite(length.grad).all()


# |z| where |z|**2 overflows (float32: ~1.8e19, float64: ~1.3e154) and, below that, where the fourth
# power used by the tanh series would overflow if it were evaluated on a large q (float32: ~4e9,
# float64: ~1e77).
HUGE = ((torch.float32, 3e9), (torch.float32, 1e20), (torch.float64, 1e80), (torch.float64, 1e200))


def _fused_id(fused: bool) -> str:
    return "fused" if fused else "autograd"


@pytest.mark.parametrize("fused", (True, False), ids=_fused_id)
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(("dtype", "magnitude"), HUGE, ids=[f"{d}-{m:g}".replace("torch.", "") for d, m in HUGE])
def test_huge_input_finite(profile, dtype, magnitude, fused):
    z = torch.full((2, 3), magnitude, dtype=dtype, requires_grad=True)
    o = torch.tensor([0.5], dtype=dtype, requires_grad=True)
    out, s = isotropic_with_scale(z, profile=profile, length=o, fused=fused)
    assert out.dtype == s.dtype == dtype
    (out.sum() + s.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    assert torch.isfinite(z.grad).all()
    assert torch.isfinite(o.grad).all()


def _huge_value_cases() -> List[object]:
    cases: List[object] = []
    for fused in (True, False):
        for profile in PROFILE_NAMES:
            for dtype, magnitude in ((torch.float32, 1e5), (torch.float32, 1e20), (torch.float64, 1e20),
                                     (torch.float64, 1e200)):
                name = f"{_fused_id(fused)}-{profile}-{dtype}-{magnitude:g}".replace("torch.", "")
                cases.append(pytest.param(fused, profile, dtype, magnitude, id=name))
    return cases


@pytest.mark.parametrize(("fused", "profile", "dtype", "magnitude"), _huge_value_cases())
def test_huge_input_value(profile, dtype, magnitude, fused):
    # Saturating profiles (tanh, softsign) map a huge z to ~z/|z| (norm tanh(r) ~ 1, or r/(1+r) ~ 1);
    # the GELU/swish analogues map it to z itself. rtol 1e-4 covers softsign's 1/r deficit at 1e5
    # (|f| = 1 - 5.8e-6) and float32 rounding.
    z = torch.full((2, 3), magnitude, dtype=dtype)
    out = isotropic(z, profile=profile, fused=fused)
    assert out.dtype == dtype
    if profile in ("tanh", "softsign"):
        torch.testing.assert_close(out.norm(dim=-1).double(), torch.ones(2, dtype=DT), rtol=1e-4, atol=0)
    else:
        torch.testing.assert_close(out, z, rtol=1e-6, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@FUSED
def test_float32_matches_float64_reference(profile, fused):
    # float32 against the float64 reference: relative error a few float32 ulp (1.2e-7); 1e-5 is loose.
    z = torch.cat([torch.randn(6, 5) * 2, 1e-3 * torch.randn(2, 5), torch.zeros(1, 5)])
    out = isotropic(z, profile=profile, fused=fused, length=torch.tensor([0.1]))
    torch.testing.assert_close(out.double(), reference(z, profile, torch.tensor([0.1], dtype=DT)),
                               rtol=1e-5, atol=1e-7)


@FUSED
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_float32_across_series_switches(profile, fused):
    # The fused kernel switches series at q = 1e-2 in float32, the autograd path at 1e-3. Either way the
    # float32 result must be a few ulp (rtol 1e-6 ~ 8 ulp) from the float64 reference on both sides.
    q = torch.tensor([1e-3 * 0.999, 1e-3 * 1.001, 1e-2 * 0.999, 1e-2 * 1.001, 5e-3])
    z = q.sqrt().unsqueeze(1) * _random_direction(len(q), 4).float()
    out = isotropic(z, profile=profile, fused=fused)
    torch.testing.assert_close(out.double(), reference(z, profile), rtol=1e-6, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("point", ("random", "zero"))
def test_gradcheck_through_scale_output(profile, point):
    # Networks feed s to the next layer's correction psi, so the backward must handle a gradient
    # arriving through s (alone and together with one through f). Groups and per-group o included.
    z = torch.randn(3, 5, dtype=DT) if point == "random" else torch.zeros(3, 5, dtype=DT)
    z.requires_grad_(True)
    o = torch.tensor([0.2, 0.7], dtype=DT, requires_grad=True)
    kw = _index([0, 1, 1, 0, 1])

    def both(z: Tensor, o: Tensor):  # type: ignore[no-untyped-def]
        return isotropic_with_scale(z, profile=profile, length=o, **kw)

    def scale_only(z: Tensor, o: Tensor) -> Tensor:
        return isotropic_with_scale(z, profile=profile, length=o, **kw)[1]

    assert torch.autograd.gradcheck(both, (z, o))
    assert torch.autograd.gradcheck(scale_only, (z, o))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_fused_matches_autograd_path(profile):
    # Two implementations of the same function: values and every gradient (z, o, via f and via s) agree
    # to rounding (1e-13 relative covers the tanh series difference: 2.2e-14 for the autograd path).
    z = torch.cat([torch.randn(5, 6, dtype=DT), 1e-3 * torch.randn(2, 6, dtype=DT), torch.zeros(1, 6, dtype=DT)])
    kw = _index([0, 0, 1, 1, 2, 2])
    w_h, w_s = torch.randn(8, 6, dtype=DT), torch.randn(8, 3, dtype=DT)
    results = []
    for fused in (True, False):
        zz = z.clone().requires_grad_(True)
        o = torch.tensor([0.0, 0.3, 2.0], dtype=DT, requires_grad=True)
        h, s = isotropic_with_scale(zz, profile=profile, length=o, fused=fused, **kw)
        ((h * w_h).sum() + (s * w_s).sum()).backward()
        results.append((h.detach(), s.detach(), zz.grad, o.grad))
    for fused_t, plain_t in zip(*results):
        torch.testing.assert_close(fused_t, plain_t, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_autograd_path_supports_double_backward(profile):
    # fused=False is documented to support second derivatives (e.g. gradient penalties).
    z = torch.randn(2, 4, dtype=DT, requires_grad=True)
    o = torch.tensor([0.4], dtype=DT, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z, o: isotropic(z, profile=profile, length=o, fused=False), (z, o))


def test_scaled_squared_norm_matches_formula_and_supports_double_backward():
    a = torch.randn(5, 1, dtype=DT, requires_grad=True)
    b = torch.randn(2, 3, dtype=DT, requires_grad=True)
    value = scaled_squared_norm([a, b], 0.37)
    expected = 0.37 * (float((a.detach() ** 2).sum()) + float((b.detach() ** 2).sum()))
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-14)
    assert torch.autograd.gradcheck(lambda a, b: scaled_squared_norm([a, b], 0.37), (a, b))
    # A gradient penalty of the penalty: d/da ||2 s a||^2 = 8 s^2 a.
    (grad_a,) = torch.autograd.grad(scaled_squared_norm([a, b], 0.37), a, create_graph=True)
    (second,) = torch.autograd.grad(grad_a.pow(2).sum(), a)
    torch.testing.assert_close(second, 8 * 0.37**2 * a.detach(), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="`tensors`"):
        scaled_squared_norm([])
