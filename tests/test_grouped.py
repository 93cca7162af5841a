"""Grouped isotropy (DESIGN.md sections 1 and 3): every neuron operation, group by group.

A hidden space is partitioned into groups ``G_1 .. G_m``, each with its own norm, intrinsic length
``o_G`` and psi column. The surgery must respect the partition: singular values and left bases are
taken per group (the next layer's columns of the group absorb the rotation), growth goes into a
chosen group or makes a new one, a shrink removes the globally weakest directions without emptying a
group, ``remove_group`` drops a whole group and folds its constant contribution into the next bias,
and full diagonalisation exists only for single-group spaces.

The property tests draw RANDOM PARTITIONS: group labels in any order (non-contiguous), groups of
different sizes including size 1, occasionally an ungrouped (``None``) or single-group space.
Results are compared with an independent numpy reference (per-group SVDs, a forward pass written with
explicit group loops, the folds written out by hand).

Tolerances are those of tests/test_surgery_properties.py (DESIGN.md section 3): float64
``max |Δ output| <= 1e-10``, float32 ``<= 1e-5`` relative to ``max |output|``; each other tolerance is
justified where it is used.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from test_optim import (
    Maps,
    assert_orthonormal_columns,
    check_state,
    check_structure,
    check_training_continues,
    extension,
    full_diag_maps,
    loss_of,
    make_opt,
    maps_for_space,
    recover,
    selection,
    snapshot,
    space_tensors,
    stack,
    train,
)
from test_surgery_properties import (
    CONV_ARCHS,
    DTYPES,
    FAST,
    LENGTHS,
    MAX_CONDITION_FOR_BOUND,
    MAX_CONDITION_FOR_EXACT_FLAG,
    PSIS,
    _assert_preserved,
    _assume_output_scale,
    _inputs,
    _nonzero_condition,
    _orthogonal,
    _out,
    _perturb,
    _zero_level,
)
from torch import nn

import iso_lightning as il
from iso_lightning import DenseRotation
from iso_lightning.operations import transform_space

# Singular values computed in float64 (numpy here, torch in the library) agree to ~eps * sigma_max *
# sqrt(width) ~ 1e-14 sigma_max for these sizes (<= 32 rows, <= 44 columns); 1e-10 * sigma_max is far
# above that and far below any difference a wrong grouping (values of another group) would make.
SIGMA_TOL = 1e-10
# Two (float64) forward passes of the same weights that only differ in summation order (group
# index_add versus a dot product, numpy versus torch) agree to ~1e-15 relative; outputs are O(1-10).
SAME_FUNCTION_TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: intra-op threads only add overhead on the 2 CPUs of CI.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- partitions
@st.composite
def partitions(draw, width: int, allow_ungrouped: bool = True) -> Optional[List[int]]:
    """A random surjective labelling of ``width`` neurons onto ``m`` groups, labels in any order.

    The first ``m`` neurons of a random order get distinct labels (so every group is used), the rest
    random ones; finally the labels are permuted, so group numbers are not in order of appearance.
    """
    if allow_ungrouped and draw(st.integers(0, 9)) == 0:
        return None  # an ungrouped space (group_index None): the single-group code path
    m = draw(st.integers(1, width))
    order = draw(st.permutations(range(width)))
    labels = [0] * width
    for k, position in enumerate(order):
        labels[position] = k if k < m else draw(st.integers(0, m - 1))
    relabel = draw(st.permutations(range(m)))
    return [relabel[v] for v in labels]


@st.composite
def grouped_cases(draw, min_depth: int = 1, max_depth: int = 4, min_width: int = 1, max_width: int = 32,
                  dtypes=DTYPES, lengths=LENGTHS, psis=PSIS, allow_ungrouped: bool = True):
    depth = draw(st.integers(min_depth, max_depth))
    widths = draw(st.lists(st.integers(min_width, max_width), min_size=depth, max_size=depth))
    sizes = [draw(st.integers(1, 12))] + widths + [draw(st.integers(1, 6))]
    if draw(st.integers(0, 4)) == 0:
        grouping = dict(group_size=draw(st.integers(1, 8)), partitions=None)
    else:
        grouping = dict(group_size=None,
                        partitions=[draw(partitions(w, allow_ungrouped)) for w in widths])
    return dict(sizes=sizes, length=draw(st.sampled_from(lengths)), psi=draw(st.sampled_from(psis)),
                dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31 - 1)), **grouping)


def _grouped_mlp(case) -> il.IsotropicMLP:
    g = torch.Generator().manual_seed(case["seed"])
    net = il.IsotropicMLP(case["sizes"], length=case["length"], psi=case["psi"], generator=g,
                          group_size=case["group_size"], partitions=case["partitions"]).to(torch.float64)
    _perturb(net, g)
    return net.to(case["dtype"])


def _build(case) -> Tuple[il.IsotropicMLP, torch.Tensor]:
    net = _grouped_mlp(case)
    return net, _inputs((17, case["sizes"][0]), case["dtype"], case["seed"])


def _index(net: il.IsotropicNetwork, layer: int) -> torch.Tensor:
    return net.space(layer).group_index().clone()


def _group_sizes(net: il.IsotropicNetwork, layer: int) -> List[int]:
    return torch.bincount(_index(net, layer), minlength=net.space(layer).groups()).tolist()


def _block_rotation(index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix that only mixes neurons of the same group (Haar within each group)."""
    n = index.numel()
    m = torch.zeros(n, n, dtype=torch.float64)
    for group in torch.unique(index).tolist():
        rows = torch.nonzero(index == group).flatten()
        m[rows.unsqueeze(1), rows.unsqueeze(0)] = _orthogonal(rows.numel(), g)
    return m


def _rotate_within_groups(net: il.IsotropicNetwork, layer: int, g: torch.Generator) -> None:
    space = net.space(layer)
    transform_space(space, DenseRotation(_block_rotation(space.group_index(), g)))


# ---------------------------------------------------------------------------- numpy references
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def _effective_length(act: il.IsotropicActivation) -> np.ndarray:
    if act.length is None:
        return np.zeros(act.groups)
    raw = _np(act.length)
    if act.length_mode == "trainable":
        return np.minimum(np.abs(raw), act.max_length)  # the forward pass uses min(|o|, max_length)
    return raw


def _labels(act: il.IsotropicActivation, width: int) -> np.ndarray:
    return np.zeros(width, dtype=np.int64) if act.group_index is None else act.group_index.numpy()


def _tanh_scale(q: np.ndarray) -> np.ndarray:
    r = np.sqrt(q)
    return np.where(r > 0, np.tanh(r) / np.where(r > 0, r, 1.0), 1.0)


def reference_forward(net: il.IsotropicMLP, x: torch.Tensor) -> np.ndarray:
    """The grouped MLP written out with explicit group loops, in numpy float64 (tanh profile)."""
    h, s = _np(x), None
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        z = h @ _np(layer.weight).T + _np(layer.bias)
        if layer.correction is not None and s is not None:
            z = z + s @ _np(layer.correction).T
        if i == last:
            return z
        act = net.activations[i]
        labels, o = _labels(act, z.shape[1]), _effective_length(act)
        m = int(labels.max()) + 1
        assert o.shape == (m,) or act.length is None
        h, s = np.empty_like(z), np.empty((z.shape[0], m))
        for group in range(m):
            cols = labels == group
            sg = _tanh_scale((z[:, cols] ** 2).sum(axis=1) + o[group])
            s[:, group] = sg
            h[:, cols] = sg[:, None] * z[:, cols]
    raise AssertionError("unreachable")


def _incoming(net: il.IsotropicMLP, layer: int) -> np.ndarray:
    """``[W_l | psi_{l-1}]`` read straight from the layer."""
    this = net.layers[layer]
    parts = [_np(this.weight)]
    if this.correction is not None:
        parts.append(_np(this.correction))
    return np.hstack(parts)


def _group_spectra(a: np.ndarray, labels: np.ndarray) -> List[np.ndarray]:
    """Per group: the singular values of its rows, descending, zero-padded to the group size."""
    out = []
    for group in range(int(labels.max()) + 1):
        rows = a[labels == group]
        s = np.linalg.svd(rows, compute_uv=False) if rows.size else np.zeros(0)
        out.append(np.concatenate([s, np.zeros(rows.shape[0] - s.size)]))
    return out


def _assert_reference(net: il.IsotropicMLP, x: torch.Tensor) -> None:
    """The library's forward pass equals the explicit group loop (float64 only)."""
    if x.dtype != torch.float64:
        return
    ref = reference_forward(net, x)
    err = float(np.abs(_np(_out(net, x)) - ref).max())
    assert err <= SAME_FUNCTION_TOL * max(1.0, float(np.abs(ref).max())), f"library vs group loop: {err:.3e}"


def _plant_constant_neuron(net: il.IsotropicNetwork, layer: int, index: int, bias: float,
                           g: torch.Generator) -> None:
    """Zero neuron ``index``'s incoming row (weight and psi), give it bias ``bias``, then rotate every
    group within itself so that the zero direction is hidden inside its group."""
    this = net.layers[layer]
    with torch.no_grad():
        this.weight[index].zero_()
        if this.correction is not None:
            this.correction[index].zero_()
        this.bias[index] = bias
    _rotate_within_groups(net, layer, g)
    space = net.space(layer)
    rows = space.incoming_matrix().to(torch.float64).flatten(1).norm(dim=1)
    group = space.group_index() == space.group_index()[index]
    # Precondition: no row of the planted neuron's group is zero any more (the group has >= 2 members).
    assert float(rows[group].min()) > 1e-6 * float(rows.max())


def _draw_layer_and_group(data, net: il.IsotropicNetwork, min_size: int, min_groups: int = 1) -> Tuple[int, int]:
    """A hidden layer with >= ``min_groups`` groups, and one of its groups with >= ``min_size`` neurons."""
    layers = [i for i in range(net.num_hidden)
              if net.space(i).groups() >= min_groups and max(_group_sizes(net, i)) >= min_size]
    assume(layers)
    layer = data.draw(st.sampled_from(layers), label="layer")
    groups = [k for k, size in enumerate(_group_sizes(net, layer)) if size >= min_size]
    return layer, data.draw(st.sampled_from(groups), label="group")


# ---------------------------------------------------------------------------- construction
@settings(max_examples=60, **FAST)
@given(case=grouped_cases(dtypes=(torch.float64,)))
def test_grouped_forward_matches_group_loop_reference(case):
    net, x = _build(case)
    for i in range(net.num_hidden):
        act = net.activation(i)
        expected = case["partitions"][i] if case["partitions"] is not None else None
        if case["group_size"] is not None:
            expected = [k // case["group_size"] for k in range(case["sizes"][i + 1])]
        if expected is None:
            assert act.group_index is None and act.groups == 1
        else:
            assert act.group_index.tolist() == expected
            assert act.groups == max(expected) + 1
        if act.length is not None:
            assert act.length.shape == (act.groups,)  # one o per group
        nxt = net.layers[i + 1]
        if nxt.correction is not None:
            assert nxt.correction.shape == (nxt.weight.shape[0], act.groups)  # one psi column per group
    _assert_reference(net, x)


@pytest.mark.parametrize("grouping", ["group_size", "shuffled_singletons"])
def test_group_size_one_without_length_is_an_elementwise_tanh_network(grouping):
    sizes = [5, 7, 6, 4, 3]
    g = torch.Generator().manual_seed(3)
    kwargs: Dict[str, object] = {"group_size": 1}
    if grouping == "shuffled_singletons":
        kwargs = {"partitions": [torch.randperm(w, generator=g).tolist() for w in sizes[1:-1]]}
    net = il.IsotropicMLP(sizes, length="none", psi="none", generator=g, **kwargs).double()
    _perturb(net, g)
    with torch.no_grad():
        net.layers[0].bias[:2] = 0.0  # with x = 0 below: z = 0 exactly, the s(0) = 1 limit
    seq_layers: List[nn.Module] = []
    for i, layer in enumerate(net.layers):
        lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            lin.bias.copy_(layer.bias)
        seq_layers.append(lin)
        if i < len(net.layers) - 1:
            seq_layers.append(nn.Tanh())
    x = _inputs((64, sizes[0]), torch.float64, 0)
    x[:3] = 0.0
    x[3:6] *= 1e-4  # small |z|: the series branch of s
    err = float((_out(net, x) - _out(nn.Sequential(*seq_layers), x)).abs().max())
    # s(z) z with s = tanh(|z|)/|z| is tanh(z) up to two roundings per neuron (~1e-16 each), outputs O(1).
    assert err <= SAME_FUNCTION_TOL, f"{err:.3e}"
    assert all(net.activation(i).groups == w for i, w in enumerate(sizes[1:-1]))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("psi", PSIS)
@pytest.mark.parametrize("grouping", ["group_size_wide", "partition_zeros"])
def test_single_group_equals_ungrouped(length, psi, grouping):
    sizes = [4, 6, 5, 2]
    g = torch.Generator().manual_seed(5)
    plain = il.IsotropicMLP(sizes, length=length, psi=psi, generator=g).double()
    _perturb(plain, g)
    kwargs: Dict[str, object] = (
        {"group_size": 6} if grouping == "group_size_wide" else {"partitions": [[0] * 6, [0] * 5]}
    )
    grouped = il.IsotropicMLP(sizes, length=length, psi=psi, **kwargs).double()
    params = dict(plain.named_parameters())
    buffers = dict(plain.named_buffers())
    with torch.no_grad():
        for name, p in grouped.named_parameters():
            p.copy_(params[name])
        for name, b in grouped.named_buffers():
            if not name.endswith("group_index"):
                b.copy_(buffers[name])
    assert all(grouped.activation(i).groups == 1 for i in range(2))
    x = _inputs((32, 4), torch.float64, 1)
    err = float((_out(grouped, x) - _out(plain, x)).abs().max())
    assert err <= SAME_FUNCTION_TOL, f"{err:.3e}"  # only the summation order of the norm differs
    for i in range(2):
        torch.testing.assert_close(grouped.singular_values(i), plain.singular_values(i), rtol=0, atol=SIGMA_TOL)


# ---------------------------------------------------------------------------- growth
@settings(max_examples=150, **FAST)
@given(case=grouped_cases(), data=st.data())
def test_grow_into_a_group_is_exact(case, data):
    net, x = _build(case)
    layer = data.draw(st.integers(0, net.num_hidden - 1), label="layer")
    m = net.space(layer).groups()
    group = data.draw(st.one_of(st.none(), st.integers(0, m - 1)), label="group")
    n = data.draw(st.integers(1, 4), label="n")
    before = _out(net, x)
    _assume_output_scale(before)
    index, sizes = _index(net, layer), _group_sizes(net, layer)
    length = None if net.activation(layer).length is None else net.activation(layer).length.detach().clone()
    report = net.grow(layer, n, group=group, generator=torch.Generator().manual_seed(case["seed"]))
    _assert_preserved(before, _out(net, x))
    assert report.exact and report.error_estimate == 0.0
    # group=None: each new neuron joins the group that is smallest at that moment (lowest number
    # among equals), which keeps the groups balanced; in a space of one-neuron groups (the
    # elementwise case) each new neuron is a group of its own.
    singletons = m == len(index)
    if group is not None:
        expected = [group] * n
    elif singletons:
        expected = list(range(m, m + n))
    else:
        counts, expected = list(sizes), []
        for _ in range(n):
            g = int(np.argmin(counts))
            expected.append(g)
            counts[g] += 1
    assert report.details["groups"] == expected and not report.details["new_group"]
    new_index = net.space(layer).group_index()
    assert torch.equal(new_index[:-n], index)  # old neurons keep their group
    assert new_index[-n:].tolist() == expected
    act = net.activation(layer)
    if group is None and singletons:
        assert net.space(layer).groups() == m + n
        if length is not None:  # the old groups keep o; the new ones start at the initial length
            assert torch.equal(act.length.detach()[:m], length)
            assert torch.all(act.length.detach()[m:] == act.length_init)
        return
    assert net.space(layer).groups() == m  # no group appears or vanishes
    if length is not None:
        assert torch.equal(act.length.detach(), length)  # o per group untouched
    nxt = net.layers[layer + 1]
    if nxt.correction is not None:
        assert nxt.correction.shape[1] == m
    assert float(nxt.weight.detach()[:, -n:].abs().max()) > 0  # new outgoing columns are not zero
    _assert_reference(net, x)


@settings(max_examples=150, **FAST)
@given(case=grouped_cases(), data=st.data())
def test_grow_new_group_is_exact(case, data):
    net, x = _build(case)
    layer = data.draw(st.integers(0, net.num_hidden - 1), label="layer")
    n = data.draw(st.integers(1, 4), label="n")
    before = _out(net, x)
    _assume_output_scale(before)
    m, index = net.space(layer).groups(), _index(net, layer)
    act = net.activation(layer)
    length = None if act.length is None else act.length.detach().clone()
    nxt = net.layers[layer + 1]
    psi = None if nxt.correction is None else nxt.correction.detach().clone()
    report = net.grow(layer, n, group="new", generator=torch.Generator().manual_seed(case["seed"]))
    _assert_preserved(before, _out(net, x))
    assert report.exact and report.details["new_group"] and report.details["groups"] == [m] * n
    assert net.space(layer).groups() == m + 1
    assert torch.equal(net.space(layer).group_index(), torch.cat([index, torch.full((n,), m)]))
    if length is not None:
        assert act.length.shape == (m + 1,)
        assert torch.equal(act.length.detach()[:m], length)
        assert float(act.length.detach()[m]) == pytest.approx(act.length_init, rel=1e-6)  # float32 rounding
    if psi is not None:
        assert nxt.correction.shape == (psi.shape[0], m + 1)
        assert torch.equal(nxt.correction.detach()[:, :m], psi)
        assert not nxt.correction.detach()[:, m].any()  # the new group's psi column starts at zero
    this = net.layers[layer]
    assert not this.weight.detach()[-n:].any() and not this.bias.detach()[-n:].any()
    _assert_reference(net, x)


# ---------------------------------------------------------------------------- spectra and left diagonalisation
@settings(max_examples=150, **FAST)
@given(case=grouped_cases(), data=st.data())
def test_left_diagonalise_is_exact_and_per_group(case, data):
    net, x = _build(case)
    layer = data.draw(st.integers(0, net.num_hidden - 1), label="layer")
    before = _out(net, x)
    _assume_output_scale(before)
    labels = _index(net, layer).numpy()
    a_old = _incoming(net, layer)
    w_next_old = _np(net.layers[layer + 1].weight)
    b_old = _np(net.layers[layer].bias)
    spectra = _group_spectra(a_old, labels)
    expected = np.sort(np.concatenate(spectra))[::-1]
    top = max(1.0, float(expected[0]))
    # singular_values(l): all groups' values (per-group SVDs of [W_l | psi_{l-1}]) sorted descending
    np.testing.assert_allclose(net.singular_values(layer).numpy(), expected, rtol=0, atol=SIGMA_TOL * top)

    report = net.diagonalise(layer, "left")
    _assert_preserved(before, _out(net, x))
    assert np.array_equal(_index(net, layer).numpy(), labels)  # the partition is unchanged
    _assert_reference(net, x)
    a_new = _incoming(net, layer)
    w_next_new = _np(net.layers[layer + 1].weight)
    b_new = _np(net.layers[layer].bias)
    # float64: products of <= 44 terms, ~1e-15 relative. float32: the rows are float32 products,
    # ~sqrt(44) * 6e-8 ~ 4e-7 relative; 1e-4 still separates any mixing of groups (O(1) changes).
    rel = 1e-10 if case["dtype"] == torch.float64 else 1e-4

    def close(actual, expected):  # type: ignore[no-untyped-def]
        np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * max(1.0, float(np.abs(expected).max())))

    for group, sigma in enumerate(spectra):
        rows = labels == group
        # The rotation stays inside the group: each group's Gram matrices (A_G^T A_G over the inputs,
        # W_{l+1}[:, G] W_{l+1}[:, G]^T over the outputs) and its bias norm are invariant under a
        # rotation within G, and change under any rotation that mixes G with another group.
        close(a_new[rows].T @ a_new[rows], a_old[rows].T @ a_old[rows])
        close(w_next_new[:, rows] @ w_next_new[:, rows].T, w_next_old[:, rows] @ w_next_old[:, rows].T)
        close(np.linalg.norm(b_new[rows]), np.linalg.norm(b_old[rows]))
        # Within the group, row k (in order of position) carries the group's k-th singular value.
        np.testing.assert_allclose(np.linalg.norm(a_new[rows], axis=1), sigma, rtol=0, atol=rel * top)
    np.testing.assert_allclose(np.sort(report.singular_values.numpy())[::-1], expected, rtol=0, atol=SIGMA_TOL * top)


def test_rotation_mixing_groups_is_detected():
    """Guards the per-group checks above: a rotation across two groups changes the function."""
    g = torch.Generator().manual_seed(0)
    net = _grouped_mlp(dict(sizes=[4, 6, 3], length="constant", psi="trainable", dtype=torch.float64, seed=0,
                            group_size=None, partitions=[[1, 0, 1, 0, 2, 2]]))
    x = _inputs((16, 4), torch.float64, 0)
    before = _out(net, x)
    _rotate_within_groups(net, 0, g)
    _assert_preserved(before, _out(net, x))  # a block-diagonal rotation is a symmetry ...
    transform_space(net.space(0), DenseRotation(_orthogonal(6, g)))
    assert float((_out(net, x) - before).abs().max()) > 1e-3  # ... a rotation across groups is not


# ---------------------------------------------------------------------------- shrink across groups
def _expected_removal(spectra: List[np.ndarray], n: int) -> Tuple[np.ndarray, List[int], bool]:
    """The ``n`` smallest singular values over all groups, never a group's last (strongest) one.

    Returns the removed values (ascending), how many come from each group, and whether the choice is
    unique (no tie at the cut).
    """
    candidates = sorted((float(v), group) for group, s in enumerate(spectra) for v in s[1:])
    assert n <= len(candidates)
    removed = candidates[:n]
    counts = [0] * len(spectra)
    for _, group in removed:
        counts[group] += 1
    scale = max(1.0, max(float(s[0]) for s in spectra))
    unique = n == len(candidates) or candidates[n][0] - candidates[n - 1][0] > 1e-6 * scale
    return np.array([v for v, _ in removed]), counts, unique


def _truncated_reference(net: il.IsotropicMLP, layer: int, counts: List[int]) -> il.IsotropicMLP:
    """Left-diagonalise a copy, drop each group's last ``counts[g]`` rows and fold their biases by hand."""
    ref = copy.deepcopy(net)
    ref.diagonalise(layer, "left")
    labels = _index(ref, layer).numpy()
    this, nxt, act = ref.layers[layer], ref.layers[layer + 1], ref.activation(layer)
    drop = []
    for group, k in enumerate(counts):
        rows = np.flatnonzero(labels == group)
        drop += rows[len(rows) - k:].tolist() if k else []
    keep = [i for i in range(len(labels)) if i not in set(drop)]
    b = _np(this.bias)
    w_next = _np(nxt.weight)
    with torch.no_grad():
        if act.length is not None:
            o = np.abs(_np(act.length))
            for i in drop:
                o[labels[i]] += b[i] ** 2
            act.length.copy_(torch.from_numpy(o))
        if nxt.correction is not None:
            psi = _np(nxt.correction)
            for i in drop:
                psi[:, labels[i]] += w_next[:, i] * b[i]
            nxt.correction.copy_(torch.from_numpy(psi))
    this.weight = nn.Parameter(this.weight.detach()[keep].clone())
    this.bias = nn.Parameter(this.bias.detach()[keep].clone())
    if this.correction is not None:
        this.correction = nn.Parameter(this.correction.detach()[keep].clone())
    nxt.weight = nn.Parameter(nxt.weight.detach()[:, keep].clone())
    act.group_index = torch.from_numpy(labels[keep])
    return ref


@settings(max_examples=150, **FAST)
@given(case=grouped_cases(min_width=2, dtypes=(torch.float64,)), data=st.data())
def test_shrink_removes_the_globally_smallest_singular_values(case, data):
    net, x = _build(case)
    layer = data.draw(st.integers(0, net.num_hidden - 1), label="layer")
    width, m = net.hidden_widths[layer], net.space(layer).groups()
    assume(width - m >= 1)  # some group has a direction to spare
    n = data.draw(st.integers(1, width - m), label="n")
    labels = _index(net, layer).numpy()
    spectra = _group_spectra(_incoming(net, layer), labels)
    removed, counts, unique = _expected_removal(spectra, n)
    event(f"groups losing neurons: {sum(c > 0 for c in counts)}")
    top = max(1.0, max(float(s[0]) for s in spectra))
    ref = _truncated_reference(net, layer, counts) if unique else None

    report = net.shrink(layer, n, probe=x)
    assert net.hidden_widths[layer] == width - n
    assert net.space(layer).groups() == m  # no group is ever emptied
    # Remaining spectrum (all groups) = the full multiset minus the removed values.
    remaining_expected = np.sort(_multiset_minus(np.concatenate(spectra), removed))[::-1]
    np.testing.assert_allclose(net.singular_values(layer).numpy(), remaining_expected, rtol=0, atol=SIGMA_TOL * top)
    new_labels = _index(net, layer).numpy()
    new_spectra = _group_spectra(_incoming(net, layer), new_labels)
    np.testing.assert_allclose(np.sort(np.concatenate(new_spectra))[::-1], remaining_expected, rtol=0,
                               atol=SIGMA_TOL * top)
    if not unique:
        return  # a tie at the cut (e.g. zeros in two groups): which group gives one up is arbitrary
    # Each group lost exactly its share and kept its strongest values.
    assert [int((new_labels == k).sum()) for k in range(m)] == [int((labels == k).sum()) - c
                                                              for k, c in enumerate(counts)]
    for group, (old, new) in enumerate(zip(spectra, new_spectra)):
        np.testing.assert_allclose(new, old[: old.size - counts[group]], rtol=0, atol=SIGMA_TOL * top)
    # Same function as the hand-made truncation (with folds) of the left-diagonalised network, up to
    # the angle error of each removed subspace, ~ eps * sigma_max^2 / gap; only with a gap inside
    # every group that loses neurons (in a degenerate spectrum the kept direction is arbitrary).
    gaps = [s[s.size - c - 1] - s[s.size - c] for s, c in zip(spectra, counts) if c]
    if min(gaps) > 1e-4 * top:
        expected_out = _out(ref, x)
        err = float((_out(net, x) - expected_out).abs().max())
        assert err <= 1e-8 * max(1.0, float(expected_out.abs().max())), f"{err:.3e}"
    assert report.measured_error is not None


def _multiset_minus(values: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``values`` without one (nearest) occurrence of each entry of ``removed``."""
    left = list(values)
    for v in removed:
        k = int(np.argmin(np.abs(np.array(left) - v)))
        left.pop(k)
    return np.array(left)


def test_shrink_report_lists_the_removed_per_group_singular_values():
    net = il.IsotropicMLP([4, 6, 3], partitions=[[1, 0, 1, 0, 2, 2]]).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.randn(6, 4, generator=g, dtype=torch.float64))
    spectra = _group_spectra(_incoming(net, 0), _index(net, 0).numpy())
    removed, counts, _ = _expected_removal(spectra, 3)
    assert counts == [1, 1, 1]  # one direction from each group
    report = net.shrink(0, 3)
    np.testing.assert_allclose(np.sort(report.singular_values.numpy()), removed, rtol=0, atol=1e-10)


@pytest.mark.parametrize("partition", [[1, 0, 1, 0, 2, 2], [0, 1, 2, 3, 4, 5], [3, 3, 0, 1, 2, 3]])
def test_shrink_never_empties_a_group(partition):
    net = il.IsotropicMLP([4, 6, 3], partitions=[partition], length="trainable", psi="trainable").double()
    _perturb(net, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, [opt], 2)
    m = max(partition) + 1
    if m < 6:
        state = _state_copy(net, opt)
        with pytest.raises(ValueError, match="`n`"):
            net.shrink(0, 6 - m + 1, optimizer=opt)  # one more than the groups can spare
        _assert_unchanged(net, opt, state)
        net.shrink(0, 6 - m, optimizer=opt)  # exactly what they can spare: one neuron left per group
        assert _group_sizes(net, 0) == [1] * m
    else:
        # Every group is a single neuron (the elementwise case): shrink removes whole neurons, the
        # weakest rows of [W | psi], and keeps at least one.
        state = _state_copy(net, opt)
        with pytest.raises(ValueError, match="`n`"):
            net.shrink(0, 6, optimizer=opt)
        _assert_unchanged(net, opt, state)
        a = torch.cat([net.layers[0].weight, net.layers[0].correction], dim=1) if net.layers[0].correction is not None \
            else net.layers[0].weight
        norms = a.detach().norm(dim=1)
        keep = torch.argsort(norms, descending=True)[:4].sort().values
        kept_rows = net.layers[0].weight.detach()[keep].clone()
        report = net.shrink(0, 2, optimizer=opt)
        assert net.space(0).groups() == 4 and _group_sizes(net, 0) == [1] * 4
        assert torch.equal(net.layers[0].weight.detach(), kept_rows)  # no rotation: whole neurons go
        np.testing.assert_allclose(report.singular_values.numpy(), np.sort(norms.numpy())[:2], rtol=1e-12)


# ---------------------------------------------------------------------------- exact removal of a constant neuron
@settings(max_examples=150, **FAST)
@given(case=grouped_cases(min_width=2, lengths=("constant", "trainable"), psis=("constant", "trainable", "decay")),
       data=st.data())
def test_zero_singular_value_shrink_is_exact(case, data):
    net, x = _build(case)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    layer, group = _draw_layer_and_group(data, net, min_size=2)
    members = torch.nonzero(_index(net, layer) == group).flatten().tolist()
    index = data.draw(st.sampled_from(members), label="index")
    bias = data.draw(st.floats(0.5, 2.0), label="bias") * data.draw(st.sampled_from([-1.0, 1.0]), label="sign")
    _plant_constant_neuron(net, layer, index, bias, g)
    labels = _index(net, layer).numpy()
    spectra = _group_spectra(_incoming(net, layer), labels)
    spectrum = net.singular_values(layer)
    zero = _zero_level(case["dtype"]) * float(spectrum[0])
    zeros_per_group = [int((s <= zero).sum()) for s in spectra]
    assert zeros_per_group[group] >= 1  # the planted direction, hidden inside its group
    condition = _nonzero_condition(spectrum, case["dtype"])
    assume(condition <= MAX_CONDITION_FOR_BOUND[case["dtype"]])
    event(f"dtype={case['dtype']}, exact flag checked={condition <= MAX_CONDITION_FOR_EXACT_FLAG}")
    before = _out(net, x)
    _assume_output_scale(before)
    sizes = _group_sizes(net, layer)
    report = net.shrink(layer, 1, probe=x)
    after = _out(net, x)
    _assert_preserved(before, after)
    if condition <= MAX_CONDITION_FOR_EXACT_FLAG:
        assert report.exact
    assert report.measured_error == float((after - before).abs().max())
    if sum(zeros_per_group) == 1:
        # the only zero direction is the planted one: its group loses the neuron, the others keep theirs
        expected = list(sizes)
        expected[group] -= 1
        assert _group_sizes(net, layer) == expected
        if case["dtype"] == torch.float64:
            assert abs(abs(report.details["removed_bias"][0]) - abs(bias)) <= 1e-4 * abs(bias)
    _assert_reference(net, x)


@settings(max_examples=80, **FAST)
@given(case=grouped_cases(min_width=2, dtypes=(torch.float64,)), data=st.data())
def test_zero_singular_value_shrink_without_folds_reports_its_error(case, data):
    if case["length"] != "none" and case["psi"] != "none":
        case["psi"] = "none"  # at least one of the two folds is off
    net, x = _build(case)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    layer, group = _draw_layer_and_group(data, net, min_size=2)
    index = data.draw(st.sampled_from(torch.nonzero(_index(net, layer) == group).flatten().tolist()), label="index")
    _plant_constant_neuron(net, layer, index, data.draw(st.floats(0.5, 2.0), label="bias"), g)
    before = _out(net, x)
    report = net.shrink(layer, 1, probe=x)
    measured = float((_out(net, x) - before).abs().max())
    assert not report.exact
    assert report.error_estimate > 0
    assert report.measured_error == measured
    assert measured > 0


# ---------------------------------------------------------------------------- remove_group
@settings(max_examples=150, **FAST)
@given(case=grouped_cases(min_width=2), data=st.data())
def test_remove_zero_group_is_exact(case, data):
    """A group whose rows of ``[W_l | psi_{l-1}]`` are zero outputs a constant; its whole contribution
    to the next layer goes into the next bias, so the removal is exact with ``o`` and psi on or off."""
    net, x = _build(case)
    layer, group = _draw_layer_and_group(data, net, min_size=1, min_groups=2)
    g = torch.Generator().manual_seed(case["seed"] + 3)
    labels = _index(net, layer)
    rows = torch.nonzero(labels == group).flatten()
    this, nxt, act = net.layers[layer], net.layers[layer + 1], net.activation(layer)
    with torch.no_grad():
        this.weight[rows] = 0.0
        if this.correction is not None:
            this.correction[rows] = 0.0
        this.bias[rows] = this.bias[rows] + torch.where(this.bias[rows] >= 0, 0.5, -0.5).to(this.bias.dtype)
    _rotate_within_groups(net, layer, g)  # the group's rows stay zero; other groups are mixed inside
    before = _out(net, x)
    _assume_output_scale(before)
    m, width = act.groups, this.weight.shape[0]
    keep_rows = torch.nonzero(labels != group).flatten()
    keep_groups = [k for k in range(m) if k != group]
    old = {name: t.detach().clone() for name, t in (("w", this.weight), ("b", this.bias), ("w_next", nxt.weight),
                                                     ("b_next", nxt.bias))}
    old_length = None if act.length is None else act.length.detach().clone()
    old_psi_in = None if this.correction is None else this.correction.detach().clone()
    old_psi = None if nxt.correction is None else nxt.correction.detach().clone()
    # The fold, written out: s_G (W_{l+1}[:, G] b_G + psi_l[:, g]) with s_G = tanh(r)/r, r^2 = |b_G|^2 + o_G.
    b_g = _np(old["b"])[rows.numpy()]
    s_g = float(_tanh_scale(np.array((b_g ** 2).sum() + _effective_length(act)[group])))
    fold = _np(old["w_next"])[:, rows.numpy()] @ b_g + (0.0 if old_psi is None else _np(old_psi)[:, group])

    use_default = data.draw(st.booleans(), label="default group")
    report = net.remove_group(layer, None if use_default else group, probe=x)
    after = _out(net, x)
    _assert_preserved(before, after)
    assert report.exact and report.error_estimate == 0.0
    assert report.details["group"] == group  # group=None picks the weakest group: the zero one
    assert report.measured_error == float((after - before).abs().max())
    assert net.hidden_widths[layer] == width - rows.numel()
    assert act.groups == m - 1
    # Labels above the removed group move down by one; the order of the kept neurons is unchanged.
    kept = labels[keep_rows]
    assert torch.equal(net.space(layer).group_index(), kept - (kept > group).long())
    # Everything indexed by the space or by its groups is a plain selection: kept entries are bit-identical.
    assert torch.equal(this.weight.detach(), old["w"][keep_rows])
    assert torch.equal(this.bias.detach(), old["b"][keep_rows])
    assert torch.equal(nxt.weight.detach(), old["w_next"][:, keep_rows])
    if old_psi_in is not None:
        assert torch.equal(this.correction.detach(), old_psi_in[keep_rows])
    if old_length is not None:
        assert torch.equal(act.length.detach(), old_length[keep_groups])
    if old_psi is not None:
        assert torch.equal(nxt.correction.detach(), old_psi[:, keep_groups])
    # float64: a sum of <= 32 products, ~1e-15 relative; float32: the bias is updated in float32 (~1e-7).
    tol = 1e-12 if case["dtype"] == torch.float64 else 1e-5
    np.testing.assert_allclose(_np(nxt.bias) - _np(old["b_next"]), s_g * fold, rtol=0,
                               atol=tol * max(1.0, float(np.abs(fold).max()), float(old["b_next"].abs().max())))
    _assert_reference(net, x)


@settings(max_examples=60, **FAST)
@given(case=grouped_cases(min_width=2, dtypes=(torch.float64,)), data=st.data())
def test_remove_non_zero_group_reports_its_error(case, data):
    net, x = _build(case)
    layer, group = _draw_layer_and_group(data, net, min_size=1, min_groups=2)
    a_g = _incoming(net, layer)[_index(net, layer).numpy() == group]
    before = _out(net, x)
    report = net.remove_group(layer, group, probe=x)
    measured = float((_out(net, x) - before).abs().max())
    assert not report.exact
    # the error estimate is ||A_G||_F, the input-dependent part that was dropped (1e-12: float64 norms)
    assert report.error_estimate == pytest.approx(float(np.linalg.norm(a_g)), rel=1e-12)
    assert report.error_estimate > 0 and report.measured_error == measured and measured > 0


# ---------------------------------------------------------------------------- full diagonalisation
@pytest.mark.parametrize("grouping", [dict(group_size=16), dict(partitions=[[0] * 7, [0] * 6, None])])
def test_full_diagonalise_of_single_group_spaces_is_exact(grouping):
    net = il.IsotropicMLP([5, 7, 6, 8, 3], length="trainable", psi="trainable", **grouping).double()
    _perturb(net, torch.Generator().manual_seed(1))
    x = _inputs((32, 5), torch.float64, 1)
    before = _out(net, x)
    for layer in (1, 2):
        net.diagonalise(layer, "full")
        _assert_preserved(before, _out(net, x))
        off = net.layers[layer].weight.detach().clone().fill_diagonal_(0)
        assert int(torch.count_nonzero(off)) == 0
    _assert_reference(net, x)


@pytest.mark.parametrize("partitions", [
    [[0, 1, 0, 1, 1, 0, 0], [0] * 6],  # the previous space is grouped
    [[0] * 7, [2, 0, 1, 0, 2, 2]],  # this space is grouped
])
def test_full_diagonalise_of_multi_group_spaces_raises(partitions):
    net = il.IsotropicMLP([5, 7, 6, 3], length="trainable", psi="trainable", partitions=partitions).double()
    _perturb(net, torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, [opt], 2)
    state = _state_copy(net, opt)
    with pytest.raises(ValueError, match="single-group"):
        net.diagonalise(1, "full", optimizer=opt)
    _assert_unchanged(net, opt, state)


def test_full_diagonalise_follows_the_number_of_groups():
    net = il.IsotropicMLP([5, 7, 6, 3], length="constant", psi="trainable").double()
    _perturb(net, torch.Generator().manual_seed(3))
    x = _inputs((32, 5), torch.float64, 3)
    net.grow(0, 2, group="new")
    with pytest.raises(ValueError, match="single-group"):
        net.diagonalise(1, "full")
    with torch.no_grad():  # make the new group a non-zero constant, then remove it: one group again
        net.layers[0].bias[-2:] = 0.7
    before = _out(net, x)
    assert net.remove_group(0, 1).exact
    _assert_preserved(before, _out(net, x))
    net.diagonalise(1, "full")
    _assert_preserved(before, _out(net, x))


# ---------------------------------------------------------------------------- convolutions
@st.composite
def grouped_conv_cases(draw, lengths=LENGTHS, psis=PSIS, min_channels: int = 1):
    kernels, strides, hidden = draw(st.sampled_from(CONV_ARCHS))
    channels = draw(st.lists(st.integers(min_channels, 8), min_size=len(kernels), max_size=len(kernels)))
    return dict(in_channels=draw(st.integers(1, 3)), channels=channels, kernels=kernels, strides=strides,
                hidden=[draw(st.integers(min_channels, 8)) for _ in hidden], image=draw(st.integers(4, 7)),
                outputs=draw(st.integers(1, 4)), length=draw(st.sampled_from(lengths)),
                psi=draw(st.sampled_from(psis)), seed=draw(st.integers(0, 2**31 - 1)))


def _build_conv(case) -> Tuple[il.IsotropicConvNet, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    net = il.IsotropicConvNet(case["in_channels"], case["channels"], image_size=case["image"],
                              num_outputs=case["outputs"], hidden=case["hidden"], kernel_size=case["kernels"],
                              stride=case["strides"], length=case["length"], psi=case["psi"], group_size=2,
                              generator=g).to(torch.float64)
    _perturb(net, g)
    x = _inputs((5, case["in_channels"], case["image"], case["image"]), torch.float64, case["seed"])
    return net, x


@settings(max_examples=80, **FAST)
@given(case=grouped_conv_cases(), data=st.data())
def test_conv_grouped_grow_new_group_and_left_diagonalise_are_exact(case, data):
    net, x = _build_conv(case)
    before = _out(net, x)
    layer = data.draw(st.integers(0, net.num_hidden - 1), label="layer")
    width = net.hidden_widths[layer]
    assert net.space(layer).groups() == (width + 1) // 2
    index = _index(net, layer)
    group = data.draw(st.integers(0, net.space(layer).groups() - 1), label="group")
    net.grow(layer, data.draw(st.integers(1, 3), label="n"), group=group, generator=torch.Generator().manual_seed(1))
    _assert_preserved(before, _out(net, x))
    net.grow(layer, data.draw(st.integers(1, 3), label="n_new"), group="new",
             generator=torch.Generator().manual_seed(2))
    _assert_preserved(before, _out(net, x))
    grown = _index(net, layer)
    assert torch.equal(grown[: index.numel()], index)
    net.diagonalise(layer, "left")
    _assert_preserved(before, _out(net, x))
    assert torch.equal(_index(net, layer), grown)


@settings(max_examples=80, **FAST)
@given(case=grouped_conv_cases(lengths=("constant", "trainable"), psis=("constant", "trainable", "decay"),
                               min_channels=2), data=st.data())
def test_conv_grouped_zero_singular_value_shrink_is_exact(case, data):
    net, x = _build_conv(case)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    layer, group = _draw_layer_and_group(data, net, min_size=2)
    members = torch.nonzero(_index(net, layer) == group).flatten().tolist()
    _plant_constant_neuron(net, layer, data.draw(st.sampled_from(members), label="index"),
                           data.draw(st.floats(0.5, 2.0), label="bias"), g)
    condition = _nonzero_condition(net.singular_values(layer), torch.float64)
    assume(condition <= MAX_CONDITION_FOR_BOUND[torch.float64])
    before = _out(net, x)
    old = net.hidden_widths[layer]
    m = net.space(layer).groups()
    report = net.shrink(layer, 1, probe=x)
    _assert_preserved(before, _out(net, x))
    assert net.hidden_widths[layer] == old - 1 and net.space(layer).groups() == m
    if condition <= MAX_CONDITION_FOR_EXACT_FLAG:
        assert report.exact


@pytest.mark.parametrize(("layer", "exact"), [(1, True), (2, True), (0, False)])
def test_conv_remove_group_exact_when_next_layer_is_dense(layer, exact):
    """Spaces 1 (conv -> dense head) and 2 (dense -> dense) fold exactly; space 0 feeds a padded 3x3
    convolution, which sees the constant map cut at the border: the report must say so."""
    net = il.IsotropicConvNet(2, [4, 4], image_size=5, num_outputs=3, hidden=[6], kernel_size=[3, 3],
                              length="trainable", psi="trainable", group_size=2).double()
    _perturb(net, torch.Generator().manual_seed(4))
    this = net.layers[layer]
    rows = torch.nonzero(_index(net, layer) == 1).flatten()
    with torch.no_grad():
        this.weight[rows] = 0.0
        if this.correction is not None:
            this.correction[rows] = 0.0
    x = _inputs((6, 2, 5, 5), torch.float64, 4)
    before = _out(net, x)
    report = net.remove_group(layer, 1, probe=x)
    assert net.space(layer).groups() == net.hidden_widths[layer] // 2
    assert report.exact == exact
    if exact:
        _assert_preserved(before, _out(net, x))
    else:
        # Border pixels really change (an O(0.1) effect here); round-off alone would be ~1e-15.
        assert report.measured_error > 1e-6


# ---------------------------------------------------------------------------- optimizer state
# Four hidden spaces: 0 and 3 grouped (non-contiguous labels, a group of size 1), 1 and 2 single-group
# so that layer 2 can be fully diagonalised. Widths keep every stacked system of the rotation recovery
# (test_optim.recover) well conditioned.
OPT_SIZES = [10, 8, 7, 6, 5, 4]
OPT_PARTITIONS = [[2, 0, 1, 0, 2, 2, 1, 0], [0] * 7, None, [1, 0, 1, 2, 0]]
OPT_KEYS = ["adam", "adamw", "sgd_momentum", "rmsprop_centered_momentum", "adagrad"]


def _opt_net(seed: int = 0) -> il.IsotropicMLP:
    g = torch.Generator().manual_seed(seed)
    net = il.IsotropicMLP(OPT_SIZES, psi="trainable", length="trainable", generator=g,
                          partitions=OPT_PARTITIONS).double()
    _perturb(net, g)
    return net


def _group_maps(layer: int, m: np.ndarray) -> Maps:
    """Maps of the tensors indexed by the groups of space ``layer``: its ``o`` and the next psi's columns."""
    return {f"activations.{layer}.length": [(0, m)], f"layers.{layer + 1}.correction": [(1, m)]}


def _assert_block_diagonal(m: np.ndarray, old_labels: np.ndarray, new_labels: np.ndarray) -> None:
    # Recovered by least squares to ~1e-12 (test_optim._ROT_RTOL justification); any mixing is O(1).
    mixing = old_labels[:, None] != new_labels[None, :]
    assert float(np.abs(m[mixing]).max(initial=0.0)) <= 1e-9, "the rotation mixes groups"


def _rotation_with_groups(layer: int, old_labels: np.ndarray,
                          new_labels_of: Callable[[], np.ndarray]) -> Callable[..., Maps]:
    def maps(old, new):  # type: ignore[no-untyped-def]
        m = recover(stack(old, space_tensors(layer)), stack(new, space_tensors(layer)))
        assert_orthonormal_columns(m)
        _assert_block_diagonal(m, old_labels, new_labels_of())
        return maps_for_space(layer, m)
    return maps


def _op_grow_group(net, opt):
    old = net.hidden_widths[0]
    net.grow(0, 2, group=1, optimizer=opt)
    return lambda o, n: maps_for_space(0, extension(old, 2))


def _op_grow_new(net, opt):
    old, m = net.hidden_widths[3], net.space(3).groups()
    net.grow(3, 2, group="new", optimizer=opt)
    return lambda o, n: {**maps_for_space(3, extension(old, 2)), **_group_maps(3, extension(m, 1))}


def _op_grow_new_in_single_group_space(net, opt):
    old = net.hidden_widths[1]
    net.grow(1, 1, group="new", optimizer=opt)
    return lambda o, n: {**maps_for_space(1, extension(old, 1)), **_group_maps(1, extension(1, 1))}


def _op_shrink(net, opt):
    labels = _index(net, 0).numpy()
    net.shrink(0, 4, optimizer=opt)
    return _rotation_with_groups(0, labels, lambda: _index(net, 0).numpy())


def _op_remove_group(net, opt):
    labels, m = _index(net, 3).numpy(), net.space(3).groups()
    net.remove_group(3, 1, optimizer=opt)
    keep = np.flatnonzero(labels != 1)
    return lambda o, n: {**maps_for_space(3, selection(len(labels), keep)),
                         **_group_maps(3, selection(m, [k for k in range(m) if k != 1]))}


def _op_diag_left(net, opt):
    labels = _index(net, 0).numpy()
    net.diagonalise(0, "left", optimizer=opt)
    return _rotation_with_groups(0, labels, lambda: _index(net, 0).numpy())


def _op_diag_full(net, opt):
    net.diagonalise(2, "full", optimizer=opt)
    return lambda o, n: full_diag_maps(o, n, [2])


GROUPED_OPS = {
    "grow_into_group": _op_grow_group,
    "grow_new_group": _op_grow_new,
    "grow_new_group_single": _op_grow_new_in_single_group_space,
    "shrink_across_groups": _op_shrink,
    "remove_group": _op_remove_group,
    "diagonalise_left": _op_diag_left,
    "diagonalise_full_single_group": _op_diag_full,
}


@pytest.mark.parametrize("op", list(GROUPED_OPS))
@pytest.mark.parametrize("opt_key", OPT_KEYS)
def test_optimizer_state_follows_grouped_operation(opt_key, op):
    net = _opt_net()
    opt = make_opt(opt_key, net.parameters())
    train(net, [opt], 3)
    opt.zero_grad()
    loss_of(net, 99).backward()  # gradients present during the operation must follow too
    centered = bool(opt.defaults.get("centered", False))
    before = snapshot(net, [opt])
    x = _inputs((17, OPT_SIZES[0]), torch.float64, 0)
    out_before = _out(net, x)
    maps_of = GROUPED_OPS[op](net, opt)
    if op != "remove_group" and op != "shrink_across_groups":
        _assert_preserved(out_before, _out(net, x))
    check_structure(net, [opt], before)  # shapes, identity, no stale keys, state_dict round trip
    maps = maps_of(before.params, snapshot(net, [opt]).params)
    # Every state entry follows its rule; names outside `maps` (e.g. the o and psi of a space whose
    # groups did not change, or the next bias that received a fold) keep their state bit-identical.
    check_state(net, [opt], before, maps, centered)
    length_name = {"grow_new_group": "activations.3.length", "remove_group": "activations.3.length",
                   "grow_new_group_single": "activations.1.length"}.get(op)
    if length_name is not None:
        after = snapshot(net, [opt])
        old_state, new_state = before.state[length_name], after.state[length_name]
        for key, old in old_state.items():
            if not isinstance(old, np.ndarray):
                continue
            if op == "remove_group":
                np.testing.assert_array_equal(new_state[key], old[[0, 2]])  # kept groups: bit-identical
            else:
                fill = 0.1 if key == "sum" else 0.0  # Adagrad's initial_accumulator_value (test_optim)
                np.testing.assert_array_equal(new_state[key][:-1], old)
                assert new_state[key][-1] == fill
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    check_training_continues(net, [opt], centered)
    opt.state_dict()


@pytest.mark.parametrize("opt_key", OPT_KEYS)
def test_optimizer_continues_across_a_sequence_of_grouped_operations(opt_key):
    net = _opt_net(1)
    opt = make_opt(opt_key, net.parameters())
    centered = bool(opt.defaults.get("centered", False))
    train(net, [opt], 2)
    # Full diagonalisation first: growing a new group in space 1 makes layer 2 non-diagonalisable.
    order = ["diagonalise_full_single_group", "grow_into_group", "diagonalise_left", "shrink_across_groups",
             "grow_new_group", "remove_group", "grow_new_group_single"]
    assert sorted(order) == sorted(GROUPED_OPS)
    for name in order:
        before = snapshot(net, [opt])
        GROUPED_OPS[name](net, opt)
        check_structure(net, [opt], before)
        check_training_continues(net, [opt], centered, steps=2)
    # 8 + 2 - 4; 7 + 1; 6; 5 + 2 - |group 1| (2)
    assert net.hidden_widths == [6, 8, 6, 5]
    assert [net.space(i).groups() for i in range(4)] == [3, 2, 1, 3]


# ---------------------------------------------------------------------------- bad input
def _state_copy(net: nn.Module, opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, object]]]:
    tensors = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
             for p in net.parameters()]
    return tensors, state


def _assert_unchanged(net: nn.Module, opt: torch.optim.Optimizer, saved) -> None:
    tensors, state = saved
    now = net.state_dict()
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"{k} changed"
    for p, old in zip(net.parameters(), state):
        now_state = opt.state.get(p, {})
        assert now_state.keys() == old.keys()
        for k, v in old.items():
            assert torch.equal(now_state[k], v) if isinstance(v, torch.Tensor) else now_state[k] == v


@pytest.fixture
def trained():
    net = il.IsotropicMLP([4, 6, 5, 3], partitions=[[1, 0, 1, 0, 2, 2], [0] * 5], length="trainable",
                          psi="trainable").double()
    _perturb(net, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, [opt], 2)
    return net, opt


@pytest.mark.parametrize("group", [3, -1, "x", True, 1.0, "New"])
def test_grow_rejects_bad_group(trained, group):
    net, opt = trained
    saved = _state_copy(net, opt)
    with pytest.raises(ValueError, match="`group`"):
        net.grow(0, 1, group=group, optimizer=opt)
    _assert_unchanged(net, opt, saved)


@pytest.mark.parametrize("group", [3, -1, "x", True])
def test_remove_group_rejects_bad_group(trained, group):
    net, opt = trained
    saved = _state_copy(net, opt)
    with pytest.raises(ValueError, match="`group`"):
        net.remove_group(0, group, optimizer=opt)
    _assert_unchanged(net, opt, saved)


@pytest.mark.parametrize("group", [None, 0])
def test_remove_group_on_single_group_space_is_refused(trained, group):
    net, opt = trained
    saved = _state_copy(net, opt)
    with pytest.raises(ValueError, match="group"):
        net.remove_group(1, group, optimizer=opt)
    _assert_unchanged(net, opt, saved)


def test_remove_group_on_single_group_space_names_the_argument(trained):
    net, _ = trained
    with pytest.raises(ValueError, match=r"`(layer|group)`"):
        net.remove_group(1)


# ---------------------------------------------------------------------------- a chain of grouped operations
@settings(max_examples=60, **FAST)
@given(case=grouped_cases(min_width=2, max_width=12, dtypes=(torch.float64,), lengths=("constant", "trainable"),
                          psis=("constant", "trainable", "decay")),
       ops=st.lists(st.sampled_from(["grow", "grow_new", "diag", "shrink_zero", "remove_zero_group"]),
                    min_size=2, max_size=6),
       data=st.data())
def test_chain_of_grouped_operations_stays_exact_and_consistent(case, ops, data):
    """Operations feed on each other's results (relabelled groups, grown groups, folded o and psi):
    each one is exact and the network still equals the explicit group loop afterwards."""
    net, x = _build(case)
    g = torch.Generator().manual_seed(case["seed"] + 5)
    for step, op in enumerate(ops):
        layer = data.draw(st.integers(0, net.num_hidden - 1), label=f"layer{step}")
        space = net.space(layer)
        m = space.groups()
        if op == "shrink_zero":
            # Grown neurons have zero rows until they train: plant among the neurons with non-zero rows
            # of a group that has another one, so that the rotation can hide the planted zero.
            norms = space.incoming_matrix().to(torch.float64).flatten(1).norm(dim=1)
            live = norms > 1e-8 * float(norms.max())  # a diagonalised rank-deficient group has ~1e-17 rows
            index = _index(net, layer)
            big = [k for k in range(m) if int((live & (index == k)).sum()) >= 2]
            if not big:
                continue
            group = data.draw(st.sampled_from(big), label=f"group{step}")
            members = torch.nonzero(live & (index == group)).flatten().tolist()
            _plant_constant_neuron(net, layer, data.draw(st.sampled_from(members), label=f"index{step}"), 1.0, g)
            if _nonzero_condition(net.singular_values(layer), torch.float64) > MAX_CONDITION_FOR_BOUND[torch.float64]:
                continue
        elif op == "remove_zero_group":
            if m < 2:
                continue
            group = data.draw(st.integers(0, m - 1), label=f"group{step}")
            rows = torch.nonzero(_index(net, layer) == group).flatten()
            with torch.no_grad():
                net.layers[layer].weight[rows] = 0.0
                if net.layers[layer].correction is not None:
                    net.layers[layer].correction[rows] = 0.0
        before = _out(net, x)
        if op == "grow":
            net.grow(layer, 2, group=data.draw(st.integers(0, m - 1), label=f"group{step}"), generator=g)
        elif op == "grow_new":
            net.grow(layer, 2, group="new", generator=g)
        elif op == "diag":
            net.diagonalise(layer, "left")
        elif op == "shrink_zero":
            net.shrink(layer, 1)
        else:
            report = net.remove_group(layer, group)
            assert report.exact
        _assert_preserved(before, _out(net, x))
        index = _index(net, layer)
        assert sorted(set(index.tolist())) == list(range(net.space(layer).groups()))  # labels stay 0..m-1
    _assert_reference(net, x)
