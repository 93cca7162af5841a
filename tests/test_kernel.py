"""The compiled kernel of the tanh isotropic activation against float64 PyTorch, and its fallbacks."""

import logging
import shutil
import subprocess

import pytest
import torch

from iso_lightning import _kernel
from iso_lightning.functional import isotropic_with_scale


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel looked up again, built into an empty cache; the normal one is restored afterwards."""
    monkeypatch.setenv("ISO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ISO_LIGHTNING_KERNEL", raising=False)
    _kernel.reset()
    yield
    monkeypatch.undo()
    _kernel.reset()


@pytest.fixture
def calls(monkeypatch):
    """Counts the forward calls the kernel answered (not the ones it handed back to PyTorch)."""
    answered = []
    real = _kernel.forward

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(_kernel, "forward", counting)
    return answered


def _reference(z, dim, length=None, gs_weight=None, gh=None):
    """h, s and the gradients of sum(h * gh) + sum(s * gs_weight), in float64 from PyTorch operations."""
    zd = z.detach().double().requires_grad_()
    ld = None if length is None else length.detach().double().requires_grad_()
    h, s = isotropic_with_scale(zd, dim, "tanh", length=ld, fused=False)
    loss = (h * gh.double()).sum() + (0 if gs_weight is None else (s * gs_weight.double()).sum())
    loss.backward()
    return h, s, zd.grad, None if ld is None else ld.grad


def _kernel_result(z, dim, length=None, gs_weight=None, gh=None):
    zf = z.detach().float().requires_grad_()
    lf = None if length is None else length.detach().float().requires_grad_()
    h, s = isotropic_with_scale(zf, dim, "tanh", length=lf)
    loss = (h * gh).sum() + (0 if gs_weight is None else (s * gs_weight).sum())
    loss.backward()
    return h, s, zf.grad, None if lf is None else lf.grad


def _close(got, want, what):
    scale = float(want.detach().abs().max()) or 1.0
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=5e-7 * scale, msg=what)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on this machine")
def test_the_kernel_builds_and_passes_its_self_test_where_a_compiler_exists(fresh_kernel):
    assert _kernel.available()


LAYOUTS = [
    ((64, 37), -1),  # one group over the last axis, a width not a multiple of the unrolling
    ((3, 5, 8, 16), -2),  # the blocked layout of a grouped FFN
    ((2, 6, 5, 5), 1),  # one group over an image's channels
    ((4, 3, 1500), 1),  # more groups than the kernel's chunk
]


@pytest.mark.parametrize("shape,dim", LAYOUTS)
@pytest.mark.parametrize("scale", [0.02, 0.7, 5.0])  # the series branch, the middle, the saturated end
def test_kernel_values_and_gradients_match_float64(shape, dim, scale, calls):
    if not _kernel.available():
        pytest.skip("the compiled kernel is unavailable here")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(*shape, generator=g) * scale
    gh = torch.randn(*shape, generator=g)
    s_shape = list(shape)
    s_shape[dim] = 1
    gs = torch.randn(*s_shape, generator=g)
    got = _kernel_result(z, dim, gs_weight=gs, gh=gh)
    want = _reference(z, dim, gs_weight=gs, gh=gh)
    assert calls and all(calls)
    for a, b, what in zip(got[:3], want[:3], ("h", "s", "dL/dz")):
        _close(a, b, what)


def test_kernel_with_an_intrinsic_length_and_mixed_small_and_zero_groups(calls):
    if not _kernel.available():
        pytest.skip("the compiled kernel is unavailable here")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 24, 10, generator=g)
    z[0] *= 0.01  # small radii (series branch) beside large ones in one call
    z[1, :, 3] = 0.0  # a group at exactly zero
    gh = torch.randn(4, 24, 10, generator=g)
    for length in (torch.tensor([0.0]), torch.tensor([0.3])):
        got = _kernel_result(z, 1, length, gh=gh)
        want = _reference(z, 1, length, gh=gh)
        for a, b, what in zip(got, want, ("h", "s", "dL/dz", "dL/do")):
            _close(a, b, what)
    assert calls and all(calls)


def test_overflowing_and_non_finite_inputs_take_the_pytorch_route(calls):
    if not _kernel.available():
        pytest.skip("the compiled kernel is unavailable here")
    z = torch.randn(3, 16)
    z[1] *= 1e20  # its squared norm overflows float32
    gh = torch.randn(3, 16)
    got = _kernel_result(z, -1, gh=gh)
    want = _reference(z, -1, gh=gh)
    assert calls == [False]  # handed back
    for a, b, what in zip(got[:3], want[:3], ("h", "s", "dL/dz")):
        assert bool(torch.isfinite(a).all())
        _close(a, b, what)
    z[1] = float("nan")
    h, s = isotropic_with_scale(z, -1, "tanh")
    assert calls[-1] is False and bool(torch.isnan(h[1]).all()) and bool(torch.isfinite(h[[0, 2]]).all())


def test_threads_split_the_work_without_changing_a_bit():
    if not _kernel.available():
        pytest.skip("the compiled kernel is unavailable here")
    z = torch.randn(512, 8, 64)  # above PARALLEL_ELEMENTS
    assert z.numel() >= _kernel.PARALLEL_ELEMENTS
    gh = torch.randn(512, 8, 64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(_kernel_result(z, 1, gh=gh))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,dim", LAYOUTS)
def test_disabled_kernel_falls_back_to_pytorch_operations_and_says_so(fresh_kernel, monkeypatch, caplog, calls,
                                                                      shape, dim):
    monkeypatch.setenv("ISO_LIGHTNING_KERNEL", "0")
    g = torch.Generator().manual_seed(3)
    z, gh = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    with caplog.at_level(logging.INFO, logger="iso_lightning"):
        got = _kernel_result(z, dim, gh=gh)
    assert not _kernel.available() and calls == [False]
    assert "disabled by ISO_LIGHTNING_KERNEL" in caplog.text
    for a, b, what in zip(got[:3], _reference(z, dim, gh=gh)[:3], ("h", "s", "dL/dz")):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-6 * float(b.detach().abs().max()),
                                   msg=what)


def test_a_failing_compiler_falls_back(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with caplog.at_level(logging.INFO, logger="iso_lightning"):
        assert not _kernel.available()
    assert "the build failed" in caplog.text
    h, _ = isotropic_with_scale(torch.ones(2, 4), -1, "tanh")
    torch.testing.assert_close(h, torch.full((2, 4), float(torch.tanh(torch.tensor(2.0))) / 2))


def test_a_kernel_that_fails_its_self_test_is_not_used(fresh_kernel, monkeypatch):
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(_kernel, "_self_test", lambda lib: False)
    assert not _kernel.available()


def test_a_built_kernel_is_loaded_from_the_cache_without_a_compiler(fresh_kernel, monkeypatch):
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert _kernel.available()
    _kernel.reset()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache holds the library")

    monkeypatch.setattr(subprocess, "run", no_build)
    assert _kernel.available()
