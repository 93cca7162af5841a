"""The callback as Lightning users run it: checkpoint scores, refused callbacks and strategies, metrics,
console output, policies that wait for metrics, CLI-free configuration details."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from _helpers import IsoModule, loaders, trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning
from lightning.pytorch.loggers import CSVLogger

import iso_lightning
from iso_lightning import (
    DynamicTopologyCallback,
    IsotropicMLP,
    LossPlateauPolicy,
    PolicyContext,
    ScaffoldPolicy,
    UnsupportedOptimizerError,
    WidthSchedulePolicy,
    describe,
)

torch.set_num_threads(1)
PACKAGE = Path(iso_lightning.__file__).parent


# ------------------------------------------------------------------ 2: scores belong to their weights
@pytest.mark.parametrize("trigger", [{"every_n_epochs": 1}, {"every_n_epochs": None, "every_n_steps": 4}])
def test_every_checkpoint_score_describes_the_weights_it_is_stored_with(tmp_path, trigger):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), verbose=0, **trigger)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1,
                                  filename="{epoch}-{step}")
    train, val = loaders()
    trainer(tmp_path, [callback, checkpoints], max_epochs=4).fit(model, train, val)
    assert callback.events, "no change happened: the test would not see a score of another model"
    widths = set()
    assert len(checkpoints.best_k_models) == 4
    for path, score in checkpoints.best_k_models.items():
        loaded = IsoModule.load_from_checkpoint(path)
        widths.add(tuple(loaded.net.hidden_widths))
        again = trainer(tmp_path, []).validate(loaded, val, verbose=False)[0]["val_loss"]
        assert again == pytest.approx(float(score), rel=1e-5), path
    assert len(widths) > 1  # the checkpoints hold several topologies, each scored on its own
    # `ckpt_path="best"` is then a model whose score is its own.
    best = trainer(tmp_path, []).validate(model, val, ckpt_path=checkpoints.best_model_path, verbose=False)
    assert best[0]["val_loss"] == pytest.approx(float(checkpoints.best_model_score), rel=1e-5)


def test_early_stopping_and_checkpoints_can_monitor_topology_figures(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    callback = DynamicTopologyCallback(WidthSchedulePolicy(targets=10, start_epoch=0, end_epoch=2), verbose=0)
    stop = EarlyStopping(monitor="topology/parameters", mode="max", patience=1)
    train, val = loaders()
    t = trainer(tmp_path, [callback, stop], max_epochs=20)
    t.fit(model, train, val)
    assert model.net.hidden_widths == [10, 10]
    assert t.current_epoch < 20  # stopped once the parameter count stopped rising
    assert float(t.callback_metrics["topology/parameters"]) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ 4, 5: refused at setup
def test_model_pruning_and_fsdp_subclasses_are_refused_at_setup(tmp_path):
    model = IsoModule()
    train, val = loaders()
    callback = DynamicTopologyCallback(ScaffoldPolicy())
    with pytest.raises(ValueError, match="ModelPruning.*old shapes"):
        trainer(tmp_path, [callback, ModelPruning("l1_unstructured", amount=0.1)], max_epochs=1).fit(model, train)
    assert model.net.hidden_widths == [6, 6]
    from lightning.pytorch.strategies import FSDPStrategy

    class MyFSDP(FSDPStrategy):
        pass

    with pytest.raises(ValueError, match="MyFSDP.*FSDPStrategy"):
        callback.setup(SimpleNamespace(strategy=MyFSDP(), callbacks=[callback]), model, "fit")


def test_a_module_without_the_mixin_is_refused_before_anything_changes(tmp_path):
    class NoMixin(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = IsotropicMLP([8, 6, 3])

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = NoMixin()
    with pytest.raises(ValueError, match="IsotropicModuleMixin"):
        trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(0.95, 2))], max_epochs=2).fit(model, loaders()[0])
    assert model.net.hidden_widths == [6]


# ------------------------------------------------------------------ 6: on_unknown
class AdadeltaModule(IsoModule):
    def configure_optimizers(self):
        return torch.optim.Adadelta(self.parameters())


def test_on_unknown_is_an_option_of_the_callback(tmp_path):
    train, val = loaders()
    pl.seed_everything(0)
    with pytest.raises(UnsupportedOptimizerError, match="on_unknown='reset'"):
        trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), verbose=0)], max_epochs=3).fit(
            AdadeltaModule(), train, val)
    pl.seed_everything(0)
    model = AdadeltaModule()
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), verbose=0, on_unknown="reset")
    trainer(tmp_path, [callback], max_epochs=3).fit(model, train, val)
    assert callback.events and all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="`on_unknown`.*'raise', 'reset'"):
        DynamicTopologyCallback(ScaffoldPolicy(), on_unknown="ignore")


# ------------------------------------------------------------------ 7: metrics that do not exist yet
def test_loss_plateau_policy_with_step_triggers_waits_for_its_metric(tmp_path):
    pl.seed_everything(0)
    model = IsoModule()
    policy = LossPlateauPolicy("val_loss", patience=0, grow_by=1, scaffold=None)
    callback = DynamicTopologyCallback(policy, every_n_epochs=None, every_n_steps=2, verbose=0)
    train, val = loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_epochs=3).fit(model, train, val)
    waiting = [w for w in caught if "has not been logged yet" in str(w.message)]
    assert len(waiting) == 1  # warned once, no decision before the first validation
    assert callback.events and min(e["step"] for e in callback.events) > 6  # the first epoch has 6 steps


def test_a_metric_that_never_appears_is_an_error_naming_the_logged_ones(tmp_path):
    pl.seed_everything(0)
    callback = DynamicTopologyCallback(LossPlateauPolicy("val_los"), every_n_epochs=None, every_n_steps=2, verbose=0)
    train, val = loaders()
    with pytest.raises(ValueError, match=r"`val_los`.*'val_loss'"):
        trainer(tmp_path, [callback], max_epochs=3).fit(IsoModule(), train, val)


# ------------------------------------------------------------------ 8: patterns that match nothing
def test_a_pattern_that_matches_no_space_is_an_error_listing_the_spaces(tmp_path):
    callback = DynamicTopologyCallback(ScaffoldPolicy(spaces=["hidden.0"]))
    with pytest.raises(ValueError, match=r"'hidden.0' matches no neuron space.*\['net.hidden.0', 'net.hidden.1'\]"):
        trainer(tmp_path, [callback], max_epochs=1).fit(IsoModule(), loaders()[0])
    with pytest.raises(ValueError, match="'hidden.*' matches no neuron space"):
        trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(max_width={"hidden.*": 9}))], max_epochs=1).fit(
            IsoModule(), loaders()[0])


# ------------------------------------------------------------------ 9: scale-free thresholds, max_shrink
def test_default_init_is_not_cut_to_a_few_neurons_in_one_decision():
    torch.manual_seed(0)
    net = IsotropicMLP([784, 256, 10], init="default")
    info = describe(net)
    assert float(info["hidden.0"].singular_values.max()) < 0.95  # the absolute threshold sees only scaffold
    with pytest.warns(UserWarning, match="clipped to 128 by `max_shrink=0.5`"):
        assert ScaffoldPolicy(0.95, 5).decide(info, PolicyContext()) == {"hidden.0": 128}
    # Relative to the space's own scale the decision does not depend on the initialisation's scale.
    relative = ScaffoldPolicy(0.5, 5, relative_to="median")
    decision = relative.decide(info, PolicyContext())
    with torch.no_grad():
        net.layers[0].weight.mul_(37.0)
    assert ScaffoldPolicy(0.5, 5, relative_to="median").decide(describe(net), PolicyContext()) == decision
    # "initial" keeps the first reference: shrinking the weights afterwards makes directions scaffold.
    initial = ScaffoldPolicy(0.5, 5, relative_to="initial", max_shrink=1.0)
    first = initial.decide(describe(net), PolicyContext())
    with torch.no_grad():
        net.layers[0].weight.mul_(0.1)
    assert initial.decide(describe(net), PolicyContext()) != first
    with pytest.raises(ValueError, match="`relative_to`"):
        ScaffoldPolicy(relative_to="max")
    with pytest.raises(ValueError, match="`max_shrink`"):
        ScaffoldPolicy(max_shrink=0.0)


# ------------------------------------------------------------------ 10: console output
CONSOLE_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.filterwarnings("ignore")
import lightning.pytorch as pl, torch
from _helpers import IsoModule, loaders
from iso_lightning import DynamicTopologyCallback, ScaffoldPolicy
pl.seed_everything(0, verbose=False)
train, val = loaders()
callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), dry_run={dry_run})
pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
           enable_model_summary=False, enable_progress_bar=True, callbacks=[callback]).fit(IsoModule(), train, val)
print("DECISIONS", len(callback.events))
"""


@pytest.mark.parametrize("dry_run", [False, True])
def test_console_lines_stand_alone_and_are_printed_once(tmp_path, dry_run):
    code = CONSOLE_SCRIPT.format(tests=str(Path(__file__).parent), dry_run=dry_run)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "topology_events.csv").exists()  # the run's files went to its own directory
    text = proc.stdout + proc.stderr
    events = int(proc.stdout.split("DECISIONS ")[1].split()[0])
    assert events > 0
    lines = [line for chunk in text.splitlines() for line in chunk.split("\r") if "[iso_lightning] epoch" in line]
    assert len(lines) == events  # one line per decision, not two
    assert all(line.startswith("[iso_lightning] epoch") for line in lines)  # never glued to the bar
    assert all(("would change" in line) == dry_run for line in lines)


def test_messages_go_through_a_logger_users_can_filter(tmp_path, caplog):
    import logging

    log = logging.getLogger("iso_lightning")
    pl.seed_everything(0)
    train, val = loaders()
    previous = log.level
    try:
        log.setLevel(logging.WARNING)
        with caplog.at_level(logging.WARNING, logger="iso_lightning"):
            trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(0.95, 2))], max_epochs=3).fit(
                IsoModule(), train, val)
        assert not [r for r in caplog.records if r.name == "iso_lightning"]
        log.setLevel(logging.INFO)
        with caplog.at_level(logging.INFO, logger="iso_lightning"):
            trainer(tmp_path, [DynamicTopologyCallback(ScaffoldPolicy(0.95, 2))], max_epochs=3).fit(
                IsoModule(), train, val)
        assert [r for r in caplog.records if r.name == "iso_lightning" and "epoch" in r.getMessage()]
    finally:
        log.setLevel(previous)


def test_progress_bar_values_are_computed_when_widths_change_not_every_batch(tmp_path, monkeypatch):
    calls = []
    original = DynamicTopologyCallback._publish

    def counting(self, trainer, pl_module):
        calls.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(DynamicTopologyCallback, "_publish", counting)
    pl.seed_everything(0)
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), verbose=0)
    train, val = loaders()
    t = trainer(tmp_path, [callback], max_epochs=3)
    t.fit(IsoModule(), train, val)
    # Once at the start, once per epoch end, once per change: far fewer than the 18 batches.
    assert len(calls) == 1 + 3 + len({e["step"] for e in callback.events})


# ------------------------------------------------------------------ 11: metrics.csv
def test_topology_figures_are_logged_once_per_step_with_the_epoch(tmp_path):
    import csv

    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="csv")
    callback = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), every_n_epochs=None, every_n_steps=3, verbose=0)
    train, val = loaders()
    pl.Trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[callback], logger=logger, accelerator="cpu",
               devices=1, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1).fit(
        IsoModule(), train, val)
    rows = [r for r in csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv")))
            if r.get("topology/parameters")]
    steps = [r["step"] for r in rows]
    assert rows and len(steps) == len(set(steps))
    assert all(r["epoch"] != "" for r in rows)


# ------------------------------------------------------------------ 13: history across a policy change
def test_a_named_callback_keeps_its_history_across_a_change_of_policy(tmp_path):
    pl.seed_everything(0)
    train, val = loaders()
    first = DynamicTopologyCallback(ScaffoldPolicy(0.95, 2), name="topology", verbose=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [first, checkpoints], max_epochs=3).fit(IsoModule(), train, val)
    assert first.events
    second = DynamicTopologyCallback(WidthSchedulePolicy(targets=12, start_epoch=3, end_epoch=4), name="topology",
                                     verbose=0)
    model = IsoModule()
    trainer(tmp_path, [second], max_epochs=5).fit(model, train, val, ckpt_path=checkpoints.last_model_path)
    assert second.events[:len(first.events)] == first.events
    assert len(second.events) > len(first.events) and model.net.hidden_widths == [12, 12]
    unnamed = DynamicTopologyCallback(WidthSchedulePolicy(targets=12))
    assert unnamed.state_key != second.state_key  # without a name, the policy class tells callbacks apart


# ------------------------------------------------------------------ 1: no collective in a rank branch
_COLLECTIVES = {"broadcast", "barrier", "log_dir", "all_gather", "reduce", "reduce_boolean_decision"}
_RANK = {"is_global_zero", "global_rank", "local_rank", "rank"}


def _names(node):
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def test_no_collective_runs_inside_a_rank_dependent_branch():
    offences = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp)) and _names(node.test) & _RANK:
                body = node.body + node.orelse if isinstance(node, ast.If) else [node.body, node.orelse]
                for part in body:
                    found = _names(part) & _COLLECTIVES
                    if found:
                        offences.append(f"{path.name}:{node.lineno}: {sorted(found)}")
            # An early return on a rank test makes the rest of the function rank-dependent.
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for i, statement in enumerate(node.body):
                    if isinstance(statement, ast.If) and _names(statement.test) & _RANK and any(
                            isinstance(s, ast.Return) for s in statement.body):
                        rest = _names(ast.Module(body=node.body[i + 1:], type_ignores=[]))
                        if rest & _COLLECTIVES:
                            offences.append(f"{path.name}:{statement.lineno}: {sorted(rest & _COLLECTIVES)} after "
                                            "a rank-dependent return")
    assert not offences, offences


def test_the_checker_above_finds_the_pattern_that_used_to_hang():
    source = ("def f(trainer):\n    if trainer.is_global_zero:\n        path = trainer.log_dir\n")
    tree = ast.parse(source)
    branch = next(n for n in ast.walk(tree) if isinstance(n, ast.If))
    assert _names(branch.test) & _RANK and _names(branch.body[0]) & _COLLECTIVES



# ------------------------------------------------------------------ issue 12: load_state_dict of other widths
def test_load_state_dict_of_a_resized_module_resizes_a_fresh_one_first():
    torch.manual_seed(0)
    trained = IsoModule()
    opt = torch.optim.Adam(trained.parameters())
    trained.set_widths({"net.hidden.0": 9, "net.hidden.1": 4}, optimizer=opt)
    fresh = IsoModule()
    params = {name: id(p) for name, p in fresh.named_parameters()}
    fresh.load_state_dict(trained.state_dict())
    assert fresh.net.hidden_widths == [9, 4]
    assert {name: id(p) for name, p in fresh.named_parameters()} == params  # the same Parameter objects
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    # A state dict of another architecture changes nothing and says why.
    other = IsoModule(sizes=(8, 6, 3)).state_dict()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="nothing was changed"):
        fresh.load_state_dict(other)
    assert fresh.net.hidden_widths == [9, 4]
    for key, value in before.items():
        assert torch.equal(fresh.state_dict()[key], value)
