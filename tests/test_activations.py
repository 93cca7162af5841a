"""Tests of :class:`iso_lightning.IsotropicActivation` and of the forward pass of the isotropic networks.

The networks are checked against a straightforward float64 re-implementation of

    z_1 = W_1 x + b_1,   z_l = W_l h_{l-1} + b_l + psi_{l-1} s_{l-1},   h_l = s_l z_l,

written with explicit group loops and, for images, a convolution spelled out tap by tap. The random
weights, biases, corrections and lengths are generated here and copied into the network, so the
reference never reads the library's arithmetic, only the documented parameter layout.

Tolerances: float64 forward passes of a few layers with O(1) activations accumulate O(depth * width *
eps) ~ 1e-14 of rounding; ``atol = 1e-12`` leaves two orders of margin and is still ten orders below
the O(1) effect of any structural mistake (a missing psi, a wrong group, a transposed flatten).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning import IsotropicActivation, IsotropicConvNet, IsotropicMLP, isotropic
from iso_lightning.activations import LENGTH_MODES
from iso_lightning.functional import PROFILES
from iso_lightning.layers import PSI_MODES

DT = torch.float64
ATOL = 1e-12  # float64 rounding of a few O(1) layers; see module docstring
PROFILE_NAMES = sorted(PROFILES)

# ----------------------------------------------------------------------------- independent reference
REF_SCALE: Dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": lambda r: torch.where(r > 0, torch.tanh(r) / torch.where(r > 0, r, torch.ones_like(r)),
                                  torch.ones_like(r)),
    "softsign": lambda r: 1.0 / (1.0 + r),
    "gelu": lambda r: 0.5 * torch.erfc(-r / math.sqrt(2.0)),
    "swish": lambda r: 1.0 / (1.0 + torch.exp(-r)),
}


def ref_activation(z: Tensor, profile: str, o: Optional[Sequence[float]], groups: Sequence[int],
                   dim: int) -> Tuple[Tensor, Tensor]:
    """``(h, s)`` with ``s`` per group on the channel axis; ``groups[c]`` is the group of channel c."""
    z = z.movedim(dim, -1)
    m = max(groups) + 1
    h = torch.empty_like(z)
    s = torch.empty(*z.shape[:-1], m, dtype=z.dtype)
    for g in range(m):
        mask = torch.tensor([c == g for c in groups])
        zg = z[..., mask]
        r = torch.sqrt((zg * zg).sum(-1) + (0.0 if o is None else float(o[g])))
        s[..., g] = REF_SCALE[profile](r)
        h[..., mask] = s[..., g : g + 1] * zg
    return h.movedim(-1, dim), s.movedim(-1, dim)


def ref_conv(x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    """Cross-correlation written tap by tap (what ``F.conv2d`` computes)."""
    k = w.shape[-1]
    xp = F.pad(x, (padding,) * 4)
    ho = (x.shape[2] + 2 * padding - k) // stride + 1
    wo = (x.shape[3] + 2 * padding - k) // stride + 1
    out = x.new_zeros(x.shape[0], w.shape[0], ho, wo)
    for u in range(k):
        for v in range(k):
            patch = xp[:, :, u : u + stride * (ho - 1) + 1 : stride, v : v + stride * (wo - 1) + 1 : stride]
            out = out + torch.einsum("oc,bchw->bohw", w[:, :, u, v], patch)
    return out


def _groups(width: int, group_size: Optional[int]) -> List[int]:
    return [0] * width if group_size is None else [c // group_size for c in range(width)]


def _orthogonal(n: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def _block_rotation(groups: Sequence[int]) -> Tensor:
    n = len(groups)
    q = torch.zeros(n, n, dtype=DT)
    for g in set(groups):
        idx = torch.tensor([c for c in range(n) if groups[c] == g])
        q[idx.unsqueeze(1), idx.unsqueeze(0)] = _orthogonal(len(idx))
    return q


# ----------------------------------------------------------------------------- length modes
def test_length_none_has_no_state():
    act = IsotropicActivation(profile="tanh", length="none")
    assert act.length is None
    assert act.effective_length() is None
    assert list(act.parameters()) == []
    assert "length" not in act.state_dict()
    z = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(act(z), ref_activation(z, "tanh", None, [0, 0, 0], -1)[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize(("init", "expected"), ((None, 1.0), (0.25, 0.25), (0.0, 0.0)))
def test_length_constant_is_a_buffer(init, expected):
    act = IsotropicActivation(6, length="constant", length_init=init, group_size=3).double()
    assert isinstance(act.length, Tensor) and not isinstance(act.length, nn.Parameter)
    assert not act.length.requires_grad
    assert list(act.parameters()) == []
    assert "length" in dict(act.named_buffers())
    assert "length" in act.state_dict()
    assert act.length.shape == (2,)  # one o per group
    assert torch.equal(act.length, torch.full((2,), expected, dtype=DT))
    z = torch.randn(5, 6, dtype=DT)
    torch.testing.assert_close(act(z), ref_activation(z, "tanh", [expected] * 2, _groups(6, 3), -1)[0],
                               rtol=0, atol=ATOL)


def test_length_trainable_is_a_parameter():
    act = IsotropicActivation(5, length="trainable", partition=[0, 1, 0, 2, 1])
    assert isinstance(act.length, nn.Parameter)
    assert [p is act.length for p in act.parameters()] == [True]
    assert act.length.shape == (3,)
    # Documented default: 1e-6, small but off the non-differentiable point 0 of |o|.
    assert torch.equal(act.length.detach(), torch.full((3,), 1e-6))


def test_trainable_effective_length_is_abs_clamped():
    act = IsotropicActivation(6, length="trainable", max_length=2.0, group_size=2).double()
    with torch.no_grad():
        act.length.copy_(torch.tensor([-0.5, 0.7, 250.0], dtype=DT))
    torch.testing.assert_close(act.effective_length(), torch.tensor([0.5, 0.7, 2.0], dtype=DT), rtol=0, atol=0)
    z = torch.randn(4, 6, dtype=DT)
    expected = ref_activation(z, "tanh", [0.5, 0.7, 2.0], _groups(6, 2), -1)[0]
    torch.testing.assert_close(act(z), expected, rtol=0, atol=ATOL)
    # Gradient: flows to the in-range entries (with the sign of o for the negative one), and not to the
    # clamped entry, whose effective value does not depend on it.
    act(z).pow(2).sum().backward()
    grad = act.length.grad
    assert grad is not None
    assert grad[0] != 0 and grad[1] != 0
    assert grad[2] == 0
    assert torch.sign(grad[0]) == -torch.sign(grad[1])  # d|o|/do = -1 at o = -0.5, tanh: d|f|^2/do < 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_trainable_length_gradient_matches_finite_difference(profile):
    # d loss / d o from autograd equals a central difference; o = 0.3 and eps = 1e-6 give a
    # truncation error ~ eps^2 |f'''| ~ 1e-12 and rounding ~ 1e-16 / 1e-6 = 1e-10, so rtol 1e-7.
    act = IsotropicActivation(6, profile=profile, length="trainable", length_init=0.3, group_size=3).double()
    z = torch.randn(4, 6, dtype=DT)
    w = torch.randn(4, 6, dtype=DT)
    (act(z) * w).sum().backward()
    grad = act.length.grad.clone()
    eps = 1e-6
    numeric = torch.empty(2, dtype=DT)
    for g in range(2):
        vals = []
        for sign in (1.0, -1.0):
            o = [0.3, 0.3]
            o[g] += sign * eps
            vals.append((ref_activation(z, profile, o, _groups(6, 3), -1)[0] * w).sum())
        numeric[g] = (vals[0] - vals[1]) / (2 * eps)
    assert (grad.abs() > 1e-3).all()  # it really flows
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=0)


def test_trainable_length_stays_non_negative_under_training():
    # Maximising |f(z)|^2 with tanh pushes o down; a large learning rate drives the raw parameter
    # negative. The effective o must stay in [0, max_length] and the output must stay the reference.
    act = IsotropicActivation(4, length="trainable", length_init=0.5, max_length=3.0).double()
    opt = torch.optim.SGD(act.parameters(), lr=5.0)
    z = torch.randn(8, 4, dtype=DT) * 0.3
    went_negative = False
    for _ in range(10):
        opt.zero_grad()
        (-act(z).pow(2).sum()).backward()
        opt.step()
        went_negative |= bool((act.length < 0).any())
        o_eff = act.effective_length()
        assert (o_eff >= 0).all() and (o_eff <= 3.0).all()
        torch.testing.assert_close(act(z), ref_activation(z, "tanh", o_eff.tolist(), [0] * 4, -1)[0],
                                   rtol=0, atol=ATOL)
    assert went_negative  # the test really exercised the |o| branch


@pytest.mark.parametrize(("init", "sign"), [
    (0.0, 1.0),
    (2.0, -1.0),
    (1.0, 1.0),
])
def test_trainable_length_at_init_bounds_receives_gradient(init, sign):
    # sign=+1: loss |f|^2, minimised by a larger o; sign=-1: loss -|f|^2, minimised by a smaller o.
    # Either way the optimum is inside [0, max_length] and a gradient step must move o towards it.
    act = IsotropicActivation(3, length="trainable", length_init=init, max_length=2.0).double()
    z = torch.randn(4, 3, dtype=DT)
    (sign * act(z).pow(2).sum()).backward()
    assert act.length.grad is not None
    assert float(act.length.grad.abs().min()) > 1e-6


@pytest.mark.parametrize("length", LENGTH_MODES)
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_module_float32_zero_finite(profile, length):
    act = IsotropicActivation(4, profile=profile, length=length, group_size=2)
    z = torch.zeros(3, 4, requires_grad=True)
    out = act(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 4))
    assert torch.isfinite(z.grad).all()
    o = act.effective_length()
    r0 = torch.zeros(()) if o is None else o[0].detach().double().sqrt()
    # float32 s(0) vs float64 reference: rtol 1e-6 (a few float32 ulp).
    torch.testing.assert_close(z.grad.double(), torch.full((3, 4), float(REF_SCALE[profile](r0)), dtype=DT),
                               rtol=1e-6, atol=0)
    if length == "trainable":
        assert torch.isfinite(act.length.grad).all()


# ----------------------------------------------------------------------------- groups in the module
@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(("kwargs", "groups"), (
    ({"group_size": 2}, [0, 0, 1, 1, 2, 2, 3]),
    ({"group_size": 3}, [0, 0, 0, 1, 1, 1, 2]),
    ({"partition": [2, 0, 1, 0, 2, 1, 1]}, [2, 0, 1, 0, 2, 1, 1]),
))
def test_grouped_module_matches_reference_and_symmetry(profile, kwargs, groups):
    act = IsotropicActivation(7, profile=profile, length="trainable", **kwargs).double()
    m = max(groups) + 1
    assert act.groups == m
    with torch.no_grad():
        act.length.copy_(torch.linspace(0.1, 1.3, m))
    o = act.effective_length().tolist()
    z = torch.randn(6, 7, dtype=DT)
    h, s = act.forward_with_scale(z)
    ref_h, ref_s = ref_activation(z, profile, o, groups, -1)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=ATOL)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=ATOL)
    block = _block_rotation(groups)
    torch.testing.assert_close(act(z @ block.T), h @ block.T, rtol=0, atol=ATOL)
    mixing = _orthogonal(7)
    assert (act(z @ mixing.T) - h @ mixing.T).abs().max() > 1e-2  # O(1) failure, far above ATOL


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_grouped_module_images(profile):
    groups = [1, 0, 1, 0, 0]
    act = IsotropicActivation(5, profile=profile, length="constant", length_init=0.4, dim=1, partition=groups).double()
    z = torch.randn(2, 5, 3, 4, dtype=DT)
    h, s = act.forward_with_scale(z)
    assert s.shape == (2, 2, 3, 4)
    # o is stored in float32 (0.4 is not exact there); the reference takes the stored value.
    ref_h, ref_s = ref_activation(z, profile, act.effective_length().tolist(), groups, 1)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=ATOL)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=ATOL)
    block, mixing = _block_rotation(groups), _orthogonal(5)

    def rotate(q: Tensor, t: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", q, t)

    torch.testing.assert_close(act(rotate(block, z)), rotate(block, h), rtol=0, atol=ATOL)
    assert (act(rotate(mixing, z)) - rotate(mixing, h)).abs().max() > 1e-2


def test_group_size_one_tanh_is_elementwise_tanh():
    act = IsotropicActivation(6, profile="tanh", length="none", group_size=1).double()
    z = torch.cat([3 * torch.randn(5, 6, dtype=DT), torch.tensor([[0.0, 1e-9, -1e-4, 0.03, -0.032, 25.0]], dtype=DT)])
    # rtol 1e-13: the tanh series near q = 1e-3 is accurate to 2.2e-14 (see test_functional.py).
    torch.testing.assert_close(act(z), torch.tanh(z), rtol=1e-13, atol=0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("length", LENGTH_MODES)
def test_single_group_equals_ungrouped(profile, length):
    grouped = IsotropicActivation(5, profile=profile, length=length, partition=[0] * 5).double()
    plain = IsotropicActivation(profile=profile, length=length).double()
    assert grouped.groups == plain.groups == 1
    z = torch.randn(4, 5, dtype=DT)
    torch.testing.assert_close(grouped(z), plain(z), rtol=1e-15, atol=0)
    torch.testing.assert_close(grouped(z), isotropic(z, profile=profile, length=plain.effective_length()),
                               rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- misconfiguration
@pytest.mark.parametrize(("kwargs", "match"), (
    ({"profile": "relu"}, "`profile`"),
    ({"length": "learned"}, "`length`"),
    ({"length": "trainable", "max_length": 0}, "`max_length`"),
    ({"length": "trainable", "max_length": -1.0}, "`max_length`"),
    ({"length": "trainable", "max_length": float("nan")}, "`max_length`"),
    ({"length": "constant", "max_length": "10"}, "`max_length`"),
    ({"length": "constant", "length_init": -0.1}, "`length_init`"),
    ({"length": "trainable", "length_init": -1e-9}, "`length_init`"),
    ({"length": "trainable", "length_init": float("nan")}, "`length_init`"),
    ({"length": "trainable", "length_init": 101.0}, "`length_init`"),
    ({"length": "constant", "length_init": 2.0, "max_length": 1.0}, "`length_init`"),
    ({"width": 4, "group_size": 0}, "`group_size`"),
    ({"width": 4, "group_size": -2}, "`group_size`"),
    ({"width": 4, "group_size": 1.5}, "`group_size`"),
    ({"width": 4, "partition": [0, 0, 1]}, "`partition`"),
    ({"width": 4, "partition": [0, 0, 2, 2]}, "`partition`"),
    ({"width": 4, "partition": [-1, 0, 0, 1]}, "`partition`"),
    ({"width": 4, "partition": [1, 1, 1, 1]}, "`partition`"),
    ({"width": 4, "group_size": 2, "partition": [0, 0, 1, 1]}, "`group_size`.*`partition`"),
    ({"group_size": 2}, "`width`"),
    ({"partition": [0, 1]}, "`width`"),
))
def test_misconfiguration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IsotropicActivation(**kwargs)


# ----------------------------------------------------------------------------- networks
def _random_state(shapes: List[Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]], psi: str
                  ) -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    out = []
    for w_shape, psi_shape in shapes:
        w = torch.randn(*w_shape, dtype=DT) / math.sqrt(math.prod(w_shape[1:]))
        b = 0.3 * torch.randn(w_shape[0], dtype=DT)
        c = None if psi_shape is None or psi == "none" else 0.5 * torch.randn(*psi_shape, dtype=DT)
        out.append((w, b, c))
    return out


def _random_lengths(widths: List[int], group_size: Optional[int], length: str) -> List[Optional[List[float]]]:
    # Raw values copied into the module; trainable ones include a negative entry (|o| is used).
    out: List[Optional[List[float]]] = []
    for width in widths:
        m = max(_groups(width, group_size)) + 1
        if length == "none":
            out.append(None)
        else:
            raw = (0.1 + torch.rand(m, dtype=DT)).tolist()
            if length == "trainable":
                raw[0] = -raw[0]
            out.append(raw)
    return out


def _load(net, state, lengths) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        for layer, (w, b, c) in zip(net.layers, state):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            if c is None:
                assert layer.correction is None
            else:
                layer.correction.copy_(c)
        for act, raw in zip(net.activations, lengths):
            if raw is None:
                assert act.length is None
            else:
                act.length.copy_(torch.tensor(raw, dtype=DT))


def _effective(raw: Optional[List[float]], length: str, max_length: float) -> Optional[List[float]]:
    if raw is None:
        return None
    return [min(abs(v), max_length) for v in raw] if length == "trainable" else raw


NET_CASES = [(profile, length, psi) for profile in PROFILE_NAMES for length in LENGTH_MODES for psi in PSI_MODES]


@pytest.mark.parametrize("group_size", (None, 2))
@pytest.mark.parametrize(("profile", "length", "psi"), NET_CASES)
def test_mlp_forward_matches_reference(profile, length, psi, group_size):
    sizes = [5, 6, 5, 3]
    net = IsotropicMLP(sizes, activation=profile, length=length, psi=psi, group_size=group_size).double()
    groups = [_groups(w, group_size) for w in sizes[1:-1]]
    m = [max(g) + 1 for g in groups]
    # psi_{l-1} has W_l's shape with its input axis replaced by the previous space's groups.
    shapes = [((6, 5), None), ((5, 6), (5, m[0])), ((3, 5), (3, m[1]))]
    state = _random_state(shapes, psi)
    lengths = _random_lengths(sizes[1:-1], group_size, length)
    _load(net, state, lengths)
    x = torch.randn(4, 5, dtype=DT)

    def reference(with_psi: bool) -> Tensor:
        h, s = x, None
        for index, (w, b, c) in enumerate(state):
            z = h @ w.T + b
            if c is not None and with_psi:
                z = z + s @ c.T
            if index == len(state) - 1:
                return z
            o = _effective(lengths[index], length, net.activations[index].max_length)
            h, s = ref_activation(z, profile, o, groups[index], -1)
        raise AssertionError

    expected = reference(True)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=ATOL)
    if psi != "none":  # the corrections matter at O(1): the comparison above is not vacuous
        assert (expected - reference(False)).abs().max() > 1e-2


CONV_CASES = [(profile, length, psi) for profile in PROFILE_NAMES for length in LENGTH_MODES
              for psi in ("none", "trainable")] + [("tanh", "trainable", psi) for psi in ("constant", "decay")]


@pytest.mark.parametrize("group_size", (None, 2))
@pytest.mark.parametrize(("profile", "length", "psi"), CONV_CASES)
def test_convnet_forward_matches_reference(profile, length, psi, group_size):
    # Three convolutions (3x3/1/1, 3x3/2/1, 2x2/1/0) on a non-square 7x6 image, a dense hidden layer
    # and the output layer. psi after a convolution is a convolution of the scale map with the next
    # convolution's geometry (padded and strided here); at the conv->dense boundary it is a matrix on
    # the flattened (groups, H, W) scale map, flattened like the activations (channel-major).
    net = IsotropicConvNet(2, [4, 5, 3], image_size=(7, 6), num_outputs=3, hidden=[5], kernel_size=[3, 3, 2],
                           stride=[1, 2, 1], padding=[1, 1, 0], activation=profile, length=length, psi=psi,
                           group_size=group_size).double()
    widths = [4, 5, 3, 5]
    groups = [_groups(w, group_size) for w in widths]
    m = [max(g) + 1 for g in groups]
    spatial = 3 * 2  # 7x6 -> 7x6 -> 4x3 -> 3x2
    shapes = [((4, 2, 3, 3), None), ((5, 4, 3, 3), (5, m[0], 3, 3)), ((3, 5, 2, 2), (3, m[1], 2, 2)),
              ((5, 3 * spatial), (5, m[2] * spatial)), ((3, 5), (3, m[3]))]
    state = _random_state(shapes, psi)
    lengths = _random_lengths(widths, group_size, length)
    _load(net, state, lengths)
    geometry = [(1, 1), (2, 1), (1, 0)]
    x = torch.randn(2, 2, 7, 6, dtype=DT)

    def reference(with_psi: bool) -> Tensor:
        h, s = x, None
        for index, (w, b, c) in enumerate(state):
            use_psi = c is not None and with_psi
            if w.dim() == 4:
                stride, padding = geometry[index]
                z = ref_conv(h, w, stride, padding) + b[:, None, None]
                if use_psi:
                    z = z + ref_conv(s, c, stride, padding)
            else:
                z = h.reshape(h.shape[0], -1) @ w.T + b
                if use_psi:
                    z = z + s.reshape(s.shape[0], -1) @ c.T
            if index == len(state) - 1:
                return z
            o = _effective(lengths[index], length, net.activations[index].max_length)
            h, s = ref_activation(z, profile, o, groups[index], 1 if z.dim() == 4 else -1)
        raise AssertionError

    expected = reference(True)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=ATOL)
    if psi != "none":
        assert (expected - reference(False)).abs().max() > 1e-2


@pytest.mark.parametrize("psi", PSI_MODES)
@pytest.mark.parametrize("net_kind", ("mlp", "conv"))
def test_regularisation(psi, net_kind):
    if net_kind == "mlp":
        net = IsotropicMLP([4, 6, 5, 2], psi=psi, psi_decay=0.37, group_size=2).double()
    else:
        net = IsotropicConvNet(1, [3, 4], image_size=5, num_outputs=2, hidden=[3], psi=psi, psi_decay=0.37).double()
    corrections = [layer.correction for layer in net.layers if layer.correction is not None]
    assert (len(corrections) == 0) == (psi == "none")
    assert len(corrections) in (0, len(net.layers) - 1)  # every layer but the first has psi
    with torch.no_grad():
        for c in corrections:
            c.copy_(torch.randn_like(c))
    reg = net.regularisation()
    if psi == "decay":
        expected = 0.37 * sum(float((c.detach() ** 2).sum()) for c in corrections)
        assert expected > 0
        # one summation of a few hundred squares: rtol 1e-13
        assert math.isclose(float(reg.detach()), expected, rel_tol=1e-13)
        reg.backward()
        for c in corrections:
            torch.testing.assert_close(c.grad, 2 * 0.37 * c.detach(), rtol=1e-15, atol=0)
    else:
        assert float(reg) == 0.0


def test_psi_modes_register_the_right_kind_of_tensor():
    for psi, kind in (("constant", "buffer"), ("trainable", "parameter"), ("decay", "parameter")):
        net = IsotropicMLP([3, 4, 2], psi=psi)
        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        assert ("layers.1.correction" in params) == (kind == "parameter")
        assert ("layers.1.correction" in buffers) == (kind == "buffer")
        assert net.layers[0].correction is None
        # psi starts at zero
        assert torch.equal(net.layers[1].correction, torch.zeros(2, 1))
