"""Removing neurons whose incoming rows are exactly zero (grown and not trained yet).

Such a neuron is a null direction of the incoming matrix: ``shrink`` removes it without a
decomposition and without rotating the other neurons. References: the kept neurons' tensors and
optimizer state compared bit for bit with their values before the removal, the outputs with the
outputs before it (float32 round-off: a group norm sums one zero fewer), and the general route
(rotation) on the same network where there are fewer zero rows than removals.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_unchanged, snapshot

from iso_lightning import IsotropicMLP, NonFiniteError, linalg
from iso_lightning.spaces import NeuronSpace


def _trained(group_size=None, seed=0):
    torch.manual_seed(seed)
    net = IsotropicMLP([12, 8, 6, 3], psi="decay", length="trainable", group_size=group_size)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(32, 12)
    for _ in range(4):
        _step(net, opt, x)
    return net, opt, x


def _step(net, opt, x):
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    opt.step()


def _no_decomposition(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a removal of zero rows must not decompose the incoming matrix")

    monkeypatch.setattr(linalg, "_weakest_float32", refuse)
    monkeypatch.setattr(linalg, "gram", refuse)
    monkeypatch.setattr(torch.linalg, "svd", refuse)


def test_zero_rows_are_found_from_every_incoming_part():
    net, _, _ = _trained()
    space: NeuronSpace = net.space(1)  # incoming: the weight and the correction psi
    assert space.zero_rows().tolist() == []
    net.grow(1, 3)
    assert space.zero_rows().tolist() == [6, 7, 8]
    with torch.no_grad():  # a zero first entry alone does not make a zero row ...
        net.layers[1].weight[2, 0] = 0.0
        net.layers[1].weight[7, 5] = 1.0  # ... and one non-zero entry anywhere makes a row non-zero
    assert space.zero_rows().tolist() == [6, 8]
    with torch.no_grad():
        net.layers[1].correction[8, 0] = 0.5  # the correction is part of the incoming matrix
    assert space.zero_rows().tolist() == [6]


@pytest.mark.parametrize("n", [1, 2])
def test_grown_neurons_are_removed_without_rotating_the_others(monkeypatch, n):
    net, opt, x = _trained()
    net.grow(0, 2, optimizer=opt)
    before = net(x).detach()
    kept = {name: p.detach().clone() for name, p in net.named_parameters()}
    state = {name: {k: v.clone() for k, v in opt.state[p].items() if v.dim()} for name, p in net.named_parameters()}
    storage = net.layers[0].weight.untyped_storage().data_ptr()
    _no_decomposition(monkeypatch)
    report = net.shrink(0, n, optimizer=opt)
    assert report.exact and report.new_width == 10 - n
    assert report.singular_values.tolist() == [0.0] * n
    assert report.error_estimate == 0.0 and report.details["residual"] == 0.0
    # The last grown rows go: the first 10 - n rows of every tensor stay as they were, bit for bit,
    # in the same storage (a narrow view, not a copy).
    assert torch.equal(net.layers[0].weight, kept["layers.0.weight"][: 10 - n])
    assert torch.equal(net.layers[1].weight, kept["layers.1.weight"][:, : 10 - n])
    assert net.layers[0].weight.untyped_storage().data_ptr() == storage
    for name, p in net.named_parameters():
        for key, value in opt.state[p].items():
            if value.dim():
                old = state[name][key]
                expected = old[: 10 - n] if name.startswith("layers.0") and old.shape[0] == 10 else old
                if name == "layers.1.weight":
                    expected = old[:, : 10 - n]
                assert torch.equal(value, expected), (name, key)
    torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)
    _step(net, opt, x)  # the same optimizer keeps training
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_fewer_zero_rows_than_removals_take_the_rotation():
    net, opt, x = _trained()
    reference, ref_opt, _ = _trained()
    for model, o in ((net, opt), (reference, ref_opt)):
        model.grow(0, 1, optimizer=o)
    # The general route on an untouched copy: the same two removed singular values (0 and the
    # smallest of the trained layer), from a float64 SVD of the incoming matrix.
    sigma = torch.linalg.svdvals(reference.space(0).incoming_matrix().double())
    report = net.shrink(0, 2, optimizer=opt)
    assert report.singular_values[0].item() == pytest.approx(0.0, abs=1e-6)
    assert report.singular_values[1].item() == pytest.approx(float(sigma[-2]), rel=1e-4)
    assert not torch.equal(net.layers[0].weight, reference.layers[0].weight[:7])  # rotated


def test_grouped_space_keeps_a_neuron_in_every_group():
    net, opt, x = _trained(group_size=4)  # two groups of four
    net.grow(0, 2, optimizer=opt)  # one new neuron in each group
    index = net.space(0).group_index()
    zero = net.space(0).zero_rows()
    assert sorted(index[zero].tolist()) == [0, 1]
    before = net(x).detach()
    report = net.shrink(0, 2, optimizer=opt)
    assert report.exact
    assert torch.bincount(net.space(0).group_index()).tolist() == [4, 4]
    torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)


def test_a_group_that_is_one_zero_row_is_not_emptied():
    torch.manual_seed(0)
    net = IsotropicMLP([6, 4, 3], psi="none", length="none", group_size=2)
    net.grow(0, 1, group="new")  # a group of its own, one zero row: it must keep that neuron
    width = net.space(0).width
    report = net.shrink(0, 1)
    assert report.new_width == width - 1
    assert net.space(0).groups() == 3
    assert torch.bincount(net.space(0).group_index(), minlength=3).min().item() >= 1


@pytest.mark.parametrize("where", ["gradient", "exp_avg", "exp_avg_sq"])
def test_non_finite_inputs_are_still_refused_by_name(where):
    # No rotation checks the gradients and state here: they are checked before anything changes.
    net, opt, x = _trained()
    net.grow(0, 1, optimizer=opt)
    opt.zero_grad()
    net(x).pow(2).sum().backward()  # gradients present, the new row still zero (no step)
    assert net.space(0).zero_rows().tolist() == [8]
    p = net.layers[1].weight
    target = p.grad if where == "gradient" else opt.state[p][where]
    target[1, 2] = math.inf if where == "exp_avg_sq" else math.nan
    before = snapshot(net, opt)
    with pytest.raises(NonFiniteError, match="layers.1.weight"):
        net.shrink(0, 1, optimizer=opt)
    assert_unchanged(before, net, opt)
