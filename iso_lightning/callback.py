"""``DynamicTopologyCallback``: grow and shrink a LightningModule's neuron spaces during ``fit``.

The callback is glue: the decisions come from a :mod:`~iso_lightning.policies` policy and the tensor
work from :mod:`~iso_lightning.operations`.

.. rubric:: When a change happens

With ``every_n_epochs`` the policy runs at the **start** of every n-th epoch after the first, on the
weights, spectra and metrics the previous epoch ended with; with ``every_n_steps`` at the start of
the batch that follows every n-th optimizer step (never inside gradient accumulation, never
during the sanity check). So everything Lightning measures and saves at the end of an epoch or a
step (validation, ``ModelCheckpoint``'s score, ``EarlyStopping``'s metric) belongs to the weights it
is stored with; the first epoch after a change trains, validates and checkpoints the changed model.
The metrics the policy saw are kept in the callback's state, so a resumed run makes the same
decision as an uninterrupted one.
"""

from __future__ import annotations

import csv
import fnmatch
import gc
import logging
import os
import pickle
import sys
import uuid
import warnings
from typing import Any, Dict, List, Mapping, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.model_helpers import is_overridden

from iso_lightning._validation import check_int as _check_int
from iso_lightning.errors import NonFiniteError
from iso_lightning.mixin import IsotropicModuleMixin, register_results_sink
from iso_lightning.operations import ON_UNKNOWN
from iso_lightning.plots import topology_image
from iso_lightning.policies import (
    CompositePolicy,
    ParameterBudgetPolicy,
    PolicyContext,
    SpaceInfo,
    TopologyPolicy,
    apply_decision,
    describe,
)
from iso_lightning.providers import find_spaces
from iso_lightning.spaces import NeuronSpace

__all__ = ["REFUSED_CALLBACKS", "REFUSED_STRATEGIES", "DynamicTopologyCallback", "log"]

#: Messages of the package ("[iso_lightning] ..."): filter them with the logging module.
log = logging.getLogger("iso_lightning")

#: Strategies (and their subclasses) that shard or compile parameters whose shapes the callback changes.
REFUSED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
                      "SingleDeviceXLAStrategy")
#: Callbacks (and their subclasses) that keep tensors shaped like the parameters.
REFUSED_CALLBACKS = ("WeightAveraging", "StochasticWeightAveraging", "ModelPruning")


class _ConsoleHandler(logging.Handler):
    """Writes through the trainer's progress bar (so lines stand alone), else to standard output."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.progress_bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            bar = self.progress_bar
            if bar is not None and getattr(bar, "is_enabled", False) and hasattr(bar, "print"):
                bar.print(message)
            else:
                print(message, file=sys.stdout, flush=True)
        except Exception:  # a logging handler must never raise
            self.handleError(record)


_console = _ConsoleHandler()
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.setLevel(logging.INFO)
    log.addHandler(_console)
    log.propagate = False


def _compact(value: float) -> str:
    """A count as the progress bar shows it: ``950``, ``17.2k``, ``3.41M`` (always the same format)."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{int(value)}"


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (a broadcast), else a ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _policies(policy: TopologyPolicy) -> List[TopologyPolicy]:
    out = [policy]
    if isinstance(policy, CompositePolicy):
        for sub in policy.policies:
            out += _policies(sub)
    if isinstance(policy, ParameterBudgetPolicy):
        out += _policies(policy.policy)
    return out


class DynamicTopologyCallback(Callback):
    """Apply a topology policy to the neuron spaces of a LightningModule while it trains.

    Args:
        policy: a :class:`~iso_lightning.TopologyPolicy` (e.g. ``ScaffoldPolicy(0.95, 5)``).
        every_n_epochs: run the policy at the start of every n-th epoch (``None``: never).
        every_n_steps: run it after every n-th optimizer step (``None``: never).
        start_epoch: no change before this epoch has been trained.
        dry_run: log what would change, change nothing.
        verbose: 0 silent, 1 one line per change, 2 also the singular values involved.
        on_nonfinite: ``"skip"`` an adaptation whose spectra, gradients or optimizer state are not
            finite, with a warning naming the tensor, or ``"raise"``.
        on_unknown: ``"raise"`` for an optimizer with no remapping rule, or ``"reset"`` to drop the
            state of the changed parameters.
        log_dir: where ``topology_events.csv`` and ``topology.png`` go (default: the trainer's log
            directory).
        seed: seed of the random outgoing weights of new neurons (identical on every rank).
        name: distinguishes two callbacks in a checkpoint (``state_key``); with a name the history
            also survives a change of policy class between runs.

    Example::

        trainer = L.Trainer(callbacks=[DynamicTopologyCallback(ScaffoldPolicy(0.95, 5))])
    """

    def __init__(self, policy: TopologyPolicy, every_n_epochs: Optional[int] = 1, every_n_steps: Optional[int] = None,
                 start_epoch: int = 0, dry_run: bool = False, verbose: int = 1, on_nonfinite: str = "skip",
                 on_unknown: str = "raise", log_dir: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
                 name: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(policy, TopologyPolicy):
            raise ValueError(f"Expected argument `policy` to be a TopologyPolicy, but got {type(policy).__name__}.")
        _check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        _check_int("every_n_steps", every_n_steps, 1, optional=True)
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("Expected one of `every_n_epochs` and `every_n_steps` to be set, but both are None.")
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(
                f"Expected only one of `every_n_epochs` and `every_n_steps`, but got {every_n_epochs} and "
                f"{every_n_steps}."
            )
        _check_int("start_epoch", start_epoch, 0)
        if not isinstance(dry_run, bool):
            raise ValueError(f"Expected argument `dry_run` to be a bool, but got {dry_run!r}.")
        if verbose not in (0, 1, 2) or isinstance(verbose, bool):
            raise ValueError(f"Expected argument `verbose` to be 0, 1 or 2, but got {verbose!r}.")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"Expected argument `on_nonfinite` to be 'skip' or 'raise', but got {on_nonfinite!r}.")
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"Expected argument `on_unknown` to be one of {list(ON_UNKNOWN)}, but got {on_unknown!r}.")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"Expected argument `log_dir` to be None or a path (str or os.PathLike), but got "
                             f"{log_dir!r}.")
        _check_int("seed", seed, 0)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Expected argument `name` to be None or a non-empty str, but got {name!r}.")
        self.policy = policy
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.start_epoch, self.dry_run, self.verbose = start_epoch, dry_run, verbose
        self.on_nonfinite, self.on_unknown = on_nonfinite, on_unknown
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.seed, self.name = seed, name
        self.events: List[Dict[str, Any]] = []
        self.skipped: List[Dict[str, Any]] = []
        self.history: List[Dict[str, Any]] = []
        self.figure_path: Optional[str] = None
        self._last_step = -1
        self._last_epoch = -1
        self._metrics: Dict[str, float] = {}
        self._validated = False
        self._epochs_done = 0
        self._directory: Optional[str] = None
        self._spaces: Dict[str, NeuronSpace] = {}
        self._snapshots: Optional[Dict[str, SpaceInfo]] = None
        self._pending: Dict[str, float] = {}
        self._logged_step = -1
        self._uid = uuid.uuid4().hex
        register_results_sink(self._uid, self)

    @property
    def state_key(self) -> str:
        if self.name is not None:
            return self._generate_state_key(name=self.name)
        return self._generate_state_key(policy=type(self.policy).__name__, name=self.name)

    # -- set-up checks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        refused = strategy & set(REFUSED_STRATEGIES)
        if refused:
            raise ValueError(
                f"DynamicTopologyCallback does not support {type(trainer.strategy).__name__} (a "
                f"{sorted(refused)[0]}): it shards or compiles parameters whose shapes this callback changes. "
                "Supported: single-device, DDP and spawn-based DDP strategies."
            )
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            bases = {cls.__name__ for cls in type(callback).__mro__} & set(REFUSED_CALLBACKS)
            if bases:
                raise ValueError(
                    f"DynamicTopologyCallback cannot run with {type(callback).__name__} (a {sorted(bases)[0]}): it "
                    "keeps "
                    "copies or masks of the parameters in their old shapes, which break after the first width change."
                )
        if not isinstance(pl_module, IsotropicModuleMixin):
            raise ValueError(
                f"DynamicTopologyCallback needs the LightningModule to use IsotropicModuleMixin (`class "
                f"{type(pl_module).__name__}(IsotropicModuleMixin, L.LightningModule)`): without it, checkpoints "
                "taken after a width change cannot be loaded."
            )
        self._bind(pl_module)
        if not self._spaces:
            raise ValueError(
                f"DynamicTopologyCallback found no neuron space in {type(pl_module).__name__}: there is nothing to "
                "grow or shrink. Use an IsotropicMLP, IsotropicConvNet or IsotropicFFN, adopt a model with "
                "`iso_lightning.convert`, or declare a space with `iso_lightning.declare_space`."
            )
        names = sorted(self._spaces)
        for policy in _policies(self.policy):
            for pattern in policy.patterns():
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ValueError(
                        f"{type(policy).__name__}: the pattern {pattern!r} matches no neuron space of "
                        f"{type(pl_module).__name__}; its spaces are {names}."
                    )
        mine = {s for s in names if self.policy.selected(s)}
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is self or not isinstance(callback, DynamicTopologyCallback):
                continue
            shared = mine & {s for s in names if callback.policy.selected(s)}
            if shared:
                raise ValueError(
                    f"Two DynamicTopologyCallbacks would change the same spaces {sorted(shared)}: give their policies "
                    "disjoint `spaces=` patterns."
                )
        # Resolved on every rank: `trainer.log_dir` is a collective (a broadcast).
        self._directory = self.log_dir if self.log_dir is not None else trainer.log_dir
        _console.progress_bar = trainer.progress_bar_callback

    def _bind(self, pl_module: torch.nn.Module) -> None:
        """Find the hidden neuron spaces this callback works on (done at ``setup``)."""
        self._spaces = find_spaces(pl_module, kind="hidden")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _console.progress_bar is trainer.progress_bar_callback:
            _console.progress_bar = None
        launcher = getattr(trainer.strategy, "launcher", None)
        if stage == "fit" and trainer.is_global_zero and isinstance(launcher, _MultiProcessingLauncher):
            # A spawn launcher returns rank 0's state dict (taken after the teardown hooks) to the main
            # process, where the mixin's `load_state_dict` resizes the model: the history travels with it.
            assert isinstance(pl_module, IsotropicModuleMixin)
            pl_module.send_fit_results(self._uid, {"callback": self.state_dict(), "figure": self.figure_path})

    # -- triggers ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs is None or epoch == 0 or epoch == self._last_epoch:
            return
        if epoch - 1 >= self.start_epoch and epoch % self.every_n_epochs == 0:
            self._last_epoch = epoch
            self._adapt(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.every_n_steps is None:
            return
        step = trainer.global_step
        # Only at the first batch after an optimizer step: during gradient accumulation it stands still.
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if trainer.current_epoch >= self.start_epoch:
            self._adapt(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done += 1
        self._monitor(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the checkpoint's history is the truth: a run killed after its last
        # checkpoint may have appended events that will now happen again.
        path = self.events_path()
        if trainer.is_global_zero and path is not None and os.path.exists(path):
            os.remove(path)
            if self.events:
                self._write_csv(self.events)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # The module's hyper-parameters hold its *starting* widths: record the final ones beside them.
        widths = {name: space.width for name, space in self._spaces.items()}
        for logger in trainer.loggers:
            logger.log_hyperparams({"final_topology": widths})
        if self.history:
            self._save_figure(trainer)

    def receive_fit_results(self, state: Mapping[str, Any]) -> None:
        """Take the state the copy of this callback in a spawned worker ended with."""
        self.load_state_dict(dict(state.get("callback", {})))
        self.figure_path = state.get("figure")

    def _save_figure(self, trainer: pl.Trainer) -> None:
        image = topology_image(self.history, self.events, threshold=getattr(self.policy, "threshold", None))
        if self._directory is not None:
            os.makedirs(self._directory, exist_ok=True)
            self.figure_path = os.path.join(self._directory, "topology.png")
            image.save(self.figure_path, compress_level=1)  # a third of the time of the default level
            if self.verbose:
                log.info(f"[iso_lightning] topology figure: {self.figure_path}")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("topology", np.asarray(image), global_step=trainer.global_step,  # type: ignore[union-attr]
                                     dataformats="HWC")
            elif hasattr(logger, "log_image") and self.figure_path is not None:  # e.g. Weights & Biases
                logger.log_image(key="topology", images=[self.figure_path])

    # -- monitoring --------------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, float]:
        """Totals into ``callback_metrics`` (monitorable) and the progress bar; returns them for the loggers."""
        total = float(sum(space.width for space in self._spaces.values()))
        params = float(sum(p.numel() for p in pl_module.parameters()))
        figures = {"topology/total_hidden": total, "topology/parameters": params,
                   "topology/events": float(len(self.events))}
        figures.update({f"topology/{name}/width": float(space.width) for name, space in self._spaces.items()})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})
        trainer.progress_bar_metrics.update({"hidden": _compact(total), "params": _compact(params)})  # type: ignore[dict-item]
        return figures

    def _emit(self, trainer: pl.Trainer) -> None:
        """Send the pending figures to the loggers: one row per step at most, with the epoch."""
        if trainer.is_global_zero and self._pending:
            for logger in trainer.loggers:
                logger.log_metrics({**self._pending, "epoch": float(trainer.current_epoch)}, step=trainer.global_step)
        self._pending = {}
        self._logged_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Figures of a change made at a step already logged go out with the next step.
        if self._pending and trainer.global_step != self._logged_step:
            self._emit(trainer)

    def _monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Per-space figures to every logger, ``callback_metrics`` and the history behind the end-of-fit figure."""
        try:
            self._snapshots = describe(self._spaces)
        except NonFiniteError:
            self._snapshots = None
            return  # the adaptation step reports it
        threshold = float(getattr(self.policy, "threshold", None) or 0.95)
        metrics: Dict[str, float] = {}
        for name, info in self._snapshots.items():
            sigma = info.singular_values
            total = float(sigma.sum())
            p = sigma / total if total > 0 else sigma
            p = p[p > 0]
            activation = self._spaces[name].activation
            length = activation.length() if activation is not None else None
            metrics.update({
                f"topology/{name}/sigma_min": float(sigma.min()) if sigma.numel() else 0.0,
                f"topology/{name}/sigma_max": float(sigma.max()) if sigma.numel() else 0.0,
                f"topology/{name}/scaffold": float((sigma < threshold).sum()),
                f"topology/{name}/effective_rank": float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0,
                f"topology/{name}/length": 0.0 if length is None else float(length.detach().mean()),
            })
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "space": name,
                                 "width": info.width, "singular_values": [float(v) for v in sigma]})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_histogram"):  # TensorBoard
                    for name, info in self._snapshots.items():
                        experiment.add_histogram(  # type: ignore[union-attr]
                            f"topology/{name}/singular_values", info.singular_values.numpy(),
                            global_step=trainer.global_step,
                        )
        self._pending.update(metrics)
        self._pending.update(self._publish(trainer, pl_module))
        self._emit(trainer)

    # -- the work ----------------------------------------------------------------------------------
    @staticmethod
    def _current_metrics(trainer: pl.Trainer) -> Dict[str, float]:
        return {key: float(value) for key, value in trainer.callback_metrics.items()
                if isinstance(value, torch.Tensor) and value.numel() == 1 and not key.startswith("topology/")}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        # The metrics a resumed run's first decision needs: those of the moment the checkpoint is taken.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict):
            state["metrics"] = self._current_metrics(trainer)

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PolicyContext:
        # Metrics restored from a checkpoint stand in for those this process has not measured yet.
        metrics = {**self._metrics, **self._current_metrics(trainer)}
        validates = is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0
        awaiting = self._epochs_done == 0 or (bool(validates) and not self._validated)
        total = sum(p.numel() for p in pl_module.parameters())
        return PolicyContext(epoch=trainer.current_epoch, step=trainer.global_step, metrics=metrics,
                             total_params=total, awaiting_metrics=awaiting)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, Any]:
        try:
            snapshots = self._snapshots if self._snapshots is not None else describe(self._spaces)
        except NonFiniteError as err:
            return {"skip": str(err)}
        for space in self._spaces.values():
            for binding in space.bindings:
                grad = binding.tensor.grad
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    return {"skip": f"the gradient of `{binding.label}` holds non-finite values; refusing to remap it."}
        decision = self.policy.decide(snapshots, self._context(trainer, pl_module))
        return {"decision": decision,
                "sigma": {n: [float(v) for v in s.singular_values] for n, s in snapshots.items() if n in decision}}

    def _skip(self, trainer: pl.Trainer, reason: str) -> None:
        message = f"DynamicTopologyCallback skipped the adaptation at step {trainer.global_step}: {reason}"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.skipped.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "reason": reason})

    def _adapt(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One decision for all ranks: rank 0 decides, every rank applies the same change. An error of
        # the policy travels with the broadcast, so that every rank raises it (none waits forever).
        plan: Optional[Dict[str, Any]] = None
        if trainer.is_global_zero:
            try:
                plan = self._decide(trainer, pl_module)
            except Exception as err:
                plan = {"error": _portable(err)}
        plan = trainer.strategy.broadcast(plan, src=0)
        self._snapshots = None  # spectra are of the weights before this point
        assert plan is not None
        if "error" in plan:
            raise plan["error"]
        if "skip" in plan:
            self._skip(trainer, plan["skip"])
            return
        decision: Mapping[str, int] = plan["decision"]
        if not decision:
            return
        if self.dry_run:
            self._record(trainer, [{"space": n, "op": "dry_run", "old_width": self._spaces[n].width, "new_width": w}
                                   for n, w in decision.items()])
            return
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        optimizers = list(trainer.optimizers)
        try:
            reports = apply_decision(self._spaces, decision, optimizer=optimizers or None, generator=generator,
                                     on_unknown=self.on_unknown)
        except NonFiniteError as err:  # refused before anything changed, the same way on every rank
            self._skip(trainer, str(err))
            return
        events = [{
            "space": report.space, "op": report.op, "old_width": report.old_width, "new_width": report.new_width,
            "singular_values": [float(v) for v in report.singular_values],
            "error_estimate": float(report.error_estimate), "exact": bool(report.exact),
        } for report in reports]
        self._rebuild_ddp(trainer)
        self._record(trainer, events)
        self._pending.update(self._publish(trainer, pl_module))
        if trainer.global_step != self._logged_step:
            self._emit(trainer)

    @staticmethod
    def _rebuild_ddp(trainer: pl.Trainer) -> None:
        """DDP's gradient buckets are sized at construction: wrap the resized module anew."""
        from torch.nn.parallel import DistributedDataParallel

        strategy = trainer.strategy
        if not isinstance(getattr(strategy, "model", None), DistributedDataParallel):
            return
        old = strategy.model
        strategy.model = strategy.lightning_module  # type: ignore[assignment]
        strategy.configure_ddp()  # type: ignore[attr-defined]
        del old
        gc.collect()  # the old reducer's autograd hooks go with it

    def _record(self, trainer: pl.Trainer, events: List[Dict[str, Any]]) -> None:
        for event in events:
            event.update(step=trainer.global_step, epoch=trainer.current_epoch)
            self.events.append(event)
        if not events or not trainer.is_global_zero:
            return
        if self.verbose:
            for event in events:
                verb = "would change" if event["op"] == "dry_run" else event["op"]
                line = (f"[iso_lightning] epoch {event['epoch']} step {event['step']}: {event['space']} {verb} "
                        f"{event.get('old_width', '?')} -> {event['new_width']}")
                if self.verbose > 1 and event.get("singular_values"):
                    line += " (singular values " + ", ".join(f"{v:.3g}" for v in event["singular_values"]) + ")"
                log.info(line)
        self._write_csv(events)

    def events_path(self, trainer: Optional[pl.Trainer] = None) -> Optional[str]:
        """Where ``topology_events.csv`` is written (known once the callback is set up)."""
        directory = self._directory if self._directory is not None else self.log_dir
        return None if directory is None else os.path.join(directory, "topology_events.csv")

    def _write_csv(self, events: List[Dict[str, Any]]) -> None:
        path = self.events_path()
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fields = ["step", "epoch", "space", "op", "old_width", "new_width", "error_estimate", "exact",
                  "singular_values"]
        new = not os.path.exists(path)
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            for event in events:
                row = dict(event)
                row["singular_values"] = " ".join(f"{v:.6g}" for v in event.get("singular_values", []))
                writer.writerow(row)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"events": list(self.events), "skipped": list(self.skipped), "policy": self.policy.state_dict(),
                "last_step": self._last_step, "last_epoch": self._last_epoch, "history": list(self.history),
                "metrics": dict(self._metrics), "validated": self._validated, "epochs_done": self._epochs_done}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
        self.skipped = list(state_dict.get("skipped", []))
        self.history = list(state_dict.get("history", []))
        self.policy.load_state_dict(state_dict.get("policy", {}))
        self._last_step = int(state_dict.get("last_step", -1))
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        self._metrics = {str(k): float(v) for k, v in dict(state_dict.get("metrics", {})).items()}
        self._validated = bool(state_dict.get("validated", False))
        self._epochs_done = int(state_dict.get("epochs_done", 0))

