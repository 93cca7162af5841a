"""Numerical hazards: extreme scales, rank deficiency, repeated singular values, width-1 layers,
non-finite gradients at an adaptation point."""

from types import SimpleNamespace

import pytest
import torch

from iso_lightning import DynamicTopologyCallback, IsotropicMLP, NonFiniteError, ScaffoldPolicy, describe
from iso_lightning.mixin import IsotropicModuleMixin

torch.set_num_threads(1)


def net_with(scale=1.0, sizes=(6, 8, 7, 3), seed=0):
    torch.manual_seed(seed)
    net = IsotropicMLP(list(sizes), psi="trainable", length="trainable").double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for layer in net.layers:
            layer.weight.mul_(scale)
    return net


def rel_change(net, op, x):
    before = net(x).detach()
    op()
    after = net(x).detach()
    return float((after - before).abs().max()) / max(float(before.abs().max()), 1e-300)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_extreme_weight_scales_keep_exact_operations_exact(scale):
    net = net_with(scale)
    x = torch.randn(32, 6, dtype=torch.float64)
    # Relative bounds: at these scales the outputs themselves are ~scale-sized or saturated.
    assert rel_change(net, lambda: net.grow(0, 3), x) <= 1e-10
    assert rel_change(net, lambda: net.diagonalise(1), x) <= 1e-10
    assert rel_change(net, lambda: net.diagonalise(1, "full"), x) <= 1e-10
    report = net.shrink(1, 2)
    assert torch.isfinite(report.singular_values).all() and report.error_estimate >= 0
    for info in describe(net).values():
        assert torch.isfinite(info.singular_values).all()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_rank_deficient_layer_sheds_its_null_space_exactly():
    net = net_with(sizes=(3, 9, 4, 2))  # hidden.0: 9 rows of rank 3 -> six zero singular values
    x = torch.randn(32, 3, dtype=torch.float64)
    sigma = net.singular_values(0)
    assert int((sigma < 1e-12).sum()) == 6
    with torch.no_grad():
        net.layers[0].bias.zero_()  # a zero bias: removal is exact even without folds
    change = rel_change(net, lambda: net.shrink(0, 6), x)
    assert change <= 1e-10 and net.hidden_widths[0] == 3


def test_repeated_singular_values_are_handled():
    net = IsotropicMLP([8, 8, 8, 3], psi="trainable", length="trainable").double()  # orthogonal: all 1
    # The orthogonal init is drawn in float32: singular values are 1 to ~1e-7.
    one = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(net.singular_values(0), one, atol=1e-6, rtol=0)
    x = torch.randn(16, 8, dtype=torch.float64)
    assert rel_change(net, lambda: net.diagonalise(0), x) <= 1e-12
    assert rel_change(net, lambda: net.diagonalise(1, "full"), x) <= 1e-12
    report = net.shrink(0, 3)
    torch.testing.assert_close(report.singular_values, one[:3], atol=1e-6, rtol=0)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_width_one_layers():
    net = net_with(sizes=(4, 1, 1, 2))
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="`n`"):
        net.shrink(0, 1)
    assert rel_change(net, lambda: net.diagonalise(0), x) <= 1e-12
    assert rel_change(net, lambda: net.diagonalise(1, "full"), x) <= 1e-12
    assert rel_change(net, lambda: net.grow(1, 2), x) <= 1e-12
    assert net.hidden_widths == [1, 3]


class Holder(IsotropicModuleMixin, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net_with()


def fake_trainer():
    return SimpleNamespace(is_global_zero=True, global_step=7, current_epoch=1, callback_metrics={}, optimizers=[],
                           strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))


@pytest.mark.parametrize("where", ["weight", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_callback_never_operates_on_non_finite_state(where, value):
    module = Holder()
    x = torch.randn(4, 6, dtype=torch.float64)
    module.net(x).sum().backward()
    target = module.net.layers[2].weight
    with torch.no_grad():
        (target if where == "weight" else target.grad)[0, 0] = value
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=10.0, scaffold=0), verbose=0)  # wants to shrink
    callback._bind(module)
    with pytest.warns(RuntimeWarning, match="net"):
        callback._adapt(fake_trainer(), module)
    assert callback.skipped and not callback.events
    for key, value_before in before.items():
        torch.testing.assert_close(module.state_dict()[key], value_before, equal_nan=True)
    strict = DynamicTopologyCallback(ScaffoldPolicy(threshold=10.0, scaffold=0), on_nonfinite="raise")
    strict._bind(module)
    with pytest.raises(NonFiniteError, match="net"):
        strict._adapt(fake_trainer(), module)

