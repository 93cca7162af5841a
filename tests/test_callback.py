"""DynamicTopologyCallback and IsotropicModuleMixin in real (tiny) Lightning runs."""

import pickle
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import IsoModule, blobs, loaders, trainer  # noqa: E402,F401
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging

from iso_lightning import IsotropicMLP, ScaffoldPolicy, WidthSchedulePolicy
from iso_lightning.callback import DynamicTopologyCallback
from iso_lightning.mixin import TOPOLOGY_KEY, IsotropicModuleMixin

torch.set_num_threads(1)


class Consistency(Callback):
    """After every batch: the optimizer holds exactly the model's parameters, with matching state shapes."""

    def __init__(self):
        self.checked = 0
        self.losses = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = {id(p) for p in pl_module.parameters()}
        for opt in trainer.optimizers:
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            assert held == params
            for p, state in opt.state.items():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        assert value.shape == p.shape
        self.checked += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def test_fit_grows_and_shrinks_and_keeps_optimizer_consistent(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), log_dir=str(tmp_path))
    check = Consistency()
    train, val = loaders()
    trainer(tmp_path, [callback, check], max_epochs=8).fit(model, train, val)
    ops = {e["op"] for e in callback.events}
    assert {"grow", "shrink"} <= ops, callback.events
    assert check.checked >= 8 * len(train)
    assert check.losses[-1] < check.losses[0]
    assert model.net.hidden_widths != [6, 6]
    lines = (tmp_path / "topology_events.csv").read_text().splitlines()
    assert len(lines) == len(callback.events) + 1 and lines[0].startswith("step,epoch,space,op")


def test_resume_matches_uninterrupted_run(tmp_path):
    policy = lambda: ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12)  # noqa: E731
    train, val = loaders()

    pl.seed_everything(0)
    straight = IsoModule()
    trainer(tmp_path / "a", [DynamicTopologyCallback(policy(), verbose=0)], max_epochs=6).fit(straight, train, val)

    pl.seed_everything(0)
    first = IsoModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", [DynamicTopologyCallback(policy(), verbose=0), ckpt], max_epochs=3).fit(first, train, val)
    assert first.net.hidden_widths != [6, 6]  # the checkpoint holds a changed topology

    pl.seed_everything(0)
    resumed = IsoModule()  # built with the original widths
    callback = DynamicTopologyCallback(policy(), verbose=0)
    trainer(tmp_path / "c", [callback], max_epochs=6).fit(resumed, train, val, ckpt_path=ckpt.last_model_path)
    assert resumed.net.hidden_widths == straight.net.hidden_widths
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(callback.events) >= 1  # the history came back with the checkpoint


def test_load_from_checkpoint_without_callback(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train, val = loaders()
    trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(0.95, 3), verbose=0), ckpt], max_epochs=3).fit(
        model, train, val)
    checkpoint = torch.load(ckpt.last_model_path, weights_only=False)
    spaces = checkpoint[TOPOLOGY_KEY]["spaces"]
    assert [spaces[f"net.hidden.{i}"]["width"] for i in range(2)] == model.net.hidden_widths
    loaded = IsoModule.load_from_checkpoint(ckpt.last_model_path)
    x = blobs().tensors[0][:16]
    assert loaded.net.hidden_widths == model.net.hidden_widths
    torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_from_other_architecture_is_refused(tmp_path):
    model = IsoModule()
    record = {"net": {"in_features": 8, "out_features": 3, "hidden_widths": [5], "groups": [None]}}  # 0.1 format
    with pytest.raises(ValueError, match=r"missing \['net.hidden.1'\].*different architecture"):
        model.on_load_checkpoint({TOPOLOGY_KEY: record})
    with pytest.raises(ValueError, match="different architecture"):
        model.on_load_checkpoint({TOPOLOGY_KEY: {"encoder": record["net"]}})
    current = model.topology()
    current["spaces"]["encoder.hidden.0"] = current["spaces"].pop("net.hidden.0")
    with pytest.raises(ValueError, match=r"unknown \['encoder.hidden.0'\]"):
        model.on_load_checkpoint({TOPOLOGY_KEY: current})
    assert model.net.hidden_widths == [6, 6]


def test_dry_run_changes_nothing(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 3), dry_run=True, verbose=0)
    train, val = loaders()
    trainer(tmp_path, [callback], max_epochs=2).fit(model, train, val)
    assert model.net.hidden_widths == [6, 6]
    assert callback.events and all(e["op"] == "dry_run" for e in callback.events)


class StepRecorder(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_every_n_steps_only_at_real_step_boundaries(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    schedule = WidthSchedulePolicy(targets=10, start_epoch=0, end_epoch=1)
    # Width schedule by epoch: at epoch 1 the target is reached. Steps: 6 batches / 2 accumulated = 3 per epoch.
    callback = DynamicTopologyCallback(schedule, every_n_epochs=None, every_n_steps=2, verbose=0)
    train, val = loaders(batch_size=32)
    trainer(tmp_path, [callback], max_epochs=3, accumulate_grad_batches=2).fit(model, train, val)
    assert callback.events
    assert all(e["step"] % 2 == 0 and e["step"] > 0 for e in callback.events)
    assert model.net.hidden_widths == [10, 10]


def test_non_finite_spectrum_skips_with_warning_naming_the_space(tmp_path):
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 3), verbose=0)
    with torch.no_grad():
        model.net.layers[1].weight[0, 0] = float("nan")
    fake = SimpleNamespace(is_global_zero=True, global_step=5, current_epoch=1, strategy=SimpleNamespace(
        broadcast=lambda obj, src=0: obj), callback_metrics={}, optimizers=[])
    callback._bind(model)
    # W_1 reads hidden.0 (its columns) and writes hidden.1: the first space checked is named.
    with pytest.warns(RuntimeWarning, match=r"`net\.hidden\.0`"):
        callback._adapt(fake, model)
    assert model.net.hidden_widths == [6, 6] and callback.skipped
    strict = DynamicTopologyCallback(ScaffoldPolicy(0.95, 3), on_nonfinite="raise")
    strict._bind(model)
    from iso_lightning import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"`net\.hidden\.0`"):
        strict._adapt(fake, model)


def test_refuses_weight_averaging_and_sharded_strategies(tmp_path):
    model = IsoModule()
    train, val = loaders()
    callback = DynamicTopologyCallback(ScaffoldPolicy())
    with pytest.raises(ValueError, match="StochasticWeightAveraging"):
        trainer(tmp_path, [callback, StochasticWeightAveraging(swa_lrs=0.01)], max_epochs=1).fit(model, train, val)
    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[callback])
    with pytest.raises(ValueError, match="FSDPStrategy"):
        callback.setup(fake, model, "fit")


def test_refuses_module_without_isotropic_network(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 3)

    class WithMixin(IsotropicModuleMixin, Plain):
        pass

    fake = SimpleNamespace(strategy=SimpleNamespace(), callbacks=[])
    with pytest.raises(ValueError, match="IsotropicModuleMixin"):
        DynamicTopologyCallback(ScaffoldPolicy()).setup(fake, Plain(), "fit")
    with pytest.raises(ValueError, match="found no neuron space.*iso_lightning.convert"):
        DynamicTopologyCallback(ScaffoldPolicy()).setup(fake, WithMixin(), "fit")


def test_two_callbacks_coexist_on_disjoint_spaces_and_clash_otherwise(tmp_path):
    model = IsoModule()
    a = DynamicTopologyCallback(ScaffoldPolicy(spaces=["net.hidden.0"]), name="first")
    b = DynamicTopologyCallback(ScaffoldPolicy(spaces=["*.hidden.1"]), name="second")
    assert a.state_key != b.state_key
    def fake(*callbacks):
        return SimpleNamespace(strategy=SimpleNamespace(), callbacks=list(callbacks), log_dir=str(tmp_path),
                               progress_bar_callback=None)

    a.setup(fake(a, b), model, "fit")
    b.setup(fake(a, b), model, "fit")
    c = DynamicTopologyCallback(ScaffoldPolicy(), name="third")
    with pytest.raises(ValueError, match="same spaces"):
        c.setup(fake(a, c), model, "fit")


def test_callback_pickles_with_its_state():
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.9, 4, cooldown=1))
    callback.events.append({"space": "hidden.0", "op": "grow", "new_width": 7, "step": 3, "epoch": 0})
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.events == callback.events and clone.policy.threshold == 0.9
    fresh = DynamicTopologyCallback(ScaffoldPolicy(0.9, 4, cooldown=1))
    fresh.load_state_dict(callback.state_dict())
    assert fresh.events == callback.events


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "scaffold"}, "`policy`"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
        ({"every_n_steps": -1, "every_n_epochs": None}, "`every_n_steps`"),
        ({"every_n_epochs": None}, "both are None"),
        ({"every_n_epochs": 1, "every_n_steps": 5}, "only one"),
        ({"start_epoch": -1}, "`start_epoch`"),
        ({"dry_run": "yes"}, "`dry_run`"),
        ({"verbose": 3}, "`verbose`"),
        ({"on_nonfinite": "ignore"}, "`on_nonfinite`"),
        ({"seed": -1}, "`seed`"),
        ({"name": 3}, "`name`"),
    ],
)
def test_misconfiguration(kwargs, match):
    kwargs = {"policy": ScaffoldPolicy(), **kwargs}
    with pytest.raises(ValueError, match=match):
        DynamicTopologyCallback(**kwargs)


def test_sanity_check_never_adapts(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 3), verbose=0)
    train, val = loaders()
    t = trainer(tmp_path, [callback], max_epochs=1, num_sanity_val_steps=2, limit_train_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train, val)
    assert model.net.hidden_widths == [6, 6] and not callback.events


# ---------------------------------------------------------------------------- monitoring
def test_monitoring_reaches_loggers_progress_bar_and_figure(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities.model_summary import ModelSummary

    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), verbose=0)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    train, val = loaders()
    t = pl.Trainer(default_root_dir=tmp_path, max_epochs=4, callbacks=[callback], logger=loggers,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    t.fit(model, train, val)
    # Progress bar: total hidden width of the final model (changes happen at epoch starts, so the
    # last epoch's snapshot is of the final widths), always in the same compact format.
    last = [h for h in callback.history if h["epoch"] == 3]
    assert t.progress_bar_metrics["hidden"] == str(sum(h["width"] for h in last)) == str(sum(model.net.hidden_widths))
    params = sum(p.numel() for p in model.parameters())
    assert t.progress_bar_metrics["params"] == (f"{params / 1e3:.3g}k" if params >= 1e3 else str(params))
    # Monitorable: the figures are in callback_metrics.
    assert float(t.callback_metrics["topology/parameters"]) == params
    # CSV metrics: one row of per-space figures per epoch.
    import csv

    rows = list(csv.DictReader(open(loggers[0].log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("topology/net.hidden.0/width")]
    steps = [int(r["step"]) for r in logged]
    assert len(steps) == len(set(steps))  # one row per step
    assert all(r["epoch"] for r in logged)
    ends = [r for r in logged if r.get("topology/net.hidden.0/effective_rank")]  # one per epoch end
    assert len(ends) == 4 and float(ends[0]["topology/net.hidden.0/width"]) == 6.0
    # A change's widths reach the log (at the step after the change when that step was logged already).
    assert len(logged) == 4 + len({e["step"] for e in callback.events})
    key = "topology/net.hidden.0/effective_rank"
    ranks = [float(r[key]) for r in rows if r.get(key)]
    assert all(0 < r <= 12 for r in ranks)
    # TensorBoard: histograms and the figure were written.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(loggers[1].log_dir, size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    assert "topology/net.hidden.0/singular_values" in acc.Tags()["histograms"]
    assert "topology" in acc.Tags()["images"]
    # The PNG exists, and the history behind it covers every epoch and space.
    assert callback.figure_path and open(callback.figure_path, "rb").read(4) == b"\x89PNG"
    assert len(callback.history) == 4 * 2
    # The model summary describes the current sizes.
    summary = ModelSummary(model, max_depth=-1)
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())


def test_bf16_mixed_precision_and_gradient_clipping(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), verbose=0)
    train, val = loaders()
    trainer(tmp_path, [callback], max_epochs=4, precision="bf16-mixed", gradient_clip_val=0.5).fit(model, train, val)
    assert callback.events
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # spectra come from float32 weights


class TwoOptimizers(IsoModule):
    """Manual optimization: layer 0 has its own optimizer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, rest = self.optimizers()
        loss = F.cross_entropy(self(x), y) + self.psi_regularisation()
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(loss)
        first.step()
        rest.step()
        self.log("train_loss", loss, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if n.startswith("net.layers.0.")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.layers.0.")]
        return torch.optim.SGD(first, lr=0.05, momentum=0.9), torch.optim.Adam(rest, lr=0.02)


def test_several_optimizers_each_get_their_state_remapped(tmp_path):
    pl.seed_everything(0)
    model = TwoOptimizers()
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), verbose=0)
    train, val = loaders()
    t = trainer(tmp_path, [callback], max_epochs=4)
    t.fit(model, train, val)
    assert callback.events
    first, rest = t.optimizers
    assert model.net.layers[0].weight in first.state  # SGD momentum survived the changes, reshaped
    assert first.state[model.net.layers[0].weight]["momentum_buffer"].shape == model.net.layers[0].weight.shape
    assert rest.state[model.net.layers[1].weight]["exp_avg"].shape == model.net.layers[1].weight.shape
    held = [id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one
    for opt in t.optimizers:
        for p, state in opt.state.items():
            assert all(v.shape == p.shape for v in state.values() if isinstance(v, torch.Tensor) and v.dim())


class GroupedModule(IsoModule):
    def __init__(self):
        super().__init__()
        self.net = IsotropicMLP([8, 6, 6, 3], psi="decay", length="trainable", group_size=2,
                                generator=torch.Generator().manual_seed(1))


def test_grouped_network_needs_no_special_case(tmp_path):
    pl.seed_everything(0)
    model = GroupedModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), verbose=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train, val = loaders()
    trainer(tmp_path, [callback, ckpt, Consistency()], max_epochs=6).fit(model, train, val)
    assert callback.events
    for layer in range(2):
        index = model.net.activation(layer).group_index
        assert index is not None and torch.bincount(index).min() >= 1  # every group kept a neuron
    loaded = GroupedModule.load_from_checkpoint(ckpt.last_model_path)
    x = blobs().tensors[0][:8]
    torch.testing.assert_close(loaded(x), model(x))


def test_final_topology_is_recorded_beside_the_starting_hyperparameters(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0)
    model = IsoModule()
    logger = CSVLogger(tmp_path, name="csv")
    callback = DynamicTopologyCallback(ScaffoldPolicy(threshold=0.5, scaffold=2, max_width=12), verbose=0)
    train, val = loaders()
    pl.Trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[callback], logger=logger,
               enable_progress_bar=False, enable_model_summary=False).fit(model, train, val)
    import yaml

    hparams = yaml.load(open(logger.log_dir + "/hparams.yaml"), Loader=yaml.UnsafeLoader)  # tuples as written
    assert list(hparams["sizes"]) == [8, 6, 6, 3]  # the starting widths, as constructed
    assert hparams["final_topology"] == {"net.hidden.0": model.net.hidden_widths[0],
                                         "net.hidden.1": model.net.hidden_widths[1]}
    assert model.net.hidden_widths != [6, 6]
