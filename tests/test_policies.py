"""Topology policies: decisions against hand-computed expectations, clamps, cooldown, state."""

import numpy as np
import pytest
import torch

from iso_lightning import IsotropicMLP
from iso_lightning.policies import (
    CompositePolicy,
    LossPlateauPolicy,
    ParameterBudgetPolicy,
    PolicyContext,
    ScaffoldPolicy,
    SpaceInfo,
    WidthSchedulePolicy,
    apply_decision,
    describe,
)


def info(name, sigma, out=None, per_neuron=10):
    sigma = torch.tensor(sigma, dtype=torch.float64)
    out = torch.ones_like(sigma) if out is None else torch.tensor(out, dtype=torch.float64)
    return SpaceInfo(name, sigma.numel(), sigma, out, 1, per_neuron)


def spaces(**widths_sigmas):
    return {name: info(name, s) for name, s in widths_sigmas.items()}


# ---------------------------------------------------------------------------- describe / apply
def test_describe_matches_numpy_svd_and_outgoing_norms():
    torch.manual_seed(0)
    net = IsotropicMLP([5, 7, 4, 3], psi="trainable").double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    snap = describe(net)
    assert list(snap) == ["hidden.0", "hidden.1"]
    for layer, name in enumerate(snap):
        a = net.space(layer).incoming_matrix().numpy()
        u, s, _ = np.linalg.svd(a, full_matrices=True)
        expected = np.zeros(a.shape[0])
        expected[: s.size] = s
        torch.testing.assert_close(snap[name].singular_values, torch.from_numpy(expected), atol=1e-12, rtol=0)
        w_out = net.layers[layer + 1].weight.detach().numpy()
        # Column norms of W_{l+1} U, matched by singular value order. Inside the null space
        # (hidden.0 is wider than its input) the basis is arbitrary: only the total is defined.
        norms = np.linalg.norm(w_out @ u, axis=0)
        got = snap[name].out_norms.numpy()
        distinct = s.size if a.shape[0] > a.shape[1] else a.shape[0]
        np.testing.assert_allclose(got[:distinct], norms[:distinct], atol=1e-12, rtol=0)
        np.testing.assert_allclose((got[distinct:] ** 2).sum(), (norms[distinct:] ** 2).sum(), atol=1e-12)
        assert snap[name].width == net.hidden_widths[layer]
    # One neuron of hidden.0: a row of W_0 (5), a bias, a column of W_1 (4); psi of layer 1 is per group.
    assert snap["hidden.0"].params_per_neuron == 5 + 1 + 4
    # hidden.1 also has a correction row (1 group in hidden.0) and a column of W_2 (3).
    assert snap["hidden.1"].params_per_neuron == 7 + 1 + 1 + 3


def test_apply_decision_resizes_last_layer_first():
    net = IsotropicMLP([4, 6, 5, 3])
    reports = apply_decision(net, {"hidden.0": 8, "hidden.1": 3})
    assert net.hidden_widths == [8, 3]
    assert [r.space for r in reports] == ["hidden.1", "hidden.0"]
    with pytest.raises(ValueError, match="hidden"):
        apply_decision(net, {"encoder.0": 3})


# ---------------------------------------------------------------------------- scaffold
@pytest.mark.parametrize(
    ("sigma", "scaffold", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 2, 6),  # none below: grow by 2
        ([1.0, 1.0, 0.5, 0.1], 2, None),  # exactly 2 below: unchanged
        ([1.0, 0.9, 0.5, 0.1], 1, 2),  # 3 below, keep 1: shrink 2
        ([0.1, 0.1, 0.1], 5, 5),  # 3 below, want 5: grow 2
    ],
)
def test_scaffold_rule(sigma, scaffold, expected):
    decision = ScaffoldPolicy(threshold=0.95, scaffold=scaffold).decide(spaces(a=sigma), PolicyContext())
    assert decision == ({} if expected is None else {"a": expected})


def test_scaffold_score_with_outgoing_norm():
    s = {"a": info("a", [1.0, 1.0, 1.0], out=[1.0, 0.5, 0.1])}
    # scores 1.0, 0.5, 0.1: two below 0.95 -> with scaffold 2 nothing changes; by singular value, grow 2.
    assert ScaffoldPolicy(0.95, 2, score="singular_value_x_out_norm").decide(s, PolicyContext()) == {}
    assert ScaffoldPolicy(0.95, 2).decide(s, PolicyContext()) == {"a": 5}


def test_min_max_width_patterns_and_space_selection():
    s = spaces(**{"enc.hidden.0": [1.0] * 4, "dec.hidden.0": [0.1] * 6})
    policy = ScaffoldPolicy(0.95, 5, max_width={"enc.*": 7}, min_width=3)
    assert policy.decide(s, PolicyContext()) == {"enc.hidden.0": 7, "dec.hidden.0": 5}
    only_dec = ScaffoldPolicy(0.95, 0, spaces=["dec.*"], min_width=3)
    assert only_dec.decide(s, PolicyContext()) == {"dec.hidden.0": 3}


def test_cooldown_skips_recently_changed_spaces_and_survives_state_dict():
    s = spaces(a=[1.0] * 4)
    policy = ScaffoldPolicy(0.95, 1, cooldown=2)
    assert policy.decide(s, PolicyContext()) == {"a": 5}
    assert policy.decide(s, PolicyContext()) == {}
    state = policy.state_dict()
    fresh = ScaffoldPolicy(0.95, 1, cooldown=2)
    fresh.load_state_dict(state)
    assert fresh.decide(s, PolicyContext()) == {}
    assert fresh.decide(s, PolicyContext()) == {"a": 5}


# ---------------------------------------------------------------------------- schedule
def test_width_schedule_is_linear_between_epochs():
    policy = WidthSchedulePolicy(targets=20, start_epoch=2, end_epoch=6)
    widths = []
    current = 10
    for epoch in range(9):
        decision = policy.decide(spaces(a=[1.0] * current), PolicyContext(epoch=epoch))
        current = decision.get("a", current)
        widths.append(current)
    # 10 until epoch 2, then 10 + (epoch - 2) / 4 * 10, then held at 20.
    assert widths == [10, 10, 10, 12, 15, 18, 20, 20, 20]


# ---------------------------------------------------------------------------- plateau
def test_loss_plateau_grows_after_patience_and_shrinks_surplus_otherwise():
    policy = LossPlateauPolicy(monitor="val_loss", patience=1, grow_by=3, threshold=0.95, scaffold=1)
    s = spaces(a=[1.0, 0.5, 0.2, 0.1])  # 3 below threshold, scaffold 1 -> shrink to 2 when improving
    assert policy.decide(s, PolicyContext(metrics={"val_loss": 1.0})) == {"a": 2}
    assert policy.decide(s, PolicyContext(metrics={"val_loss": 1.0})) == {"a": 2}  # wait 1 <= patience
    assert policy.decide(s, PolicyContext(metrics={"val_loss": 1.0})) == {"a": 7}  # plateau: grow by 3
    with pytest.raises(ValueError, match=r"`val_acc`.*\['val_loss'\].*`monitor`"):
        LossPlateauPolicy(monitor="val_acc").decide(s, PolicyContext(metrics={"val_loss": 1.0}))


# ---------------------------------------------------------------------------- budget / composite
def test_parameter_budget_cuts_growth_from_the_last_space():
    s = {"a": info("a", [1.0] * 4, per_neuron=10), "b": info("b", [1.0] * 4, per_neuron=10)}
    inner = ScaffoldPolicy(0.95, 5)  # wants +5 on both: +100 parameters
    policy = ParameterBudgetPolicy(inner, max_parameters=1060)
    decision = policy.decide(s, PolicyContext(total_params=1000))
    grown = sum((decision.get(n, s[n].width) - s[n].width) * 10 for n in s)
    assert grown <= 60 and decision["a"] == 9 and decision["b"] == 5


def test_parameter_budget_shrinks_when_already_over():
    s = {"a": info("a", [1.0] * 6, per_neuron=10)}
    policy = ParameterBudgetPolicy(ScaffoldPolicy(0.95, 0), max_parameters=1000)
    assert policy.decide(s, PolicyContext(total_params=1025)) == {"a": 3}


def test_composite_combines_proposals():
    s = spaces(a=[1.0] * 4)
    grow, hold = ScaffoldPolicy(0.95, 3), WidthSchedulePolicy(targets=2, start_epoch=0, end_epoch=1)
    assert CompositePolicy([grow, hold], combine="max").decide(s, PolicyContext(epoch=1)) == {"a": 7}
    grow2, hold2 = ScaffoldPolicy(0.95, 3), WidthSchedulePolicy(targets=2, start_epoch=0, end_epoch=1)
    assert CompositePolicy([grow2, hold2], combine="min").decide(s, PolicyContext(epoch=1)) == {"a": 2}


# ---------------------------------------------------------------------------- a real run
def test_scaffold_policy_drives_a_training_run_both_ways():
    torch.manual_seed(0)
    net = IsotropicMLP([8, 6, 6, 3], psi="decay", length="trainable")
    opt = torch.optim.AdamW(net.parameters(), lr=3e-2)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    policy = ScaffoldPolicy(threshold=0.95, scaffold=2, max_width=12)
    seen_grow = seen_shrink = False
    losses = []
    for epoch in range(12):
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y) + net.regularisation()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        for report in apply_decision(net, policy.decide(describe(net), PolicyContext(epoch=epoch)), optimizer=opt):
            seen_grow |= report.new_width > report.old_width
            seen_shrink |= report.new_width < report.old_width
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
    assert seen_grow and seen_shrink
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ScaffoldPolicy(threshold=0), "`threshold`"),
        (lambda: ScaffoldPolicy(scaffold=-1), "`scaffold`"),
        (lambda: ScaffoldPolicy(score="norm"), "`score`"),
        (lambda: ScaffoldPolicy(cooldown=-1), "`cooldown`"),
        (lambda: ScaffoldPolicy(min_width=0), "`min_width`"),
        (lambda: ScaffoldPolicy(max_width={"a": "x"}), "`max_width`"),
        (lambda: ScaffoldPolicy(spaces="hidden.0"), "`spaces`"),
        (lambda: WidthSchedulePolicy(targets=0), "`targets`"),
        (lambda: WidthSchedulePolicy(targets=4, start_epoch=3, end_epoch=3), "`end_epoch`"),
        (lambda: WidthSchedulePolicy(targets=4, start_epoch=-1), "`start_epoch`"),
        (lambda: LossPlateauPolicy(mode="avg"), "`mode`"),
        (lambda: LossPlateauPolicy(patience=-1), "`patience`"),
        (lambda: LossPlateauPolicy(grow_by=0), "`grow_by`"),
        (lambda: LossPlateauPolicy(monitor=""), "`monitor`"),
        (lambda: LossPlateauPolicy(min_delta=-1.0), "`min_delta`"),
        (lambda: ParameterBudgetPolicy(object(), 10), "`policy`"),
        (lambda: ParameterBudgetPolicy(ScaffoldPolicy(), 0), "`max_parameters`"),
        (lambda: CompositePolicy([]), "`policies`"),
        (lambda: CompositePolicy([ScaffoldPolicy()], combine="avg"), "`combine`"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_grouped_spaces_are_never_asked_below_their_group_count():
    # Every group keeps a neuron, so a space of m groups cannot shrink below m; a space of single-neuron
    # groups loses whole neurons instead (at most `max_shrink` of them in one decision).
    net = IsotropicMLP([6, 4, 3], group_size=1)
    with torch.no_grad():
        net.layers[0].weight.mul_(0.5)  # every singular value below the threshold
    with pytest.warns(UserWarning, match="clipped to 2"):
        decision = ScaffoldPolicy(threshold=0.95, scaffold=1).decide(describe(net), PolicyContext())
    assert decision == {"hidden.0": 2}
    pairs = IsotropicMLP([6, 6, 3], group_size=2)
    with torch.no_grad():
        pairs.layers[0].weight.mul_(0.5)
    decision = ScaffoldPolicy(threshold=0.95, scaffold=0).decide(describe(pairs), PolicyContext())
    assert decision == {"hidden.0": 3}
    apply_decision(pairs, decision)
    assert pairs.hidden_widths == [3]
