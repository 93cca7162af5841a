"""Unit tests of :mod:`iso_lightning.axis` against an explicit numpy reference.

The reference is the definition in the module docstring: a transform with matrix ``M`` (``n x n'``)
maps a ``(pre, n, rest)`` view by ``X'_{pjr} = sum_i M_ij X_{pir}`` (``linear``) and by the
squared-entry matrix ``M o M`` (``quadratic``). Householder matrices are rebuilt in numpy as the
explicit product of their reflectors ``H_i = I - tau_i v_i v_i^T`` (LAPACK's ``geqrf`` convention),
never through the library's compact WY form.

Tolerances: entries are O(1) and every output sums at most ``n <= 16`` products, so float64 round-off
stays below ``16 * 2.2e-16 * |X|max``; ``1e-12`` relative is a ~100x margin. float32 views use the
float32 machine epsilon (1.2e-7) in the same way: ``1e-5`` relative.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import iso_lightning.axis as axis
from iso_lightning.axis import AxisTransform, DenseRotation, Extension, HouseholderRotation, Selection

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# ---------------------------------------------------------------------------- reference
def ref_apply(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,pir->pjr", m, x)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def householder_reference(reflectors: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """``H_1 H_2 ... H_k`` with ``v_i = e_i + reflectors[i+1:, i]`` (the ``Q`` of a QR factorisation)."""
    n, k = reflectors.shape
    q = np.eye(n)
    for i in range(k):
        v = np.zeros(n)
        v[i] = 1.0
        v[i + 1 :] = reflectors[i + 1 :, i]
        q = q @ (np.eye(n) - tau[i] * np.outer(v, v))
    return q


def make_householder(n: int, k: int, seed: int) -> Tuple[HouseholderRotation, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    qr, tau = torch.geqrf(a)
    return HouseholderRotation(qr, tau), householder_reference(qr.numpy(), tau.numpy())


def sample(shape: Tuple[int, int, int], seed: int, dtype: torch.dtype = torch.float64,
           positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x.abs() if positive else x).to(dtype)


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
    assert tuple(actual.shape) == expected.shape
    assert actual.dtype == dtype
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.detach().to(torch.float64).numpy(), expected, rtol=0, atol=TOL[dtype] * scale)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 5))
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float64, torch.float32])


# ---------------------------------------------------------------------------- DenseRotation
@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds, dtype=dtypes)
def test_dense_rotation_linear_and_quadratic(shape: Tuple[int, int, int], seed: int, dtype: torch.dtype) -> None:
    m = random_orthogonal(shape[1], np.random.default_rng(seed))
    rot = DenseRotation(torch.from_numpy(m))
    x = sample(shape, seed, dtype)
    x64 = x.to(torch.float64).numpy().copy()
    assert_close(rot.linear(x.clone()), ref_apply(m, x64), dtype)
    v = sample(shape, seed + 1, dtype, positive=True)
    out = rot.quadratic(v.clone())
    assert_close(out, ref_apply(m * m, v.to(torch.float64).numpy()), dtype)
    assert bool((out >= 0).all()), "the squared rule keeps second moments non-negative"
    assert rot.is_rotation and rot.new_size(shape[1]) == shape[1]


def test_dense_rotation_first_moment_is_exact_second_is_diagonal_of_rotated_covariance() -> None:
    # For v = x*x (a rank-one second moment), (M o M)^T v is diag(M^T diag(v) M), not (M^T x)^2.
    rng = np.random.default_rng(3)
    m = random_orthogonal(6, rng)
    rot = DenseRotation(torch.from_numpy(m))
    x = torch.from_numpy(rng.standard_normal((1, 6, 1)))
    quad = rot.quadratic((x * x).clone()).numpy()[0, :, 0]
    expected = np.diag(m.T @ np.diag((x * x).numpy()[0, :, 0]) @ m)
    np.testing.assert_allclose(quad, expected, rtol=0, atol=1e-12)
    lin = rot.linear(x.clone()).numpy()[0, :, 0]
    assert not np.allclose(quad, lin * lin), "the test vector should separate the two rules"


def test_dense_rotation_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square rotation matrix"):
        DenseRotation(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square rotation matrix"):
        DenseRotation(torch.zeros(3))


# ---------------------------------------------------------------------------- HouseholderRotation
# (n, k): k * k <= n uses the low-rank quadratic formula, k * k > n the dense fallback.
HOUSEHOLDER_CASES = [(1, 1), (5, 1), (10, 3), (9, 3), (16, 4), (4, 2), (5, 3), (7, 7), (12, 5)]


@pytest.mark.parametrize(("n", "k"), HOUSEHOLDER_CASES)
def test_householder_dense_matches_product_of_reflectors(n: int, k: int) -> None:
    rot, q = make_householder(n, k, seed=n * 31 + k)
    dense = rot.dense().numpy()
    np.testing.assert_allclose(dense, q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dense.T @ dense, np.eye(n), rtol=0, atol=1e-12)
    # its first k columns are the Q that torch.linalg.householder_product (LAPACK orgqr) builds
    g = torch.Generator().manual_seed(n * 31 + k)
    thin_q = torch.linalg.householder_product(*torch.geqrf(torch.randn(n, k, generator=g, dtype=torch.float64)))
    np.testing.assert_allclose(dense[:, :k], thin_q.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "k"), HOUSEHOLDER_CASES)
@pytest.mark.parametrize(("pre", "rest"), [(1, 1), (3, 1), (1, 4), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_householder_linear_and_quadratic(n: int, k: int, pre: int, rest: int, dtype: torch.dtype) -> None:
    rot, q = make_householder(n, k, seed=n * 31 + k)
    x = sample((pre, n, rest), seed=7, dtype=dtype)
    assert_close(rot.linear(x.clone()), ref_apply(q, x.to(torch.float64).numpy()), dtype)
    v = sample((pre, n, rest), seed=8, dtype=dtype, positive=True)
    out = rot.quadratic(v.clone())
    assert_close(out, ref_apply(q * q, v.to(torch.float64).numpy()), dtype)
    assert rot.is_rotation and rot.new_size(n) == n


@pytest.mark.parametrize(("n", "k"), [(10, 3), (9, 3), (16, 4), (30, 5), (4, 2), (2, 1)])
def test_householder_low_rank_quadratic_equals_dense(n: int, k: int) -> None:
    assert k * k <= n, "these cases must take the low-rank branch"
    rot, _ = make_householder(n, k, seed=k + 100 * n)
    dense = DenseRotation(rot.dense())
    for shape in [(1, n, 1), (3, n, 2), (2, n, 5)]:
        v = sample(shape, seed=n + k, positive=True)
        expected = dense.quadratic(v.clone()).numpy()
        assert_close(rot.quadratic(v.clone()), expected)


@pytest.mark.parametrize("k", [1, 2])
def test_householder_quadratic_keeps_moments_non_negative(k: int) -> None:
    # Directions close to coordinate axes (a just-grown neuron, eigensolver noise) give reflectors
    # that nearly swap neurons; with a zero moment in the pivot rows the low-rank form cancels to
    # small negative values, which the exact rule (M∘M, no negative entry) never produces.
    rng = torch.Generator().manual_seed(0)
    negatives_dense = 0
    for _ in range(100):
        u = torch.zeros(300, k, dtype=torch.float64)
        for j in range(k):
            u[7 + 2 * j, j] = 1.0
        u = torch.linalg.qr(u + 1e-5 * torch.randn(300, k, generator=rng, dtype=torch.float64)).Q
        rot = HouseholderRotation(*torch.geqrf(u))
        x = torch.rand(1, 300, 1, generator=rng)
        x[0, :k, 0] = 0.0
        out = rot.quadratic(x.clone())
        negatives_dense += int((DenseRotation(rot.dense()).quadratic(x.clone()) < 0).sum())
        assert bool((out >= 0).all())
        assert_close(out, ref_apply((rot.dense() ** 2).numpy(), x.double().numpy()), torch.float32)
    assert negatives_dense == 0


def test_householder_identity_reflector_is_a_no_op() -> None:
    # tau = 0 is what geqrf returns for an already-triangular column: M must be the identity.
    rot = HouseholderRotation(torch.randn(5, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    np.testing.assert_array_equal(rot.dense().numpy(), np.eye(5))
    x = sample((2, 5, 3), seed=1)
    np.testing.assert_allclose(rot.linear(x.clone()).numpy(), x.numpy(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- Selection / Extension
@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds, data=st.data())
def test_selection_matches_einsum(shape: Tuple[int, int, int], seed: int, data: st.DataObject) -> None:
    n = shape[1]
    index = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    sel = Selection(torch.tensor(index))
    m = np.eye(n)[:, index]
    x = sample(shape, seed)
    before = x.clone()
    for rule in (sel.linear, sel.quadratic):
        out = rule(x)
        np.testing.assert_array_equal(out.numpy(), ref_apply(m, x.numpy()))  # a copy of entries: exact
    assert torch.equal(x, before), "a selection must not modify its input"
    assert sel.new_size(n) == len(index) and not sel.is_rotation


def test_selection_accepts_int32_index_and_keeps_order() -> None:
    sel = Selection(torch.tensor([2, 0], dtype=torch.int32))
    x = torch.arange(6.0).reshape(1, 3, 2)
    assert torch.equal(sel.linear(x), torch.tensor([[[4.0, 5.0], [0.0, 1.0]]]))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds, count=st.integers(1, 4), with_fill=st.booleans(), dtype=dtypes)
def test_extension_matches_einsum(shape: Tuple[int, int, int], seed: int, count: int, with_fill: bool,
                                  dtype: torch.dtype) -> None:
    pre, n, rest = shape
    ext = Extension(count)
    m = np.hstack([np.eye(n), np.zeros((n, count))])
    x = sample(shape, seed, dtype)
    fill = sample((pre, count, rest), seed + 1, torch.float64) if with_fill else None
    expected = ref_apply(m, x.to(torch.float64).numpy())
    if fill is not None:
        expected[:, n:, :] = fill.to(dtype).to(torch.float64).numpy()
    for rule in (ext.linear, ext.quadratic):
        out = rule(x, fill)
        assert out.dtype == dtype, "the fill is cast to the view's dtype"
        np.testing.assert_array_equal(out.to(torch.float64).numpy(), expected)  # concatenation: exact
    assert ext.new_size(n) == n + count and not ext.is_rotation


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(), count=st.integers(1, 3),
       fill=st.sampled_from(["none", "value", "tensor"]), dtype=dtypes)
def test_extension_along_an_axis_equals_the_view_rule(dims: List[int], data: st.DataObject, count: int, fill: str,
                                                       dtype: torch.dtype) -> None:
    # The direct form on the tensor's own axis, against the (pre, n, rest) view rule checked above.
    axis_ = data.draw(st.integers(0, len(dims) - 1))
    x = sample((1, int(np.prod(dims)), 1), data.draw(seeds), dtype).reshape(dims)
    pre, n, rest = int(np.prod(dims[:axis_])), dims[axis_], int(np.prod(dims[axis_ + 1:]))
    new_shape = list(dims)
    new_shape[axis_] = count
    fill_view = {"none": torch.zeros(pre, count, rest, dtype=dtype), "value": torch.full((pre, count, rest), 0.5,
                 dtype=dtype), "tensor": sample((pre, count, rest), 7, torch.float64)}[fill]
    arg = {"none": None, "value": 0.5, "tensor": fill_view.reshape(new_shape)}[fill]
    before = x.clone()
    out, restore = Extension(count).along(x, axis_, arg)
    expected = Extension(count).linear(x.reshape(pre, n, rest), fill_view)
    assert out.dtype == dtype and list(out.shape) == list(dims[:axis_]) + [n + count] + list(dims[axis_ + 1:])
    assert torch.equal(out.reshape(pre, n + count, rest), expected)  # concatenation: exact
    assert torch.equal(x, before), "the input is left as it was"
    if axis_ == 0:  # the old entries lead the storage: the undo restores a view of the result
        assert restore is not None and restore.shape == x.shape and restore.stride() == x.stride()
        assert restore.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() and torch.equal(restore, x)
    else:
        assert restore is None


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(), dtype=dtypes)
def test_selection_along_an_axis_equals_the_view_rule(dims: List[int], data: st.DataObject, dtype: torch.dtype
                                                      ) -> None:
    axis_ = data.draw(st.integers(0, len(dims) - 1))
    n = dims[axis_]
    x = sample((1, int(np.prod(dims)), 1), data.draw(seeds), dtype).reshape(dims)
    pre, rest = int(np.prod(dims[:axis_])), int(np.prod(dims[axis_ + 1:]))
    start = data.draw(st.integers(0, n - 1))
    run = torch.arange(start, data.draw(st.integers(start + 1, n)))
    perm = torch.tensor(data.draw(st.permutations(range(n))))[: data.draw(st.integers(1, n))]
    for index in (run, perm):
        sel = Selection(index)
        out, restore = sel.along(x, axis_)
        expected = sel.linear(x.reshape(pre, n, rest))
        assert restore is None and out.is_contiguous()
        assert list(out.shape) == list(dims[:axis_]) + [index.numel()] + list(dims[axis_ + 1:])
        assert torch.equal(out.reshape(pre, index.numel(), rest), expected)
        if index is run and axis_ == 0:  # a run of leading rows: a view, no copy
            assert out.data_ptr() == x[start:].data_ptr()


def test_base_transform_is_abstract() -> None:
    t = AxisTransform()
    x = torch.zeros(1, 2, 1)
    for call in (lambda: t.new_size(2), lambda: t.linear(x), lambda: t.quadratic(x)):
        with pytest.raises(NotImplementedError):
            call()
    assert t.along(x, 1) is None, "no direct form: the caller uses the view rule"
    assert not t.is_rotation


# ---------------------------------------------------------------------------- the slab path
# (pre, n, rest, slab elements): the first two take the rest >= pre branch, the last two pre > rest.
SLAB_CASES = [
    (3, 5, 11, 40),  # step 2 over rest, last block partial
    (1, 6, 17, 1),  # step forced to 1
    (11, 5, 3, 40),  # step 2 over pre, last block partial
    (13, 4, 1, 8),  # a bias-like tensor (rest = 1), step 2
]


@pytest.mark.parametrize(("pre", "n", "rest", "slab"), SLAB_CASES)
def test_slabbed_visits_every_column_once_in_small_blocks(monkeypatch: pytest.MonkeyPatch, pre: int, n: int,
                                                          rest: int, slab: int) -> None:
    monkeypatch.setattr(axis, "_SLAB_ELEMENTS", slab)
    rng = np.random.default_rng(pre * n * rest)
    m = torch.from_numpy(rng.standard_normal((n, n)))
    blocks: List[int] = []

    def fn(mat: torch.Tensor) -> torch.Tensor:
        assert mat.shape[0] == n
        blocks.append(mat.shape[1])
        return m.T @ mat

    x = sample((pre, n, rest), seed=5)
    original = x.clone()
    expected = ref_apply(m.numpy(), x.numpy())
    out = axis._slabbed(x, fn, inplace=False)
    assert torch.equal(x, original), "the staged path leaves its input as it was"
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
    blocks.clear()
    out = axis._slabbed(x, fn, inplace=True)
    assert out.data_ptr() == x.data_ptr(), "the in-place path writes into its input"
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
    assert len(blocks) > 1, "the tensor should have been cut into slabs"
    assert sum(blocks) == pre * rest
    smaller = pre if rest >= pre else rest
    assert max(blocks) <= max(slab // n, smaller), "a slab may not exceed the element budget"


@pytest.mark.parametrize(("pre", "n", "rest", "slab"), SLAB_CASES + [(4, 16, 9, 50), (9, 16, 4, 50)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rotations_slabbed_equal_reference(monkeypatch: pytest.MonkeyPatch, pre: int, n: int, rest: int, slab: int,
                                           dtype: torch.dtype, contiguous: bool) -> None:
    monkeypatch.setattr(axis, "_SLAB_ELEMENTS", slab)
    assert pre * n * rest > slab, "the case must exercise the slab path"
    rng = np.random.default_rng(n + slab)
    m = random_orthogonal(n, rng)
    k = max(1, int(np.sqrt(n)))  # k * k <= n: the low-rank Householder quadratic
    house, q = make_householder(n, k, seed=n)
    house_dense_branch, q2 = make_householder(n, min(n, k + 1), seed=n + 1)
    transforms = [(DenseRotation(torch.from_numpy(m)), m), (house, q), (house_dense_branch, q2)]

    def fresh(seed: int, positive: bool) -> torch.Tensor:
        x = sample((rest, n, pre), seed, dtype, positive)
        if contiguous:
            return x.permute(2, 1, 0).contiguous()
        return x.permute(2, 1, 0)  # a strided (pre, n, rest) view of a (rest, n, pre) tensor

    for rot, mat in transforms:
        x = fresh(11, positive=False)
        original = x.clone()
        expected = ref_apply(mat, x.to(torch.float64).numpy())
        out = rot.linear(x)
        assert_close(out, expected, dtype)
        assert torch.equal(x, original), "a staged rotation leaves the caller's tensor as it was"
        if contiguous:
            out = rot.linear(x, inplace=True)
            assert out.data_ptr() == x.data_ptr()
            assert_close(x, expected, dtype)  # written into the caller's tensor
        v = fresh(12, positive=True)
        expected_q = ref_apply(mat * mat, v.to(torch.float64).numpy())
        assert_close(rot.quadratic(v), expected_q, dtype)
        if contiguous:
            assert_close(rot.quadratic(v.clone(), inplace=True), expected_q, dtype)


def test_slab_threshold_is_large_by_default() -> None:
    # A ~4M element budget: a (500 x 3072) weight still goes through the single-matrix path.
    assert axis._SLAB_ELEMENTS >= 1 << 20
