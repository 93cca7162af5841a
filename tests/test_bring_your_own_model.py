"""Models a user already has: a provider of their own, converted nn.Sequential models, declared custom
blocks, providers nested deep or side by side; each through grow, shrink, checkpoints and the callback."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import blobs, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from iso_lightning import (
    Binding,
    DynamicTopologyCallback,
    IsoLinear,
    IsotropicActivation,
    IsotropicMLP,
    IsotropicModuleMixin,
    NeuronSpace,
    NeuronSpaceProvider,
    Role,
    TopologyPolicy,
    convert,
    declare_space,
    find_spaces,
    load_state_dict_resized,
    operations,
)
from iso_lightning.spaces import ElementwiseSpaceActivation, IsotropicSpaceActivation, space_activation

torch.set_num_threads(1)


# ------------------------------------------------------------------ the user's models
class ResidualBlock(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, h):
        return h + self.fc2(self.act(self.fc1(h)))


class ResidualMLP(nn.Module):
    """A user's residual MLP that declares its own spaces (the provider protocol): one isotropic
    block with a trainable intrinsic length, one GELU block."""

    def __init__(self, dim=8, hidden=10, classes=3):
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.blocks = nn.ModuleList([
            ResidualBlock(dim, hidden, IsotropicActivation(hidden, length="trainable")),
            ResidualBlock(dim, hidden, nn.GELU()),
        ])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def neuron_spaces(self):
        spaces = {}
        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}"
            bindings = [
                Binding(block.fc1, "weight", 0, role=Role.WEIGHT_IN, path=f"{p}.fc1.weight"),
                Binding(block.fc1, "bias", 0, role=Role.BIAS_IN, path=f"{p}.fc1.bias"),
                Binding(block.fc2, "weight", 1, role=Role.WEIGHT_OUT, path=f"{p}.fc2.weight"),
                Binding(block.fc2, "bias", 0, role=Role.BIAS_OUT, path=f"{p}.fc2.bias"),
            ]
            if isinstance(getattr(block.act, "length", None), torch.Tensor):
                bindings.append(Binding(block.act, "length", 0, role=Role.LENGTH, path=f"{p}.act.length"))
            name = f"{p}.hidden"
            spaces[name] = NeuronSpace(name, bindings, space_activation(block.act), owner=self,
                                       activation_path=f"{p}.act")
        return spaces


class SiLUBlock(nn.Module):
    """A transformer-style block whose forward calls fc1, act and fc2 (declared, not converted)."""

    def __init__(self, dim=8, hidden=12):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        declare_space(self, "fc1", "fc2", "act")

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class InlineGELUBlock(nn.Module):
    """The activation is a function call in forward: declared with the module that stands for it."""

    def __init__(self, dim=8, hidden=9):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        declare_space(self, "fc1", "fc2", nn.GELU(), name="ffn")

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class DeclaredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Linear(8, 8), SiLUBlock(), InlineGELUBlock(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b(self.a(self.stem(x))))


class EncoderBlock(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(8), mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([
            EncoderBlock(convert(nn.Sequential(nn.Linear(8, 6), nn.SiLU(), nn.Linear(6, 8)))),
            EncoderBlock(IsotropicMLP([8, 7, 8], length="trainable", generator=torch.Generator().manual_seed(0))),
        ])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class NestedNet(nn.Module):
    """Providers two levels down: ``encoder.blocks.<i>.mlp``."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = Encoder(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


class TwoProviders(nn.Module):
    """A converted GELU Sequential feeding an IsotropicMLP."""

    def __init__(self):
        super().__init__()
        self.features = convert(nn.Sequential(nn.Linear(8, 10), nn.GELU(), nn.Linear(10, 6)))
        self.head = IsotropicMLP([6, 7, 3], psi="decay", length="trainable",
                                 generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.head(self.features(x))


def sequential(act):
    return nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 3))


def build(kind):
    if kind == "residual":
        return ResidualMLP()
    if kind == "tanh":
        return convert(sequential(nn.Tanh()))
    if kind == "gelu":
        return convert(sequential(nn.GELU()))
    if kind == "declared":
        return DeclaredNet()
    if kind == "nested":
        return NestedNet()
    if kind == "two":
        return TwoProviders()
    raise ValueError(kind)


KINDS = ["residual", "tanh", "gelu", "declared", "nested", "two"]
EXPECTED_SPACES = {
    "residual": ["net.blocks.0.hidden", "net.blocks.1.hidden"],
    "tanh": ["net.hidden.0"],
    "gelu": ["net.hidden.0"],
    "declared": ["net.a.hidden", "net.b.ffn"],
    "nested": ["net.encoder.blocks.0.mlp.hidden.0", "net.encoder.blocks.1.mlp.hidden.0"],
    "two": ["net.features.hidden.0", "net.head.hidden.0"],
}


class Classifier(IsotropicModuleMixin, pl.LightningModule):
    def __init__(self, kind="tanh", lr=0.02):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = build(kind)
        self.steps_run = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.steps_run += 1
        return F.cross_entropy(self(x), y) + self.psi_regularisation()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class Scripted(TopologyPolicy):
    """Every space grows by 3 at the start of epoch 1 and shrinks by 2 at the start of epoch 2."""

    PLAN = {1: 3, 2: -2}

    def propose(self, spaces, context):
        delta = self.PLAN.get(context.epoch, 0)
        return {name: info.width + delta for name, info in spaces.items()} if delta else {}


def widths(module):
    return {name: space.width for name, space in find_spaces(module, kind="hidden").items()}


def data():
    x, y = blobs().tensors
    return x, y


def close(actual, expected):
    """Equal to float32 round-off."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------ 1: the user's own provider
def test_residual_provider_grows_exactly_through_the_skip_connection_and_reports_shrinks():
    x, y = data()
    net = ResidualMLP()
    opt = torch.optim.AdamW(net.parameters(), lr=0.02)
    train(net, opt, x, y, 15)
    assert isinstance(net, NeuronSpaceProvider)
    spaces = find_spaces(net, kind="hidden")
    assert sorted(spaces) == ["blocks.0.hidden", "blocks.1.hidden"]
    assert isinstance(spaces["blocks.0.hidden"].activation, IsotropicSpaceActivation)
    assert isinstance(spaces["blocks.1.hidden"].activation, ElementwiseSpaceActivation)
    state = net.state_dict()
    for space in spaces.values():
        for b in space.bindings:
            assert b.tensor is state[b.path] or torch.equal(b.tensor, state[b.path])

    with torch.no_grad():
        before = net(x)
    for name in spaces:
        report = operations.grow(find_spaces(net)[name], 5, optimizer=opt, generator=torch.Generator().manual_seed(1))
        assert report.exact and report.new_width == 15
    with torch.no_grad():
        close(net(x), before)
    for block in net.blocks:
        assert block.fc1.weight.shape == (15, 8) and block.fc2.weight.shape == (8, 15)
        assert bool(block.fc2.weight[:, 10:].abs().sum() > 0)  # the new columns let the new neurons learn
        assert opt.state[block.fc1.weight]["exp_avg"].shape == (15, 8)
    train(net, opt, x, y, 2)  # the same optimizer keeps training
    assert bool(net.blocks[0].fc1.weight.grad[10:].abs().sum() > 0)

    with torch.no_grad():
        before = net(x)
    for name in spaces:
        report = operations.shrink(find_spaces(net)[name], 4, optimizer=opt, probe=x)
        assert not report.exact and report.error_estimate > 0
        assert report.measured_error is not None and report.measured_error > 0
    with torch.no_grad():
        assert float((net(x) - before).abs().max()) > 0
    assert [b.fc1.weight.shape[0] for b in net.blocks] == [11, 11]
    train(net, opt, x, y, 1)


def test_residual_provider_inside_a_lightning_module_resizes_by_full_name():
    model = Classifier("residual")
    x, _ = data()
    with torch.no_grad():
        before = model(x)
    reports = model.set_widths({"net.blocks.0.hidden": 14, "net.blocks.1.hidden": 12})
    assert {r.space for r in reports} == {"net.blocks.0.hidden", "net.blocks.1.hidden"}
    assert widths(model) == {"net.blocks.0.hidden": 14, "net.blocks.1.hidden": 12}
    with torch.no_grad():
        close(model(x), before)
    fresh = Classifier("residual")
    fresh.load_state_dict(model.state_dict())
    assert widths(fresh) == widths(model)
    with torch.no_grad():
        close(fresh(x), before)


# ------------------------------------------------------------------ 2: converting a trained nn.Sequential
def trained_sequential(act):
    torch.manual_seed(0)
    model = sequential(act)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    x, y = data()
    train(model, opt, x, y, 20)
    return model, opt, x, y


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_convert_keeps_a_trained_models_outputs_parameters_and_optimizer(act):
    model, opt, x, y = trained_sequential(act())
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.02)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    params = list(model.parameters())
    keys = list(model.state_dict())
    saved = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    with torch.no_grad():
        before = model(x)

    assert convert(model) is model
    assert [type(m) for m in model] == [nn.Linear, act, nn.Linear]
    after = list(model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        close(model(x), before)
    assert opt.param_groups[0]["params"] == params
    for p, state in zip(params, saved):
        assert set(opt.state[p]) == set(state)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k
    spaces = find_spaces(model)
    assert list(spaces) == ["hidden.0"]
    assert spaces["hidden.0"].width == 16 and isinstance(spaces["hidden.0"].activation, ElementwiseSpaceActivation)
    assert spaces["hidden.0"].weight_in.tensor is model[0].weight

    # The next step is the unconverted copy's step.
    for m, o in ((model, opt), (twin, twin_opt)):
        train(m, o, x, y, 1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_converted_tanh_is_the_isotropic_group_size_one_form():
    model, _, x, _ = trained_sequential(nn.Tanh())
    convert(model)
    iso = IsotropicMLP([8, 16, 3], group_size=1)
    with torch.no_grad():
        for mine, theirs in ((iso.layers[0], model[0]), (iso.layers[1], model[2])):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        close(iso(x), model(x))
    torch.testing.assert_close(operations.singular_values(find_spaces(model)["hidden.0"]),
                               operations.singular_values(iso.space(0)))


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_converted_sequential_grows_exactly_shrinks_by_row_norm_with_the_error_reported(act):
    model, opt, x, y = trained_sequential(act())
    convert(model)
    with torch.no_grad():
        before = model(x)
    report = operations.grow(find_spaces(model)["hidden.0"], 4, optimizer=opt)
    assert report.exact and model[0].weight.shape == (20, 8) and model[2].weight.shape == (3, 20)
    with torch.no_grad():
        close(model(x), before)
    assert bool(model[2].weight[:, 16:].abs().sum() > 0)
    train(model, opt, x, y, 3)
    assert opt.state[model[2].weight]["exp_avg"].shape == (3, 20)

    # Removal: the neurons with the smallest incoming row norms (their singular values), error reported.
    norms = model[0].weight.detach().double().norm(dim=1)
    keep = torch.sort(torch.argsort(norms, descending=True)[:14]).values
    kept_rows = model[0].weight.detach()[keep].clone()
    with torch.no_grad():
        before = model(x)
    report = operations.shrink(find_spaces(model)["hidden.0"], 6, optimizer=opt, probe=x)
    torch.testing.assert_close(report.singular_values, torch.sort(norms).values[:6])
    assert torch.equal(model[0].weight.detach(), kept_rows)
    with torch.no_grad():
        change = float((model(x) - before).abs().max())
    assert not report.exact and report.error_estimate > 0 and change > 0
    assert report.measured_error == pytest.approx(change, rel=1e-6)
    # The estimate is per unit input: |W_out,R (f(A_R x + b_R) - f(b_R))| <= L |W_out,R| |A_R| |x|.
    assert change <= report.error_estimate * float(x.norm(dim=1).max()) * (1 + 1e-6)
    train(model, opt, x, y, 1)
    assert opt.state[model[0].weight]["exp_avg"].shape == (14, 8)

    # Reload: a fresh conversion takes the changed widths from the state dict.
    fresh = convert(sequential(act()))
    load_state_dict_resized(fresh, model.state_dict())
    with torch.no_grad():
        close(fresh(x), model(x))


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.SiLU])
def test_a_constant_neuron_is_removed_exactly_its_output_folded_into_the_next_bias(act):
    model, opt, x, _ = trained_sequential(act())
    convert(model)
    with torch.no_grad():
        model[0].weight[5] = 0.0
        model[0].bias[5] = 0.7
        before = model(x)
        expected_bias = model[2].bias + model[2].weight[:, 5] * act()(torch.tensor(0.7))
    report = operations.shrink(find_spaces(model)["hidden.0"], 1, optimizer=opt, probe=x)
    assert report.exact and report.details["neurons"] == [5]
    assert report.error_estimate == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        close(model(x), before)
    close(model[2].bias.detach(), expected_bias)
    assert report.measured_error < 1e-5


def test_a_probe_measures_in_eval_mode_and_leaves_the_training_state_alone():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 4), nn.BatchNorm1d(4)))
    x, _ = data()
    with torch.no_grad():
        model[0].weight[3] = 0.0
    stats = model[4].running_mean.clone(), int(model[4].num_batches_tracked)
    report = operations.shrink(find_spaces(model)["hidden.0"], 1, probe=x)
    assert report.exact and report.measured_error < 1e-5  # an exact removal measures no change, dropout or not
    assert all(m.training for m in model.modules())
    assert torch.equal(model[4].running_mean, stats[0]) and int(model[4].num_batches_tracked) == stats[1]


def test_an_expectation_batch_runs_in_eval_mode_and_leaves_the_training_state_alone():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)))
    x, _ = data()
    model.train()
    stats = model[0].running_mean.clone(), int(model[0].num_batches_tracked)
    space = find_spaces(model)["hidden.0"]
    with torch.no_grad():  # the fold uses the activations of the model as it predicts (running statistics)
        model.eval()
        expected = model[2](model[1](model[0](x))).double().mean(0)
        model.train()
    weakest = int(torch.linalg.vector_norm(model[1].weight.detach(), dim=1).argmin())
    bias = model[3].bias.detach().double() + model[3].weight.detach().double()[:, weakest] * expected[weakest]
    report = operations.shrink(space, 1, expectation=x)
    assert report.details["neurons"] == [weakest] and report.details["expectation_fold"]
    close(model[3].bias.detach().double(), bias)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[0].running_mean, stats[0]) and int(model[0].num_batches_tracked) == stats[1]


# ------------------------------------------------------------------ 3: the declaration helper
def test_declared_blocks_grow_exactly_and_shrink_with_a_probe():
    net = DeclaredNet()
    x, y = data()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    train(net, opt, x, y, 10)
    spaces = find_spaces(net)
    assert sorted(spaces) == ["a.hidden", "b.ffn"]
    assert spaces["a.hidden"].weight_out.path == "a.fc2.weight"
    assert spaces["a.hidden"].activation.module is net.a.act
    assert isinstance(spaces["b.ffn"].activation.module, nn.GELU)
    with torch.no_grad():
        before = net(x)
    for name in spaces:
        assert operations.grow(find_spaces(net)[name], 3, optimizer=opt).exact
    assert net.a.fc1.weight.shape[0] == 15 and net.b.fc1.weight.shape[0] == 12
    with torch.no_grad():
        close(net(x), before)
    train(net, opt, x, y, 2)

    # A probe of the block measures the block's output change (its owner is the declaring module).
    h = net.a(net.stem(x)).detach()
    with torch.no_grad():
        block_before = net.b(h)
    report = operations.shrink(find_spaces(net)["b.ffn"], 4, optimizer=opt, probe=h)
    with torch.no_grad():
        change = float((net.b(h) - block_before).abs().max())
    assert report.measured_error == pytest.approx(change, rel=1e-6) and change > 0
    assert report.error_estimate > 0
    # Expectation fold: the hidden activations come from a hook on the declared activation module.
    g = net.stem(x).detach()
    fold = operations.shrink(find_spaces(net)["a.hidden"], 2, optimizer=opt, expectation=g)
    assert fold.details.get("expectation_fold") is True
    train(net, opt, x, y, 1)


def test_declare_space_refuses_wrong_declarations_with_clear_errors():
    block = nn.Module()
    block.fc1, block.act, block.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(5, 4)
    with pytest.raises(ValueError, match=r"`fc2` to read the 6 outputs of `fc1`"):
        declare_space(block, "fc1", "fc2", "act")
    block.fc2 = nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"'fc3' is not one.*'fc1', 'act', 'fc2'"):
        declare_space(block, "fc1", "fc3", "act")
    block.act = nn.Sigmoid()
    with pytest.raises(ValueError, match=r"f\(0\) = 0, but Sigmoid\(\) gives f\(0\) = 0.5"):
        declare_space(block, "fc1", "fc2", "act")
    assert not find_spaces(block)  # nothing was declared by the refused calls
    block.act = nn.GELU()
    declare_space(block, "fc1", "fc2", "act")
    with pytest.raises(ValueError, match="already declares 'hidden'"):
        declare_space(block, "fc1", "fc2", "act")


# ------------------------------------------------------------------ 4, 5: nested and side-by-side providers
def test_a_provider_nested_deep_is_found_by_its_module_path():
    model = Classifier("nested")
    spaces = find_spaces(model)
    name = "net.encoder.blocks.1.mlp.hidden.0"
    assert sorted(find_spaces(model, kind="hidden")) == EXPECTED_SPACES["nested"]
    assert {"net.encoder.blocks.1.mlp.input", "net.encoder.blocks.1.mlp.output"} <= set(spaces)
    state = model.state_dict()
    for space in spaces.values():
        for b in space.bindings:
            assert b.path in state, b.path
    assert spaces[name].weight_in.path == "net.encoder.blocks.1.mlp.layers.0.weight"
    assert spaces[name].weight_in.tensor is model.net.encoder.blocks[1].mlp.layers[0].weight
    x, _ = data()
    with torch.no_grad():
        before = model(x)
    model.set_widths({name: 11, "net.encoder.blocks.0.mlp.hidden.0": 9})
    assert model.net.encoder.blocks[1].mlp.hidden_widths == [11]
    assert model.net.encoder.blocks[0].mlp[0].weight.shape == (9, 8)
    with torch.no_grad():
        close(model(x), before)
    assert model.topology_summary()["widths"] == {name: 11, "net.encoder.blocks.0.mlp.hidden.0": 9}


def test_two_providers_in_one_module_have_distinct_names_and_resize_together():
    model = Classifier("two")
    assert sorted(model.neuron_spaces()) == EXPECTED_SPACES["two"]
    record = model.topology()
    x, _ = data()
    with torch.no_grad():
        before = model(x)
    model.set_widths({"net.features.hidden.0": 13, "net.head.hidden.0": 10})
    with torch.no_grad():
        close(model(x), before)
    fresh = Classifier("two")
    assert fresh.topology() == record
    fresh.load_state_dict(model.state_dict())
    assert widths(fresh) == {"net.features.hidden.0": 13, "net.head.hidden.0": 10}
    with torch.no_grad():
        close(fresh(x), before)


# ------------------------------------------------------------------ every model: callback and checkpoints
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("kind", KINDS)
def test_callback_adapts_every_space_and_checkpoints_reload_and_resume(tmp_path, kind):
    pl.seed_everything(0)
    loader = DataLoader(blobs(n=96), batch_size=32)
    model = Classifier(kind)
    start = widths(model)
    assert sorted(start) == EXPECTED_SPACES[kind]
    callback = DynamicTopologyCallback(Scripted(), verbose=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "saved", save_last=True)
    trainer(tmp_path, [callback, checkpoints], max_epochs=3).fit(model, loader)
    assert sorted((e["space"], e["op"]) for e in callback.events) == sorted(
        [(n, "grow") for n in start] + [(n, "shrink") for n in start])
    for event in callback.events:
        assert math.isfinite(event["error_estimate"])
        assert event["exact"] if event["op"] == "grow" else event["error_estimate"] >= 0
    final = widths(model)
    assert final == {n: w + 1 for n, w in start.items()}

    loaded = Classifier.load_from_checkpoint(checkpoints.last_model_path)
    assert widths(loaded) == final
    x, _ = data()
    model.eval()
    with torch.no_grad():
        close(loaded(x), model(x))

    resumed = Classifier(kind)
    assert widths(resumed) == start
    again = DynamicTopologyCallback(Scripted(), verbose=0)
    t = trainer(tmp_path, [again, ModelCheckpoint(dirpath=tmp_path / "saved", save_last=True)], max_epochs=4)
    t.fit(resumed, loader, ckpt_path=checkpoints.last_model_path)
    assert resumed.steps_run == len(loader) and t.global_step == 4 * len(loader)  # only epoch 3 ran
    assert widths(resumed) == final  # no change planned for epoch 3
    assert len(again.events) == len(callback.events)  # the history came back with the checkpoint
    for p in resumed.parameters():  # the restored optimizer state has the resized shapes
        state = t.optimizers[0].state[p]
        assert state["exp_avg"].shape == p.shape


# ------------------------------------------------------------------ 6: refusals
@pytest.mark.parametrize("act, value", [(nn.Sigmoid(), "0.5"), (nn.Softplus(), "0.693147")])
def test_convert_refuses_an_activation_with_nonzero_value_at_zero_naming_it(act, value):
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6), act, nn.Linear(6, 2))
    with pytest.raises(ValueError, match=rf"chain at `3` \({type(act).__name__}\).*f\(0\) = 0.*gives f\(0\) = {value}"):
        convert(model)
    assert not find_spaces(model)  # all or nothing: the GELU chain was not declared either
    convert(model, skip_unsupported=True)
    assert list(find_spaces(model)) == ["hidden.0"]
    assert find_spaces(model)["hidden.0"].weight_in.tensor is model[0].weight


def test_convert_without_any_chain_says_so_and_a_second_conversion_changes_nothing():
    with pytest.raises(ValueError, match="found none: there is nothing to convert.*declare_space"):
        convert(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)))
    with pytest.raises(ValueError, match="found none"):
        convert(nn.Sequential(nn.Linear(4, 6), nn.Flatten(), nn.Linear(6, 2)))
    with pytest.raises(ValueError, match="an nn.Module"):
        convert("not a model")
    model = convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 5), nn.Tanh(),
                                  nn.Linear(5, 2)))
    assert sorted(find_spaces(model)) == ["hidden.0", "hidden.1"]
    assert find_spaces(model)["hidden.0"].weight_out.tensor is model[3].weight
    assert convert(model) is model
    assert sorted(find_spaces(model)) == ["hidden.0", "hidden.1"]


def test_a_callback_on_a_model_without_spaces_names_the_ways_to_get_one(tmp_path):
    class Plain(Classifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3))

    with pytest.raises(ValueError, match="found no neuron space.*convert.*declare_space"):
        trainer(tmp_path, [DynamicTopologyCallback(Scripted())], max_epochs=1).fit(
            Plain(), DataLoader(blobs(n=32), batch_size=32))


# ------------------------------------------------------------------ 7: the last axis, as nn.Linear
def test_dense_layers_act_on_the_last_axis_of_any_leading_shape():
    x = torch.randn(8, 28, 64)
    layer = IsoLinear(64, 32)
    reference = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        layer.bias.copy_(reference.bias)
        assert layer(x).shape == (8, 28, 32)
        close(layer(x), reference(x))

    net = IsotropicMLP([64, 48, 40, 64], psi="trainable", length="trainable")
    with torch.no_grad():
        for i in range(3):
            layer = net.affine(i)
            if layer.correction is not None:
                layer.correction.normal_()  # the correction path acts per position too
        y = net(x)
        assert y.shape == (8, 28, 64)
        close(y, net(x.reshape(-1, 64)).reshape(8, 28, 64))
        close(y[3, 7], net(x[3, 7][None])[0])
    opt = torch.optim.AdamW(net.parameters())
    net.grow(0, 5, optimizer=opt)
    with torch.no_grad():
        close(net(x), y)
    report = net.shrink(1, 6, optimizer=opt, probe=x)
    with torch.no_grad():
        change = float((net(x) - y).abs().max())
    assert report.measured_error == pytest.approx(change, rel=1e-5)
    assert net.hidden_widths == [53, 34]
    loss = net(x).square().mean()
    loss.backward()
    opt.step()
