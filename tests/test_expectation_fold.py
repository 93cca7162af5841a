"""The expectation fold: removal without psi, the removed neurons' mean output folded into the next bias."""

import pytest
import torch

from iso_lightning import IsotropicMLP


def test_expectation_fold_beats_plain_truncation_without_psi():
    """With psi off, folding the removed neurons' mean output into the next bias (the
    expectation fold) loses less than dropping them, on the inputs it was computed from."""
    import copy

    torch.manual_seed(0)
    net = IsotropicMLP([6, 10, 8, 3], psi="none", length="none").double()
    x = torch.randn(256, 6, dtype=torch.float64)
    with torch.no_grad():
        net.layers[1].bias.add_(2.0)  # hidden.1 outputs with a clear non-zero mean
    plain, folded = copy.deepcopy(net), copy.deepcopy(net)
    before = net(x).detach()
    report_plain = plain.shrink(1, 3, probe=x)
    report = folded.shrink(1, 3, probe=x, expectation=x)
    mean_err = lambda n: float((n(x).detach() - before).abs().mean())  # noqa: E731
    assert mean_err(folded) < 0.5 * mean_err(plain)
    assert report.details["expectation_fold"] and not report.exact and report.error_estimate > 0
    assert not report_plain.exact
    # The fold only touched the next bias: weights of the next layer equal the plain removal's.
    torch.testing.assert_close(folded.layers[2].weight, plain.layers[2].weight)
    with pytest.raises(ValueError, match="`expectation`"):
        net.shrink(1, 1, expectation="batch")
