"""Every neuron operation completes or leaves model and optimizer bit-identical; no bad input is accepted.

One test (or parametrized group) per case of the all-or-nothing table in ``docs/RELIABILITY.md``
(cases 1-14), then a property test that draws random operations with random, often bad, arguments
on random small networks and optimizers.

"Bit-identical" is checked by :func:`snapshot`: for every parameter its object, ``requires_grad``,
shape, dtype and bytes, and those of its gradient; every buffer; every optimizer's param groups
(the same parameter objects, the same hyper-parameters) and every state entry (tensors by their
bytes, so NaN equals NaN). Failures part-way are injected with :class:`FailingWrites` (the undo
log's ``k``-th write raises, for every ``k`` an operation makes) and by making one function the
operation calls raise on its second use (``MemoryError``, ``RuntimeError``).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import pytest
import torch
from _helpers import IsoModule, assert_same, assert_unchanged, loaders, snapshot, trainer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from iso_lightning import (
    DynamicTopologyCallback,
    IsotropicConvNet,
    IsotropicMLP,
    LossPlateauPolicy,
    NonFiniteError,
    PolicyContext,
    ScaffoldPolicy,
    UnsupportedOptimizerError,
    apply_decision,
    describe,
)
from iso_lightning import operations as ops
from iso_lightning.axis import DenseRotation, Extension, Selection
from iso_lightning.checkpointing import latest_valid_checkpoint
from iso_lightning.layers import IsoLinear
from iso_lightning.mixin import TOPOLOGY_KEY
from iso_lightning.optim import OptimizerRule, register_optimizer_rule, rule_for
from iso_lightning.transaction import Transaction

#: Linux refuses an allocation larger than memory and swap unless it overcommits always (mode 1):
#: only then could a request for terabytes start filling pages instead of failing at once.
HUGE_ALLOCATIONS_FAIL = open("/proc/sys/vm/overcommit_memory").read().strip() != "1" \
    if os.path.exists("/proc/sys/vm/overcommit_memory") else False


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- models and optimizers
OPTIMIZERS: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True),
    "nadam": lambda params: torch.optim.NAdam(params, lr=1e-3),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
}
TWO = ["sgd_momentum", "adam"]


def inputs(net: nn.Module, n: int = 6, seed: int = 1) -> Tensor:
    net = getattr(net, "net", net)  # a LightningModule of the tests: its network's inputs
    g = torch.Generator().manual_seed(seed)
    if isinstance(net, IsotropicConvNet):
        return torch.randn(n, net.in_features, 5, 5, generator=g)
    return torch.randn(n, net.in_features, generator=g)


def loss(net: nn.Module, x: Tensor) -> Tensor:
    return net(x).pow(2).mean() + getattr(net, "net", net).regularisation()


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    """Real steps, so that the optimizer has state; gradients are left in place."""
    x = inputs(net)
    for _ in range(steps):
        opt.zero_grad()
        loss(net, x).backward()
        opt.step()
    opt.zero_grad()
    loss(net, x).backward()


def mlp(sizes: Sequence[int] = (4, 6, 5, 3), optimizer: str = "adam", **kwargs: Any
        ) -> Tuple[IsotropicMLP, torch.optim.Optimizer]:
    kwargs.setdefault("psi", "trainable")
    kwargs.setdefault("length", "trainable")
    net = IsotropicMLP(list(sizes), generator=torch.Generator().manual_seed(0), **kwargs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial values everywhere (biases and psi start at zero)
        for layer in net.layers:
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g))
            if isinstance(layer.correction, Tensor):
                layer.correction.copy_(0.3 * torch.randn(layer.correction.shape, generator=g))
    opt = OPTIMIZERS[optimizer](net.parameters())
    train(net, opt)
    return net, opt


def assert_healthy(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The network runs, its outputs are finite and the optimizer steps."""
    x = inputs(net)
    with torch.no_grad():
        assert bool(torch.isfinite(net(x)).all())
    opt.zero_grad()
    loss(net, x).backward()
    opt.step()
    for name, p in net.named_parameters():
        assert bool(torch.isfinite(p).all()), name
    opt.zero_grad()
    loss(net, x).backward()


def refused(call: Callable[[], Any], net: nn.Module, *optimizers: torch.optim.Optimizer,
            error: Any = ValueError, match: Optional[str] = None) -> pytest.ExceptionInfo:
    """``call`` raises ``error`` (message matching ``match``) and changes nothing; the net still works."""
    before = snapshot(net, *optimizers)
    x = inputs(net)
    with torch.no_grad():
        out = net(x).clone()
    with pytest.raises(error, match=match) as info:
        call()
    assert_unchanged(before, net, *optimizers)
    with torch.no_grad():
        assert_same(out, net(x), "output")  # bit for bit (NaN included)
    return info


# ---------------------------------------------------------------------------- failure injection
WRITES = ("replace", "set_grad", "set_item", "delete_item", "clear", "set_attr", "on_rollback")


class FailingWrites:
    """Make the undo log's ``at``-th write (0-based, over all its methods) raise ``error``; count writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int = -1, error: BaseException = MemoryError("injected")
                 ) -> None:
        self.count, self.at, self.error = 0, at, error
        for name in WRITES:
            monkeypatch.setattr(Transaction, name, self._wrap(getattr(Transaction, name)))

    def _wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def write(tx: Transaction, *args: Any, **kwargs: Any) -> Any:
            k, self.count = self.count, self.count + 1
            if k == self.at:
                raise self.error
            return method(tx, *args, **kwargs)

        return write


def second_call_raises(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, error: BaseException) -> List[int]:
    """``owner.name`` raises ``error`` on its second call (the first runs normally)."""
    original = getattr(owner, name)
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


def count_writes(build: Callable[[], Tuple[nn.Module, List[torch.optim.Optimizer]]],
                 operation: Callable[[nn.Module, List[torch.optim.Optimizer]], Any]) -> int:
    with pytest.MonkeyPatch.context() as mp:
        counter = FailingWrites(mp)
        net, optimizers = build()
        counter.count = 0
        operation(net, optimizers)
        return counter.count


def check_every_write_fails_cleanly(build: Callable[[], Tuple[nn.Module, List[torch.optim.Optimizer]]],
                                    operation: Callable[[nn.Module, List[torch.optim.Optimizer]], Any],
                                    minimum: int = 2) -> int:
    """For each write ``k`` the operation makes, a failure there leaves everything as it was."""
    total = count_writes(build, operation)
    assert total >= minimum, f"the operation made only {total} write(s)"
    for k in range(total):
        with pytest.MonkeyPatch.context() as mp:
            net, optimizers = build()
            before = snapshot(net, *optimizers)
            counter = FailingWrites(mp)
            counter.count, counter.at = 0, k
            # (resizing to a record reports a failed allocation as a ValueError naming the widths)
            with pytest.raises((MemoryError, ValueError), match="injected"):
                operation(net, optimizers)
        assert_unchanged(before, net, *optimizers)
        for opt in optimizers:
            assert_healthy(net, opt)
    return total


def _mlp_build(sizes: Sequence[int] = (4, 6, 5, 3), optimizer: str = "adam", **kwargs: Any
               ) -> Callable[[], Tuple[nn.Module, List[torch.optim.Optimizer]]]:
    def build() -> Tuple[nn.Module, List[torch.optim.Optimizer]]:
        net, opt = mlp(sizes, optimizer, **kwargs)
        return net, [opt]

    return build


DEEP = (4, 5, 6, 5, 4, 3)  # four hidden spaces: sparsify diagonalises W_1 and W_3

PART_WAY: Dict[str, Tuple[Callable[[], Tuple[nn.Module, List[torch.optim.Optimizer]]], Callable[..., Any]]] = {
    "grow": (_mlp_build(), lambda net, o: net.grow(0, 2, optimizer=o)),
    "grow_new_group": (_mlp_build(group_size=2), lambda net, o: net.grow(1, 2, group="new", optimizer=o)),
    "shrink": (_mlp_build(), lambda net, o: net.shrink(0, 2, optimizer=o)),
    "shrink_singletons": (_mlp_build(group_size=1), lambda net, o: net.shrink(1, 2, optimizer=o)),
    "shrink_expectation": (_mlp_build(psi="none"),
                           lambda net, o: net.shrink(0, 1, optimizer=o, expectation=inputs(net))),
    "set_widths_two_spaces": (_mlp_build(), lambda net, o: net.set_widths([4, 7], optimizer=o)),
    "diagonalise_left": (_mlp_build(), lambda net, o: net.diagonalise(1, optimizer=o)),
    "diagonalise_full": (_mlp_build(psi="none"), lambda net, o: net.diagonalise(1, "full", optimizer=o)),
    "sparsify": (_mlp_build(DEEP, psi="none"), lambda net, o: net.sparsify(optimizer=o)),
    "remove_group": (_mlp_build(group_size=2), lambda net, o: net.remove_group(0, 1, optimizer=o)),
    "add_inputs": (_mlp_build(), lambda net, o: net.add_inputs(2, optimizer=o, scale=0.1)),
    "remove_outputs": (_mlp_build(), lambda net, o: net.remove_outputs([0, 2], optimizer=o)),
    "sgd_set_widths": (_mlp_build(optimizer="sgd_momentum"), lambda net, o: net.set_widths([8, 3], optimizer=o)),
    "rmsprop_shrink": (_mlp_build(optimizer="rmsprop"), lambda net, o: net.shrink(1, 2, optimizer=o)),
}


@pytest.mark.parametrize("case", sorted(PART_WAY))
def test_a_failure_at_any_write_part_way_leaves_everything_unchanged(case):
    build, operation = PART_WAY[case]
    check_every_write_fails_cleanly(build, lambda net, optimizers: operation(net, optimizers[0]))


# ---------------------------------------------------------------------------- 1. set_widths is all or nothing
def test_01_set_widths_group_refusal_of_a_later_space_changes_nothing():
    net, opt = mlp((4, 6, 6, 3), group_size=2)
    refused(lambda: net.set_widths([2, 4], optimizer=opt), net, opt, match=r"`widths`.*`hidden.0` at least 3")
    assert net.hidden_widths == [6, 6]


def test_01_set_widths_with_finite_1e19_weights_in_the_first_layer():
    net, opt = mlp((4, 6, 6, 3), group_size=2)
    with torch.no_grad():
        net.layers[0].weight.fill_(1e19)
    refused(lambda: net.set_widths([2, 4], optimizer=opt), net, opt, match="`widths`")
    # A feasible request is exact on the rank-one first layer: finite everything, optimizer steps.
    net, opt = mlp((4, 6, 6, 3))
    with torch.no_grad():
        net.layers[0].weight.fill_(1e19)
    reports = net.set_widths([4, 6], optimizer=opt)
    assert net.hidden_widths == [4, 6] and reports[0].exact
    assert_healthy(net, opt)


@pytest.mark.parametrize("optimizer", TWO)
def test_01_set_widths_overflow_found_in_the_second_space_undoes_the_first(monkeypatch, optimizer):
    # hidden.1 is changed first (order rule); hidden.0's float32 Gram matrix then overflows.
    net, opt = mlp((80, 100, 100, 3), optimizer, psi="none", length="none")
    with torch.no_grad():
        net.layers[0].weight.mul_(1e20)
    counter = FailingWrites(monkeypatch)
    info = refused(lambda: net.set_widths([97, 97], optimizer=opt), net, opt, error=NonFiniteError,
                   match="`hidden.0`.*overflows")
    assert counter.count > 0, "the refusal came before any change: nothing was undone"
    assert "hidden.0" in str(info.value)


@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
def test_01_set_widths_failing_in_its_second_space_undoes_the_first(monkeypatch, error):
    net, opt = mlp()
    calls = second_call_raises(monkeypatch, ops, "resize", error)
    refused(lambda: net.set_widths([8, 3], optimizer=opt), net, opt, error=type(error), match="injected")
    assert calls[0] == 2
    assert_healthy(net, opt)


# ---------------------------------------------------------------------------- 2. grow: generator, out of memory
@pytest.mark.parametrize("generator", [42, "seed", 1.5, torch.zeros(1)])
def test_02_grow_with_a_bad_generator_changes_nothing(generator):
    net, opt = mlp((4, 6, 6, 3))
    refused(lambda: net.grow(0, 2, generator=generator, optimizer=opt), net, opt,
            match=r"`generator` to be None or a torch.Generator")
    refused(lambda: net.set_widths([8, 6], generator=generator, optimizer=opt), net, opt, match="`generator`")
    refused(lambda: net.add_outputs(1, generator=generator, optimizer=opt), net, opt, match="`generator`")
    assert_healthy(net, opt)


@pytest.mark.skipif(not HUGE_ALLOCATIONS_FAIL, reason="this kernel overcommits every allocation")
def test_02_grow_running_out_of_memory_part_way_changes_nothing():
    net = IsotropicMLP([1, 4, 2**20])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 1)
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    # The incoming rows (4 + 2**22 of them) fit; the outgoing columns (2**20 x 2**22) do not.
    before = snapshot(net, opt)
    with pytest.raises((RuntimeError, MemoryError)):
        net.grow(0, 2**22, optimizer=opt)
    assert_unchanged(before, net, opt)
    assert net.hidden_widths == [4] and net(x).shape == (2, 2**20)


@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
@pytest.mark.parametrize("optimizer", TWO)
def test_02_grow_failing_on_its_second_extension_changes_nothing(monkeypatch, error, optimizer):
    net, opt = mlp(optimizer=optimizer)
    # Dense spaces (one entry per neuron on each axis) extend along the tensors' own axes.
    second_call_raises(monkeypatch, Extension, "along", error)
    refused(lambda: net.grow(0, 2, optimizer=opt), net, opt, error=type(error), match="injected")
    monkeypatch.undo()
    assert_healthy(net, opt)


# ---------------------------------------------------------------------------- 3. shrink: expectation checked first
@pytest.mark.parametrize("expectation", [torch.randn(5, 7), torch.randn(5), torch.randn(0, 4), [[0.0] * 4],
                                         torch.randn(5, 4, 2)])
@pytest.mark.parametrize("optimizer", TWO)
def test_03_shrink_with_a_wrong_expectation_changes_nothing(monkeypatch, expectation, optimizer):
    net, opt = mlp((4, 6, 6, 3), optimizer, psi="none")
    counter = FailingWrites(monkeypatch)
    refused(lambda: net.shrink(0, 1, optimizer=opt, expectation=expectation), net, opt, match="`expectation`")
    assert counter.count == 0  # refused before the rotation, not undone after it


@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
@pytest.mark.parametrize("group_size", [None, 1])
def test_03_shrink_failing_on_its_second_selection_changes_nothing(monkeypatch, error, group_size):
    net, opt = mlp(group_size=group_size)
    second_call_raises(monkeypatch, Selection, "along", error)  # dense spaces: along the tensors' axes
    refused(lambda: net.shrink(0, 2, optimizer=opt, expectation=inputs(net)), net, opt, error=type(error),
            match="injected")


@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
@pytest.mark.parametrize("optimizer", TWO)
def test_a_diagonalisation_failing_on_its_second_rotation_changes_nothing(monkeypatch, error, optimizer):
    net, opt = mlp(optimizer=optimizer)
    calls = second_call_raises(monkeypatch, DenseRotation, "linear", error)
    refused(lambda: net.diagonalise(1, optimizer=opt), net, opt, error=type(error), match="injected")
    assert calls[0] == 2


@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
def test_a_sparsification_failing_on_its_second_diagonalisation_changes_nothing(monkeypatch, error):
    net, opt = mlp(DEEP, "sgd_momentum", psi="none")
    calls = second_call_raises(monkeypatch, ops, "diagonalise", error)
    refused(lambda: net.sparsify(optimizer=opt), net, opt, error=type(error), match="injected")
    assert calls[0] == 2
    monkeypatch.undo()
    report = net.sparsify(optimizer=opt)
    assert report.layers == [1, 3] and report.max_rel_error < 1e-4
    assert_healthy(net, opt)


# ---------------------------------------------------------------------------- 4. tampered topology records
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A Lightning checkpoint of the test module, and one saved after growth (widths [8, 7])."""
    tmp = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    model = IsoModule()
    ckpt = ModelCheckpoint(dirpath=tmp, save_last=True)
    fit = trainer(tmp, [ckpt], max_epochs=1)
    fit.fit(model, *loaders())
    model.net.set_widths([8, 7])
    fit.save_checkpoint(tmp / "grown.ckpt")
    return tmp


def _tampered(tmp_path, source, edit):
    checkpoint = torch.load(source, weights_only=False)  # a file this test wrote itself
    edit(checkpoint)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


def _trained_module() -> Tuple[IsoModule, torch.optim.Optimizer]:
    model = IsoModule()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model.net, opt)
    return model, opt


def test_04_apply_topology_with_an_impossible_record_changes_nothing():
    model, opt = _trained_module()
    record = copy.deepcopy(model.topology())
    record["spaces"]["net.hidden.0"]["width"] = 9
    record["spaces"]["net.hidden.1"]["width"] = 2**40 if HUGE_ALLOCATIONS_FAIL else 7
    bad = copy.deepcopy(record)
    bad["spaces"]["net.hidden.1"]["width"] = "7"
    refused(lambda: model.apply_topology(bad), model, opt, match=r"`net.hidden.1`.*positive int width")
    if HUGE_ALLOCATIONS_FAIL:
        refused(lambda: model.apply_topology(record), model, opt, match="could not be allocated")
    assert model.net.hidden_widths == [6, 6]


@pytest.mark.parametrize("widths", [[9, 2**40], [7, 6], [8, 8]])
def test_04_checkpoint_whose_record_does_not_match_its_weights_changes_nothing(tmp_path, checkpoint_dir, widths):
    def edit(c):
        for layer, width in enumerate(widths):
            c[TOPOLOGY_KEY]["spaces"][f"net.hidden.{layer}"]["width"] = width

    path = _tampered(tmp_path, checkpoint_dir / "grown.ckpt", edit)
    model, opt = _trained_module()
    refused(lambda: model.on_load_checkpoint(torch.load(path, weights_only=False)), model, opt,
            match="does not match its state dict")
    with pytest.raises(ValueError, match="does not match its state dict"):
        IsoModule.load_from_checkpoint(path)
    refused(lambda: trainer(tmp_path, [], max_epochs=2).fit(model, *loaders(), ckpt_path=path), model, opt,
            match="does not match its state dict")
    assert model.net.hidden_widths == [6, 6]


def test_04_a_genuine_grown_checkpoint_loads_with_its_widths(checkpoint_dir):
    loaded = IsoModule.load_from_checkpoint(checkpoint_dir / "grown.ckpt")
    assert loaded.net.hidden_widths == [8, 7]
    state = torch.load(checkpoint_dir / "grown.ckpt", weights_only=False)["state_dict"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("error", [MemoryError("injected"), RuntimeError("injected")])
def test_04_load_state_dict_failing_part_way_changes_nothing(monkeypatch, checkpoint_dir, assign, error):
    state = torch.load(checkpoint_dir / "grown.ckpt", weights_only=False)["state_dict"]
    model, opt = _trained_module()
    # The first layer's values are copied in place before the second layer fails.
    second_call_raises(monkeypatch, IsoLinear, "_load_from_state_dict", error)
    refused(lambda: model.load_state_dict(state, assign=assign), model, opt, error=type(error), match="injected")
    monkeypatch.undo()
    model.load_state_dict(state)
    assert model.net.hidden_widths == [8, 7]


def test_04_load_state_dict_failing_at_any_write_changes_nothing(checkpoint_dir):
    state = torch.load(checkpoint_dir / "grown.ckpt", weights_only=False)["state_dict"]

    def build():
        model, opt = _trained_module()
        return model, [opt]

    check_every_write_fails_cleanly(build, lambda model, _: model.load_state_dict(state))


# ---------------------------------------------------------------------------- 5. infinite scales
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0, "0.1", True])
def test_05_non_finite_or_bad_scales_are_refused(value):
    net, opt = mlp()
    refused(lambda: net.grow(0, 1, scale=value, optimizer=opt), net, opt, match=r"`scale` to be a finite number")
    refused(lambda: net.add_outputs(1, scale=value, optimizer=opt), net, opt, match="`scale`")
    refused(lambda: net.add_inputs(1, scale=value, optimizer=opt), net, opt, match="`scale`")
    for name in ("growth_scale", "psi_decay"):
        with pytest.raises(ValueError, match=rf"`{name}` to be a finite number >= 0"):
            IsotropicMLP([4, 6, 3], **{name: value})
        with pytest.raises(ValueError, match=rf"`{name}`"):
            IsotropicConvNet(1, [3], image_size=5, num_outputs=2, **{name: value})


def test_05_a_growth_scale_set_after_construction_is_still_checked():
    net, opt = mlp()
    net.growth_scale = math.inf
    refused(lambda: net.grow(0, 1, optimizer=opt), net, opt, match="`scale`")
    refused(lambda: net.resize(0, 9, optimizer=opt), net, opt, match="`scale`")
    refused(lambda: net.set_widths([9, 5], optimizer=opt), net, opt, match="`scale`")


def test_05_none_means_the_default_scale_where_there_is_one():
    net, opt = mlp()
    refused(lambda: net.add_inputs(1, scale=None, optimizer=opt), net, opt, match="`scale` to be a finite number")
    net.grow(0, 1, scale=None, optimizer=opt)  # the network's growth_scale
    net.add_outputs(1, scale=None, optimizer=opt)
    assert_healthy(net, opt)


@pytest.mark.parametrize("scale", [1e39, 1e300])
def test_05_a_finite_scale_that_overflows_float32_is_refused(scale):
    net, opt = mlp()
    refused(lambda: net.grow(0, 1, scale=scale, optimizer=opt), net, opt, error=NonFiniteError,
            match=r"non-finite values into tensor `layers.1.weight`.*too large for torch.float32")
    refused(lambda: net.add_outputs(1, scale=scale, optimizer=opt), net, opt, error=NonFiniteError,
            match="`layers.2.weight`")
    x = inputs(net)
    with torch.no_grad():
        out = net(x)
    net.grow(0, 1, scale=1e30, optimizer=opt)  # large but representable: accepted, the function unchanged
    with torch.no_grad():
        torch.testing.assert_close(net(x), out, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- 6. NaN in the expectation batch
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("group_size", [None, 1])
def test_06_an_expectation_batch_with_nan_is_refused(bad, group_size):
    net, opt = mlp(psi="none", group_size=group_size)
    batch = inputs(net)
    batch[2, 1] = bad
    refused(lambda: net.shrink(0, 1, optimizer=opt, expectation=batch), net, opt, error=NonFiniteError,
            match="`expectation` to hold finite inputs")
    report = net.shrink(0, 1, optimizer=opt, expectation=inputs(net))
    assert math.isfinite(report.error_estimate) and bool(torch.isfinite(net.layers[1].bias).all())


# ---------------------------------------------------------------------------- 7. optimizer state and gradients
STATE_KEYS = {"adam": ["exp_avg", "exp_avg_sq"], "sgd_momentum": ["momentum_buffer"],
              "rmsprop": ["square_avg", "grad_avg", "momentum_buffer"], "adamw": ["max_exp_avg_sq"],
              "adagrad": ["sum"]}
PARAMS = ["layers.0.weight", "layers.1.weight", "layers.1.correction", "layers.1.bias", "activations.0.length"]
LAYER0_OPS: Dict[str, Callable[..., Any]] = {
    "grow": lambda net, opt: net.grow(0, 1, optimizer=opt),
    "shrink": lambda net, opt: net.shrink(0, 2, optimizer=opt),
    "diagonalise": lambda net, opt: net.diagonalise(0, optimizer=opt),
    "set_widths": lambda net, opt: net.set_widths([5, 6], optimizer=opt),
    "resize": lambda net, opt: net.resize(0, 3, optimizer=opt),
}


@pytest.mark.parametrize("op", sorted(LAYER0_OPS))
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize(("optimizer", "key"), [(o, k) for o, keys in STATE_KEYS.items() for k in keys])
def test_07_nan_in_optimizer_state_is_refused(optimizer, key, param, op):
    net, opt = mlp(optimizer=optimizer)
    p = dict(net.named_parameters())[param]
    opt.state[p][key].view(-1)[0] = math.nan
    refused(lambda: LAYER0_OPS[op](net, opt), net, opt, error=NonFiniteError,
            match=rf"Optimizer state `{key}` of parameter `{param}`")


@pytest.mark.parametrize("op", sorted(LAYER0_OPS))
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_07_non_finite_gradients_are_refused(op, param, bad):
    net, opt = mlp()
    p = dict(net.named_parameters())[param]
    p.grad.view(-1)[-1] = bad
    refused(lambda: LAYER0_OPS[op](net, opt), net, opt, error=NonFiniteError,
            match=rf"the gradient of `{param}` holds 1 non-finite")


@pytest.mark.parametrize("n", [1, 2, 3])  # width 6: n * n <= 6 rotates by reflectors, 3 * 3 > 6 densely
@pytest.mark.parametrize("where", ["gradient", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_07_a_shrink_whose_rotation_checks_its_inputs_refuses_them_by_name(n, where, bad):
    # Removing directions checks gradients and state through the rotation's result check (one pass,
    # not two): a non-finite input must still be refused as an input, by name, changing nothing.
    net, opt = mlp()
    p = net.layers[1].weight  # the next layer: its columns are rotated
    target = p.grad if where == "gradient" else opt.state[p][where]
    target[2, 3] = abs(bad) if where == "exp_avg_sq" else bad
    match = (r"the gradient of `layers.1.weight` holds 1 non-finite" if where == "gradient"
             else rf"Optimizer state `{where}` of parameter `layers.1.weight` holds 1 non-finite")
    refused(lambda: net.shrink(0, n, optimizer=opt), net, opt, error=NonFiniteError, match=match)


@pytest.mark.parametrize("n", [1, 3])
def test_07_a_rotation_that_overflows_a_finite_gradient_is_refused_as_an_overflow(n):
    net, opt = mlp()
    net.layers[0].weight.grad.fill_(3e38)  # finite; a rotation mixing its rows overflows float32
    refused(lambda: net.shrink(0, n, optimizer=opt), net, opt, error=NonFiniteError,
            match=r"would write non-finite values into the gradient of `layers.0.weight`")


@pytest.mark.parametrize("op", ["grow", "shrink"])
def test_07_a_fixup_cannot_hide_a_non_finite_state_entry(op):
    # Centered RMSprop's fixup takes max(square_avg, grad_avg ** 2), which turns -inf into a finite
    # value: a check of the remapped state after it would miss the input's -inf.
    net, opt = mlp(optimizer="rmsprop")
    p = net.layers[1].weight
    opt.state[p]["square_avg"][2, 3] = -math.inf
    refused(lambda: getattr(net, op)(0, 1, optimizer=opt), net, opt, error=NonFiniteError,
            match=r"Optimizer state `square_avg` of parameter `layers.1.weight` holds 1 non-finite")


def test_07_nan_in_a_gradient_before_diagonalisation_and_full_diagonalisation():
    net, opt = mlp(psi="none")
    net.layers[1].weight.grad[0, 0] = math.nan
    refused(lambda: net.diagonalise(1, optimizer=opt), net, opt, error=NonFiniteError, match="`layers.1.weight`")
    refused(lambda: net.diagonalise(1, "full", optimizer=opt), net, opt, error=NonFiniteError,
            match="`layers.1.weight`")
    refused(lambda: net.sparsify(optimizer=opt), net, opt, error=NonFiniteError, match="`layers.1.weight`")


@pytest.mark.parametrize("scale", [1e38, 2e38])
@pytest.mark.parametrize("op", ["shrink", "diagonalise", "set_widths", "sparsify"])
def test_07_finite_values_whose_rotation_overflows_are_refused(op, scale):
    net, opt = mlp((4, 6, 6, 3), psi="none", length="none")
    with torch.no_grad():
        net.layers[1].weight.fill_(scale)
        net.layers[1].weight[0, 0] = scale / 2
    call = {"shrink": lambda: net.shrink(1, 2, optimizer=opt), "diagonalise": lambda: net.diagonalise(1, optimizer=opt),
            "set_widths": lambda: net.set_widths([4, 4], optimizer=opt),
            "sparsify": lambda: net.sparsify(optimizer=opt)}[op]
    before = snapshot(net, opt)
    try:
        call()
    except NonFiniteError as err:
        assert "`layers.1.weight`" in str(err) or "layers.1.weight" in str(err)
        assert_unchanged(before, net, opt)
    else:  # accepted: then nothing may have overflowed
        for name, p in net.named_parameters():
            assert bool(torch.isfinite(p).all()), name
            assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
        for state in opt.state.values():
            for value in state.values():
                assert bool(torch.isfinite(value).all())


# ---------------------------------------------------------------------------- 8. inference mode
INFERENCE_OPS: Dict[str, Callable[..., Any]] = {
    **LAYER0_OPS,
    "diagonalise_full": lambda net, opt: net.diagonalise(1, "full", optimizer=opt),
    "sparsify": lambda net, opt: net.sparsify(optimizer=opt),
    "remove_group": lambda net, opt: net.remove_group(0, optimizer=opt),
    "add_inputs": lambda net, opt: net.add_inputs(1, optimizer=opt),
    "remove_outputs": lambda net, opt: net.remove_outputs([1], optimizer=opt),
    "singular_values": lambda net, opt: net.singular_values(0),
}


@pytest.mark.parametrize("op", sorted(INFERENCE_OPS))
@pytest.mark.parametrize("optimizer", TWO)
def test_08_operations_inside_inference_mode_are_refused(op, optimizer):
    net, opt = mlp((4, 6, 6, 3), optimizer, psi="none", group_size=3 if op == "remove_group" else None)
    with torch.inference_mode():
        refused(lambda: INFERENCE_OPS[op](net, opt), net, opt, error=RuntimeError,
                match=r"inference_mode\(\)`.*torch.no_grad\(\)")
    INFERENCE_OPS[op](net, opt)
    assert_healthy(net, opt)


def test_08_resizing_to_a_record_inside_inference_mode_gives_a_trainable_model(checkpoint_dir):
    # Values only (gradients dropped, no optimizer state): the resized tensors stay ordinary tensors.
    model = IsoModule()
    state = torch.load(checkpoint_dir / "grown.ckpt", weights_only=False)["state_dict"]
    with torch.inference_mode():
        model.load_state_dict(state)
    assert model.net.hidden_widths == [8, 7]
    assert not any(p.is_inference() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model.net, opt)
    assert_healthy(model.net, opt)


# ---------------------------------------------------------------------------- 9. one parameter, two optimizers
@pytest.mark.parametrize("op", sorted(LAYER0_OPS))
def test_09_a_parameter_held_by_two_optimizers_is_refused(op):
    net, adam = mlp()
    sgd = torch.optim.SGD([net.layers[0].weight], lr=0.01, momentum=0.9)
    train(net, sgd, 1)
    refused(lambda: LAYER0_OPS[op](net, [adam, sgd]), net, adam, sgd,
            match=r"`layers.0.weight` is held by Adam \(param group 0\) and SGD \(param group 0\)")


def test_09_an_optimizer_missing_a_parameter_is_refused_naming_it():
    net, adam = mlp()
    partial = torch.optim.Adam(net.layers[0].parameters(), lr=1e-3)
    train(net, partial, 1)
    refused(lambda: net.grow(0, 1, optimizer=partial), net, partial, adam,
            match=r"`optimizer` \(Adam\) to hold parameter `layers.1.weight`")


def test_09_set_widths_that_changes_nothing_still_refuses_an_optimizer_of_another_model():
    net, adam = mlp()
    other = torch.optim.Adam([nn.Parameter(torch.zeros(3))], lr=1e-3)
    refused(lambda: net.set_widths(list(net.hidden_widths), optimizer=other), net, adam,
            match=r"`optimizer` \(Adam\) to hold parameter `layers.0.weight`")
    assert net.set_widths(list(net.hidden_widths), optimizer=adam) == []  # its own optimizer: a no-op


# ---------------------------------------------------------------------------- 10. parametrized layers
PARAMETRIZED_OPS: Dict[str, Callable[..., Any]] = {
    **LAYER0_OPS,
    "grow_1": lambda net, opt: net.grow(1, 1, optimizer=opt),
    "shrink_1": lambda net, opt: net.shrink(1, 1, optimizer=opt),
}


@pytest.mark.parametrize("op", sorted(PARAMETRIZED_OPS))
def test_10_a_weight_norm_layer_is_refused_before_anything_changes(op):
    net, _ = mlp()
    nn.utils.parametrizations.weight_norm(net.layers[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train(net, opt)
    refused(lambda: PARAMETRIZED_OPS[op](net, opt), net, opt,
            match=r"`layers.1.weight` is parametrized \(_WeightNorm\).*remove_parametrizations")


def test_10_a_weight_norm_layer_is_refused_by_apply_topology_and_load_state_dict(checkpoint_dir):
    model = IsoModule()
    nn.utils.parametrizations.weight_norm(model.net.layers[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model.net, opt)
    record = copy.deepcopy(model.topology())
    record["spaces"]["net.hidden.0"]["width"] = 8
    refused(lambda: model.apply_topology(record), model, opt, match=r"`net.layers.1.weight` is parametrized")
    state = torch.load(checkpoint_dir / "grown.ckpt", weights_only=False)["state_dict"]
    refused(lambda: model.load_state_dict(state, strict=False), model, opt, match="parametrized")
    model.apply_topology(model.topology())  # the model's own record changes nothing and is accepted


# ---------------------------------------------------------------------------- 11. optimizer rules
@pytest.mark.parametrize(("cls", "rule", "match"), [
    (torch.optim.SGD, "momentum_buffer", "`rule` to be an OptimizerRule"),
    (torch.optim.SGD, ("momentum_buffer",), "`rule` to be an OptimizerRule"),
    (torch.optim.SGD, {"linear": ["momentum_buffer"]}, "`rule` to be an OptimizerRule"),
    ("SGD", OptimizerRule(linear=("momentum_buffer",)), "`optimizer_cls` to be an Optimizer subclass"),
    (torch.nn.Linear, OptimizerRule(), "`optimizer_cls`"),
])
def test_11_a_bad_optimizer_rule_is_refused_and_sgd_still_works(cls, rule, match):
    before = rule_for(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(TypeError, match=match):
        register_optimizer_rule(cls, rule)
    net, opt = mlp(optimizer="sgd_momentum")
    assert rule_for(opt) is before
    net.grow(0, 2, optimizer=opt)
    net.shrink(1, 1, optimizer=opt)
    assert opt.state[net.layers[0].weight]["momentum_buffer"].shape == net.layers[0].weight.shape
    assert_healthy(net, opt)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"linear": "momentum_buffer"}, "`linear` to be a tuple"),
    ({"quadratic": ("",)}, "`quadratic`"),
    ({"linear": ("a",), "rms": ("a",)}, "one of `linear`"),
    ({"fill": {"sum": 0.0}}, "`fill`"),
    ({"fixup": 3}, "`fixup`"),
])
def test_11_a_malformed_rule_is_refused_at_construction(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        OptimizerRule(**kwargs)


# ---------------------------------------------------------------------------- 12. policies and ConvNet arguments
@pytest.mark.parametrize(("make", "match"), [
    (lambda: ScaffoldPolicy(min_width=5, max_width=2), r"`min_width` \(5\) to be at most `max_width`"),
    (lambda: ScaffoldPolicy(min_width=0), "`min_width` to be an int >= 1"),
    (lambda: ScaffoldPolicy(max_width=math.inf), "`max_width`"),
    (lambda: ScaffoldPolicy(threshold=math.nan), "`threshold` to be a positive finite number"),
    (lambda: ScaffoldPolicy(threshold=math.inf), "`threshold`"),
    (lambda: ScaffoldPolicy(max_shrink=math.nan), "`max_shrink`"),
    (lambda: LossPlateauPolicy(min_delta=math.nan), "`min_delta` to be a finite number >= 0"),
    (lambda: LossPlateauPolicy(min_delta=math.inf), "`min_delta`"),
    (lambda: LossPlateauPolicy(min_delta=-0.1), "`min_delta`"),
])
def test_12_bad_policy_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_12_width_bounds_given_per_space_that_contradict_are_refused_when_deciding():
    net, opt = mlp()
    policy = ScaffoldPolicy(min_width={"hidden.*": 5}, max_width=2)
    with pytest.raises(ValueError, match=r"`hidden.0`: `min_width` \(5\) is larger than `max_width` \(2\)"):
        policy.decide(describe(net), PolicyContext())


def test_12_loss_plateau_never_grows_while_the_loss_improves():
    net, _ = mlp()
    policy = LossPlateauPolicy(monitor="loss", patience=1, grow_by=3, scaffold=None)
    for epoch, value in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]):
        assert policy.decide(describe(net), PolicyContext(epoch=epoch, metrics={"loss": value})) == {}
    decisions = [policy.decide(describe(net), PolicyContext(metrics={"loss": 0.5})) for _ in range(3)]
    assert {"hidden.0": 9, "hidden.1": 8} in decisions  # a plateau does grow


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kernel_size": 0}, "`kernel_size` to be an int >= 1"),
    ({"kernel_size": [3, 0]}, "`kernel_size`"),
    ({"kernel_size": 1.5}, "`kernel_size`"),
    ({"padding": -1}, "`padding` to be None or an int >= 0"),
    ({"padding": [1, -2]}, "`padding`"),
    ({"stride": 0}, "`stride` to be an int >= 1"),
    ({"stride": True}, "`stride`"),
    ({"stride": [1, 2, 3]}, "`stride` to have 2 entries"),
    ({"kernel_size": 9, "padding": 0}, "positive size"),
    ({"group_size": 0}, "`group_size`"),
])
def test_12_bad_convnet_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IsotropicConvNet(1, [4, 3], image_size=6, num_outputs=3, **kwargs)


# ---------------------------------------------------------------------------- 13. checkpoint scans never run code
class _Payload:
    """Unpickling this creates a file: what a hostile pickle would do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _set_mtime(path, seconds_ago: float) -> None:
    import time

    t = time.time() - seconds_ago
    os.utime(path, (t, t))


@pytest.mark.parametrize("shape", ["checkpoint_like", "foreign", "bare_pickle"])
def test_13_scanning_a_folder_never_executes_a_file(tmp_path, checkpoint_dir, shape):
    good = tmp_path / "good.ckpt"
    good.write_bytes((checkpoint_dir / "last.ckpt").read_bytes())
    _set_mtime(good, 100)
    marker = tmp_path / "executed"
    hostile = tmp_path / "sub" / "epoch=9.ckpt"
    hostile.parent.mkdir()
    payload = _Payload(str(marker))
    if shape == "checkpoint_like":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 5, "hyper_parameters": payload}, hostile)
    elif shape == "foreign":
        torch.save({"anything": payload}, hostile)
    else:
        hostile.write_bytes(pickle.dumps({"state_dict": {}, "global_step": 0, "x": payload}))
    # Proof that the payload does run when the file is unpickled the unsafe way.
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(pickle.dumps(_Payload(str(tmp_path / "probe_ran"))))
    pickle.loads(probe.read_bytes()).close()
    assert (tmp_path / "probe_ran").exists()
    probe.unlink()

    found = latest_valid_checkpoint(tmp_path)
    assert not marker.exists(), "the scan executed the file's contents"
    if shape == "checkpoint_like":
        assert found == str(hostile)  # complete and shaped like a checkpoint: chosen, still never run
    else:
        assert found == str(good)


def test_13_a_lightning_checkpoint_is_valid_and_any_truncation_is_not(tmp_path, checkpoint_dir):
    source = (checkpoint_dir / "last.ckpt").read_bytes()
    good = tmp_path / "a" / "good.ckpt"
    good.parent.mkdir()
    good.write_bytes(source)
    assert latest_valid_checkpoint(tmp_path / "a") == str(good)
    assert latest_valid_checkpoint(checkpoint_dir) in {str(checkpoint_dir / n) for n in ("last.ckpt", "grown.ckpt")}
    with zipfile.ZipFile(good) as archive:
        offsets = sorted(i.header_offset for i in archive.infolist())
    cuts = [0, 10, 100, offsets[1] + 5, len(source) // 2, offsets[-1], len(source) - 22, len(source) - 1]
    for cut in cuts:
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        (folder / "torn.ckpt").write_bytes(source[:cut])
        assert latest_valid_checkpoint(folder) is None, cut
    # A flipped byte inside a tensor record fails its CRC.
    with zipfile.ZipFile(good) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 16)
    name_length, extra_length = struct.unpack("<HH", source[record.header_offset + 26:record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length  # the record's bytes (stored, not compressed)
    flipped = bytearray(source)
    flipped[start + 3] ^= 0xFF
    (tmp_path / "flip").mkdir()
    (tmp_path / "flip" / "bad.ckpt").write_bytes(bytes(flipped))
    assert latest_valid_checkpoint(tmp_path / "flip") is None


@pytest.mark.parametrize("directory", [None, 5, ["ckpt"], b"\xff"])
def test_13_latest_valid_checkpoint_of_a_bad_directory_is_refused(directory):
    with pytest.raises(ValueError, match=r"`directory` to be a path \(str or os.PathLike\)"):
        latest_valid_checkpoint(directory)


@pytest.mark.parametrize("pattern", [None, "", 3])
def test_13_latest_valid_checkpoint_of_a_bad_pattern_is_refused(tmp_path, pattern):
    with pytest.raises(ValueError, match="`pattern`"):
        latest_valid_checkpoint(tmp_path, pattern)


# ---------------------------------------------------------------------------- 14. clear messages
@pytest.mark.parametrize("probe", [torch.randn(3, 7), torch.randn(3), torch.zeros(3, 4, dtype=torch.int64)])
def test_14_a_wrong_probe_names_the_argument_the_owner_and_the_shape(probe):
    net, opt = mlp()
    info = refused(lambda: net.shrink(0, 1, optimizer=opt, probe=probe), net, opt,
                   match=r"`probe` to be a batch of inputs of IsotropicMLP \(the module that owns `hidden.0`\)")
    assert str(tuple(probe.shape)) in str(info.value)
    refused(lambda: net.shrink(0, 1, optimizer=opt, probe=[[0.0] * 4]), net, opt, match="`probe` to be a tensor")
    nan_probe = inputs(net)
    nan_probe[0, 0] = math.nan
    refused(lambda: net.shrink(0, 1, optimizer=opt, probe=nan_probe), net, opt, error=NonFiniteError,
            match="`probe` to hold finite inputs")
    refused(lambda: net.sparsify(optimizer=opt, probe=torch.randn(3, 7)), net, opt, match="`probe`")


@pytest.mark.parametrize(("decision", "match"), [
    ({"hidden.x": 3}, r"names in `decision` to be spaces of the model \['hidden.0', 'hidden.1'\].*'hidden.x'"),
    ({"hidden.0": -1}, r"`decision` to give every space an int >= 1"),
    ({"hidden.0": "7"}, "`decision`"),
    ([7, 5], "`decision` to be a mapping"),
])
def test_14_apply_decision_names_the_argument_and_the_allowed_spaces(decision, match):
    net, opt = mlp()
    refused(lambda: apply_decision(net, decision, optimizer=opt), net, opt, match=match)


@pytest.mark.parametrize("log_dir", [5, 1.5, ["logs"], True])
def test_14_callback_log_dir_is_checked_at_construction(log_dir):
    with pytest.raises(ValueError, match=r"`log_dir` to be None or a path \(str or os.PathLike\)"):
        DynamicTopologyCallback(ScaffoldPolicy(), log_dir=log_dir)


def test_14_non_finite_and_ownership_errors_name_the_full_path():
    net, opt = mlp()
    with torch.no_grad():
        net.layers[2].weight[0, 0] = math.nan
    for call in (lambda: net.grow(1, 1, optimizer=opt), lambda: net.singular_values(1), lambda: describe(net)):
        info = refused(call, net, opt, error=NonFiniteError, match=r"`hidden.1`.*`layers.2.weight` holds 1 non-finite")
        assert "IsoLinear" not in str(info.value)
    model, opt = _trained_module()
    with torch.no_grad():
        model.net.layers[1].correction[0, 0] = math.inf
    info = refused(lambda: model.set_widths({"net.hidden.0": 8}, optimizer=opt), model, opt, error=NonFiniteError,
                   match=r"`net.hidden.0`.*`net.layers.1.correction`")
    assert "IsoLinear" not in str(info.value)
    model, _ = _trained_module()
    partial = torch.optim.Adam(model.net.layers[0].parameters(), lr=1e-3)
    info = refused(lambda: model.set_widths({"net.hidden.0": 8}, optimizer=partial), model, partial,
                   match=r"`optimizer` \(Adam\) to hold parameter `net.layers.1.weight`")
    assert "IsoLinear" not in str(info.value)
    conv = IsotropicConvNet(1, [3, 4], image_size=5, hidden=[4], num_outputs=3)
    with torch.no_grad():
        conv.layers[1].weight[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"`layers.1.weight`"):
        conv.grow(0, 1)


def test_14_unsupported_optimizers_name_the_class_and_the_remedies():
    net, _ = mlp()
    lbfgs = torch.optim.LBFGS(net.parameters())

    def closure() -> Tensor:
        lbfgs.zero_grad()
        value = loss(net, inputs(net))
        value.backward()
        return value

    lbfgs.step(closure)
    refused(lambda: net.grow(0, 1, optimizer=lbfgs), net, lbfgs, error=UnsupportedOptimizerError,
            match=r"LBFGS.*`register_optimizer_rule`.*`on_unknown='reset'`")


# ---------------------------------------------------------------------------- property test
NAN = math.nan
BAD_LAYERS = [-1, "0", 1.5, None, True]
BAD_COUNTS = [0, -3, 2.0, "1", True, None]
BAD_SCALES = [-1.0, NAN, math.inf, -math.inf, "0.1", True]
BAD_GENERATORS = [42, "seed"]


def _huge_counts() -> List[int]:
    return [10**12] if HUGE_ALLOCATIONS_FAIL else []


@st.composite
def networks(draw):
    """(kind, constructor kwargs, optimizer name): MLPs with every psi / length mode and groups, one ConvNet."""
    optimizer = draw(st.sampled_from(sorted(OPTIMIZERS)))
    if draw(st.integers(0, 5)) == 0:
        return "conv", {"psi": draw(st.sampled_from(["none", "trainable"])),
                        "kernel_size": draw(st.sampled_from([1, 3]))}, optimizer
    hidden = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    sizes = [draw(st.integers(2, 5))] + hidden + [draw(st.integers(2, 4))]
    kwargs = {"sizes": sizes, "group_size": draw(st.sampled_from([None, None, 1, 2])),
              "psi": draw(st.sampled_from(["none", "constant", "trainable", "decay"])),
              "length": draw(st.sampled_from(["none", "constant", "trainable"]))}
    return "mlp", kwargs, optimizer


def _build(kind: str, kwargs: Dict[str, Any], optimizer: str) -> Tuple[nn.Module, torch.optim.Optimizer]:
    if kind == "conv":
        net: nn.Module = IsotropicConvNet(1, [3, 4], image_size=5, hidden=[4], num_outputs=3, length="trainable",
                                          generator=torch.Generator().manual_seed(0), **kwargs)
        opt = OPTIMIZERS[optimizer](net.parameters())
        train(net, opt)
        return net, opt
    kwargs = dict(kwargs)
    return mlp(kwargs.pop("sizes"), optimizer, **kwargs)


class Draw:
    """Draws one operation: (description, callable, expected) with expected "refuse", "accept" or "either"."""

    def __init__(self, data: Any, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.data, self.net, self.opt = data, net, opt
        self.corrupt = False  # whether this operation's arguments may be bad (drawn per operation)

    def pick(self, good: Any, bad: Sequence[Any]) -> Tuple[Any, bool]:
        """A value from the ``good`` strategy, or (one time in three, in a corrupt operation) one of ``bad``."""
        if bad and self.corrupt and self.data.draw(st.integers(0, 2)) == 0:
            return self.data.draw(st.sampled_from(list(bad))), True
        return self.data.draw(good), False

    def layer(self) -> Tuple[Any, bool]:
        h = self.net.num_hidden
        return self.pick(st.integers(0, h - 1), BAD_LAYERS + [h])

    def optimizer(self) -> Tuple[Any, bool]:
        other = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
        shared = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        if self.corrupt and self.data.draw(st.integers(0, 5)) == 0:
            return self.data.draw(st.sampled_from(["adam", 3, other, [self.opt, shared]])), True
        return self.opt, False

    def probe(self) -> Tuple[Any, bool]:
        good = inputs(self.net, 4, seed=7)
        wrong = torch.randn(4, self.net.in_features + 1) if not isinstance(self.net, IsotropicConvNet) \
            else torch.randn(4, self.net.in_features, 2)
        nan = good.clone()
        nan.view(-1)[0] = NAN
        return self.pick(st.sampled_from([None, good]), [wrong, good.tolist(), nan])

    def operation(self) -> Tuple[str, Callable[[], Any], str]:
        net, h = self.net, self.net.num_hidden
        conv = isinstance(net, IsotropicConvNet)
        kinds = ["grow", "shrink", "resize", "set_widths", "diagonalise", "remove_group", "add_inputs",
                 "remove_inputs", "add_outputs", "remove_outputs", "on_unknown"] + ([] if conv else ["sparsify"])
        kind = self.data.draw(st.sampled_from(kinds))
        self.corrupt = self.data.draw(st.booleans())
        opt, bad_opt = self.optimizer()
        layer, bad_layer = self.layer()
        bad = bad_opt or bad_layer
        space = net.space(layer) if not bad_layer else None
        width = space.width if space is not None else 3

        if kind == "grow":
            n, bad_n = self.pick(st.integers(1, 3), BAD_COUNTS + _huge_counts())
            scale, bad_scale = self.pick(st.sampled_from([0.0, 0.01, 0.5]), BAD_SCALES)
            generator, bad_gen = self.pick(st.sampled_from([None, torch.Generator().manual_seed(3)]), BAD_GENERATORS)
            groups = space.groups() if space is not None else 1
            group, bad_group = self.pick(st.sampled_from([None, "new"] + list(range(groups))),
                                         [groups + 5, -1, "x", 1.5])
            bad = bad or bad_n or bad_scale or bad_gen or bad_group
            return (f"grow({layer}, {n}, scale={scale}, group={group}, generator={generator})",
                    lambda: net.grow(layer, n, optimizer=opt, scale=scale, group=group, generator=generator),
                    "refuse" if bad else "accept")
        if kind == "shrink":
            limit = width - (space.min_width if space is not None else 1)
            n, bad_n = self.pick(st.integers(1, max(1, limit)), BAD_COUNTS + [limit + 1, 10**12])
            probe, bad_probe = self.probe()
            good_expectation = inputs(net, 5, seed=9)
            wrong = torch.randn(5, net.in_features + 3)
            nan = good_expectation.clone()
            nan.view(-1)[-1] = NAN
            expectation, bad_exp = self.pick(st.sampled_from([None, None, good_expectation]),
                                             [wrong, nan, good_expectation.tolist(), torch.randn(0, 3)])
            bad = bad or bad_n or bad_probe or bad_exp or limit < 1
            expected = "refuse" if bad else ("either" if expectation is not None else "accept")
            return (f"shrink({layer}, {n}, probe={probe is not None}, expectation={expectation is not None})",
                    lambda: net.shrink(layer, n, optimizer=opt, probe=probe, expectation=expectation), expected)
        if kind == "resize":
            target, bad_w = self.pick(st.integers(max(1, space.min_width if space else 1), width + 3),
                                      [0, -2, "4", 2.5, None])
            return (f"resize({layer}, {target})", lambda: net.resize(layer, target, optimizer=opt),
                    "refuse" if bad or bad_w else "accept")
        if kind == "set_widths":
            floors = [net.space(i).min_width for i in range(h)]
            good = st.tuples(*[st.integers(f, net.hidden_widths[i] + 3) for i, f in enumerate(floors)]).map(list)
            wrong_length = list(net.hidden_widths) + [3]
            widths, bad_w = self.pick(good, [wrong_length, [0] * h, ["3"] * h, [-1] * h, {h + 3: 2}, "8,8"])
            return (f"set_widths({widths})", lambda: net.set_widths(widths, optimizer=opt),
                    "refuse" if bad_opt or bad_w else "accept")
        if kind == "diagonalise":
            mode, bad_mode = self.pick(st.sampled_from(["left", "full"]), ["diag", None, "LEFT"])
            expected = "refuse" if bad or bad_mode else ("accept" if mode == "left" else "either")
            return (f"diagonalise({layer}, {mode!r})", lambda: net.diagonalise(layer, mode, optimizer=opt), expected)
        if kind == "remove_group":
            groups = space.groups() if space is not None else 1
            group, bad_group = self.pick(st.sampled_from([None] + list(range(groups))), [groups, -1, "0", 0.5])
            probe, bad_probe = self.probe()
            bad = bad or bad_group or bad_probe or groups < 2
            return (f"remove_group({layer}, {group})",
                    lambda: net.remove_group(layer, group, optimizer=opt, probe=probe),
                    "refuse" if bad else "accept")
        if kind in ("add_inputs", "add_outputs"):
            n, bad_n = self.pick(st.integers(1, 2), BAD_COUNTS)
            scale, bad_scale = self.pick(st.sampled_from([0.0, 0.1]), BAD_SCALES)
            method = getattr(net, kind)
            return (f"{kind}({n}, scale={scale})", lambda: method(n, optimizer=opt, scale=scale),
                    "refuse" if bad_opt or bad_n or bad_scale else "accept")
        if kind in ("remove_inputs", "remove_outputs"):
            total = net.in_features if kind == "remove_inputs" else net.out_features
            good = st.lists(st.integers(0, total - 1), min_size=1, max_size=max(1, total - 1), unique=True)
            indices, bad_i = self.pick(good, [[], [total], [-1], "0", [0.5], list(range(total))])
            method = getattr(net, kind)
            expected = "refuse" if bad_opt or bad_i or total < 2 else "accept"
            if conv and kind == "remove_inputs" and expected == "accept":
                expected = "either"
            return (f"{kind}({indices})", lambda: method(indices, optimizer=opt), expected)
        if kind == "sparsify":
            probe, bad_probe = self.probe()
            expected = "refuse" if bad_opt or bad_probe else "either"
            return (f"sparsify(probe={probe is not None})", lambda: net.sparsify(optimizer=opt, probe=probe),
                    expected)
        on_unknown, bad_u = self.pick(st.sampled_from(["raise", "reset"]), ["bogus", None, "RAISE"])
        return (f"grow({layer}, 1, on_unknown={on_unknown!r})",
                lambda: net.grow(layer, 1, optimizer=opt, on_unknown=on_unknown),
                "refuse" if bad or bad_u else "accept")

    def injection(self) -> Tuple[str, Callable[[], None], Callable[[], Any], Callable[[], None]]:
        """A NaN or Inf put into one tensor of a space (a value, a gradient or an optimizer state entry),
        the operation on that space that must refuse it, and the undo of the injection."""
        net, opt = self.net, self.opt
        layer = self.data.draw(st.integers(0, net.num_hidden - 1))
        space = net.space(layer)
        tensors = []
        for b in space.bindings:
            t = b.tensor
            if not t.is_floating_point() or t.numel() == 0:
                continue
            tensors.append((b.label, t))
            if t.grad is not None:
                tensors.append((f"the gradient of `{b.label}`", t.grad))
            for key, value in opt.state.get(t, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.is_floating_point():
                    tensors.append((f"`{key}` of `{b.label}`", value))
        label, target = self.data.draw(st.sampled_from(tensors))
        index = self.data.draw(st.integers(0, target.numel() - 1))
        value = self.data.draw(st.sampled_from([NAN, math.inf, -math.inf]))
        flat = target.detach().view(-1)
        old = float(flat[index])

        def inject() -> None:
            with torch.no_grad():
                flat[index] = value

        def undo() -> None:
            with torch.no_grad():
                flat[index] = old

        op = self.data.draw(st.sampled_from(["grow", "diagonalise", "resize", "set_widths"]))
        calls = {"grow": lambda: net.grow(layer, 1, optimizer=opt),
                 "diagonalise": lambda: net.diagonalise(layer, optimizer=opt),
                 "resize": lambda: net.resize(layer, space.width + 1, optimizer=opt),
                 "set_widths": lambda: net.set_widths({layer: space.width + 2}, optimizer=opt)}
        return f"{value} in {label}[{index}], then {op}({layer})", inject, calls[op], undo


@settings(max_examples=75, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(network=networks(), data=st.data())
def test_random_operations_and_bad_arguments_are_all_or_nothing(network, data):
    net, opt = _build(*network)
    for _ in range(data.draw(st.integers(3, 10), label="operations")):
        draw = Draw(data, net, opt)
        if data.draw(st.integers(0, 4), label="inject") == 0:
            what, inject, call, undo = draw.injection()
            inject()
            before = snapshot(net, opt)
            with pytest.raises(NonFiniteError):
                call()
            assert_unchanged(before, net, opt)
            undo()
            event("non-finite value injected: refused")
            continue
        what, call, expected = draw.operation()
        before = snapshot(net, opt)
        try:
            call()
        except (ValueError, TypeError, NonFiniteError, RuntimeError, MemoryError) as err:
            assert expected != "accept", f"{what} was refused: {type(err).__name__}: {err}"
            assert_unchanged(before, net, opt)
            event(f"{what.split('(')[0]}: refused")
            if isinstance(err, (ValueError, TypeError)) and not isinstance(err, MemoryError):
                assert "`" in str(err), f"{what}: the message names nothing: {err}"
            continue
        assert expected != "refuse", f"{what} was accepted"
        assert_healthy(net, opt)
        event(f"{what.split('(')[0]}: accepted")
