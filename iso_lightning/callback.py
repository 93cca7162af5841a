"""``DynamicTopologyCallback``: grow and shrink a LightningModule's isotropic networks during ``fit``.

The callback is glue: the decisions come from a :mod:`~iso_lightning.policies` policy and the tensor
work from :mod:`~iso_lightning.surgery`. It runs the policy every ``every_n_epochs`` epochs or
every ``every_n_steps`` optimizer steps (at a real step boundary: never in the middle of gradient
accumulation, never during the sanity check), applies the widths it asks for with the trainer's own
optimizers (each parameter's owner is found among them), and records every change.
"""

from __future__ import annotations

import csv
import gc
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from iso_lightning._validation import check_int as _check_int
from iso_lightning.mixin import _prefix, find_networks
from iso_lightning.policies import PolicyContext, TopologyPolicy, describe
from iso_lightning.surgery import NonFiniteError

__all__ = ["DynamicTopologyCallback"]

_REFUSED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")
_REFUSED_CALLBACKS = ("WeightAveraging", "StochasticWeightAveraging")




class DynamicTopologyCallback(Callback):
    """Apply a topology policy to the isotropic networks of a LightningModule while it trains.

    Args:
        policy: a :class:`~iso_lightning.TopologyPolicy` (e.g. ``ScaffoldPolicy(0.95, 5)``).
        every_n_epochs: run the policy at the end of every n-th training epoch (``None``: never).
        every_n_steps: run it after every n-th optimizer step (``None``: never).
        start_epoch: no change before this epoch.
        dry_run: log what would change, change nothing.
        verbose: 0 silent, 1 one line per change, 2 also the singular values involved.
        on_nonfinite: ``"skip"`` an adaptation whose spectra are not finite, with a warning naming
            the space, or ``"raise"``.
        log_dir: where ``topology_events.csv`` is written (default: the trainer's log directory).
        seed: seed of the random outgoing weights of new neurons (identical on every rank).
        name: distinguishes two callbacks in a checkpoint (``state_key``).

    Example::

        trainer = L.Trainer(callbacks=[DynamicTopologyCallback(ScaffoldPolicy(0.95, 5))])
    """

    def __init__(self, policy: TopologyPolicy, every_n_epochs: Optional[int] = 1, every_n_steps: Optional[int] = None,
                 start_epoch: int = 0, dry_run: bool = False, verbose: int = 1, on_nonfinite: str = "skip",
                 log_dir: Optional[str] = None, seed: int = 0, name: Optional[str] = None) -> None:
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
        if verbose not in (0, 1, 2):
            raise ValueError(f"Expected argument `verbose` to be 0, 1 or 2, but got {verbose!r}.")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"Expected argument `on_nonfinite` to be 'skip' or 'raise', but got {on_nonfinite!r}.")
        _check_int("seed", seed, 0)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"Expected argument `name` to be None or a str, but got {name!r}.")
        self.policy = policy
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.start_epoch, self.dry_run, self.verbose = start_epoch, dry_run, verbose
        self.on_nonfinite, self.log_dir, self.seed, self.name = on_nonfinite, log_dir, seed, name
        self.events: List[Dict[str, Any]] = []
        self.skipped: List[Dict[str, Any]] = []
        self.history: List[Dict[str, Any]] = []
        self.figure_path: Optional[str] = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=type(self.policy).__name__, name=self.name)

    # -- set-up checks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy in _REFUSED_STRATEGIES:
            raise ValueError(
                f"DynamicTopologyCallback does not support the {strategy}: it shards or compiles parameters whose "
                "shapes this callback changes. Supported: single device and DDP strategies."
            )
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            bases = {cls.__name__ for cls in type(callback).__mro__}
            if bases & set(_REFUSED_CALLBACKS):
                raise ValueError(
                    f"DynamicTopologyCallback cannot run with {type(callback).__name__}: its averaged copy of the "
                    "weights keeps the old shapes and breaks after the first width change."
                )
        if not find_networks(pl_module):
            raise ValueError(
                f"DynamicTopologyCallback found no IsotropicNetwork (IsotropicMLP, IsotropicConvNet) inside "
                f"{type(pl_module).__name__}: there is nothing to grow or shrink."
            )
        spaces = self._space_names(pl_module)
        mine = {s for s in spaces if self.policy.selected(s)}
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is self or not isinstance(callback, DynamicTopologyCallback):
                continue
            shared = mine & {s for s in spaces if callback.policy.selected(s)}
            if shared:
                raise ValueError(
                    f"Two DynamicTopologyCallbacks would change the same spaces {sorted(shared)}: give their policies "
                    "disjoint `spaces=` patterns."
                )

    @staticmethod
    def _space_names(pl_module: pl.LightningModule) -> List[str]:
        return [f"{_prefix(path)}hidden.{layer}" for path, net in find_networks(pl_module).items()
                for layer in range(net.num_hidden)]

    # -- triggers ----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps is None or trainer.sanity_checking:
            return
        step = trainer.global_step
        # Only right after an optimizer step: during gradient accumulation the step count stands still.
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            self._last_step = step if step != self._last_step else self._last_step
            return
        self._last_step = step
        if trainer.current_epoch >= self.start_epoch:
            self._adapt(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        snapshots = self._monitor(trainer, pl_module) if trainer.is_global_zero else None
        if self.every_n_epochs is None:
            return
        epoch = trainer.current_epoch
        if epoch >= self.start_epoch and (epoch + 1) % self.every_n_epochs == 0:
            self._adapt(trainer, pl_module, snapshots)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Total hidden width and parameter count in the progress bar (cheap: no spectra).
        nets = find_networks(pl_module).values()
        pl_module.log("hidden", float(sum(sum(net.hidden_widths) for net in nets)), prog_bar=True, logger=False,
                      on_step=True, on_epoch=False)
        pl_module.log("params", float(sum(p.numel() for p in pl_module.parameters())), prog_bar=True, logger=False,
                      on_step=True, on_epoch=False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the checkpoint's history is the truth: a run killed after its last
        # checkpoint may have appended events that will now happen again.
        path = self.events_path(trainer)
        if trainer.is_global_zero and path is not None and os.path.exists(path):
            os.remove(path)
            if self.events:
                self._write_csv(trainer, self.events)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # The module's hyper-parameters hold its *starting* widths: record the final ones beside them.
        widths = {f"{_prefix(path)}hidden.{layer}": width for path, net in find_networks(pl_module).items()
                  for layer, width in enumerate(net.hidden_widths)}
        for logger in trainer.loggers:
            logger.log_hyperparams({"final_topology": widths})
        if not self.history:
            return
        from iso_lightning.plots import topology_figure

        figure = topology_figure(self.history, self.events, threshold=getattr(self.policy, "threshold", None))
        directory = self.log_dir or trainer.log_dir
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self.figure_path = os.path.join(directory, "topology.png")
            figure.savefig(self.figure_path, dpi=110)
            if self.verbose:
                rank_zero_info(f"[iso_lightning] topology figure: {self.figure_path}")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure("topology", figure, global_step=trainer.global_step)  # type: ignore[union-attr]
            elif hasattr(logger, "log_image") and self.figure_path is not None:  # e.g. Weights & Biases
                logger.log_image(key="topology", images=[self.figure_path])

    # -- monitoring --------------------------------------------------------------------------------
    def _snapshots(self, pl_module: pl.LightningModule) -> Dict[str, Any]:
        snapshots: Dict[str, Any] = {}
        for path, net in find_networks(pl_module).items():
            snapshots.update(describe(net, _prefix(path)))
        return snapshots

    def _monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Dict[str, Any]]:
        """Per-space figures to every logger and to the history behind the end-of-fit figure."""
        try:
            snapshots = self._snapshots(pl_module)
        except NonFiniteError:
            return None  # the adaptation step reports it
        threshold = float(getattr(self.policy, "threshold", 0.95))
        metrics: Dict[str, float] = {}
        lengths = {}
        for path, net in find_networks(pl_module).items():
            for layer in range(net.num_hidden):
                o = net.activation(layer).effective_length()
                lengths[f"{_prefix(path)}hidden.{layer}"] = 0.0 if o is None else float(o.detach().mean())
        for name, info in snapshots.items():
            sigma = info.singular_values
            total = float(sigma.sum())
            p = sigma / total if total > 0 else sigma
            p = p[p > 0]
            effective_rank = float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0
            metrics.update({
                f"topology/{name}/width": float(info.width),
                f"topology/{name}/sigma_min": float(sigma.min()) if sigma.numel() else 0.0,
                f"topology/{name}/sigma_max": float(sigma.max()) if sigma.numel() else 0.0,
                f"topology/{name}/scaffold": float((sigma < threshold).sum()),
                f"topology/{name}/effective_rank": effective_rank,
                f"topology/{name}/length": lengths.get(name, 0.0),
            })
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "space": name,
                                 "width": info.width, "singular_values": [float(v) for v in sigma]})
        metrics["topology/total_hidden"] = float(sum(info.width for info in snapshots.values()))
        metrics["topology/parameters"] = float(sum(p.numel() for p in pl_module.parameters()))
        metrics["topology/events"] = float(len(self.events))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):  # TensorBoard
                for name, info in snapshots.items():
                    experiment.add_histogram(  # type: ignore[union-attr]
                        f"topology/{name}/singular_values", info.singular_values.numpy(),
                        global_step=trainer.global_step,
                    )
        return snapshots

    # -- the work ----------------------------------------------------------------------------------
    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PolicyContext:
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                metrics[key] = float(value)
        total = sum(p.numel() for p in pl_module.parameters())
        return PolicyContext(epoch=trainer.current_epoch, step=trainer.global_step, metrics=metrics, total_params=total)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                snapshots: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        try:
            snapshots = snapshots if snapshots is not None else self._snapshots(pl_module)
        except NonFiniteError as err:
            return {"skip": str(err)}
        for path, net in find_networks(pl_module).items():
            for name, param in net.named_parameters():
                if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                    where = f"{_prefix(path)}{name}"
                    return {"skip": f"the gradient of `{where}` holds non-finite values; refusing to remap it."}
        decision = self.policy.decide(snapshots, self._context(trainer, pl_module))
        return {"decision": decision,
                "sigma": {n: [float(v) for v in s.singular_values] for n, s in snapshots.items() if n in decision}}

    def _adapt(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               snapshots: Optional[Dict[str, Any]] = None) -> None:
        # One decision for all ranks: rank 0 decides, every rank applies the same change.
        plan = self._decide(trainer, pl_module, snapshots) if trainer.is_global_zero else None
        plan = trainer.strategy.broadcast(plan, src=0)
        assert plan is not None
        if "skip" in plan:
            message = f"DynamicTopologyCallback skipped the adaptation at step {trainer.global_step}: {plan['skip']}"
            if self.on_nonfinite == "raise":
                raise NonFiniteError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.skipped.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "reason": plan["skip"]})
            return
        decision: Mapping[str, int] = plan["decision"]
        if not decision:
            return
        if self.dry_run:
            for name, width in decision.items():
                rank_zero_info(f"[dry run] {name}: would resize to {width}")
            self._record(trainer, [{"space": n, "op": "dry_run", "new_width": w} for n, w in decision.items()])
            return
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        optimizers = list(trainer.optimizers)
        events = []
        for path, net in find_networks(pl_module).items():
            prefix = f"{_prefix(path)}hidden."
            widths = {int(n[len(prefix):]): w for n, w in decision.items()
                      if n.startswith(prefix) and n[len(prefix):].isdigit()}
            if not widths:
                continue
            for report in net.set_widths(widths, optimizer=optimizers or None, generator=generator):
                name = _prefix(path) + report.space
                events.append({
                    "space": name, "op": report.op, "old_width": report.old_width, "new_width": report.new_width,
                    "singular_values": [float(v) for v in report.singular_values],
                    "error_estimate": float(report.error_estimate), "exact": bool(report.exact),
                })
        self._rebuild_ddp(trainer)
        self._record(trainer, events)
        if trainer.is_global_zero:
            counts = {"topology/events": float(len(self.events))}
            for logger in trainer.loggers:
                logger.log_metrics(counts, step=trainer.global_step)

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
            if self.verbose:
                change = f"{event['space']} {event['op']} {event.get('old_width', '?')} -> {event['new_width']}"
                line = f"[iso_lightning] epoch {event['epoch']} step {event['step']}: {change}"
                if self.verbose > 1 and event.get("singular_values"):
                    values = ", ".join(f"{v:.3g}" for v in event["singular_values"])
                    line += f" (singular values {values})"
                rank_zero_info(line)
        if events and trainer.is_global_zero:
            self._write_csv(trainer, events)

    def events_path(self, trainer: pl.Trainer) -> Optional[str]:
        directory = self.log_dir or trainer.log_dir
        return None if directory is None else os.path.join(directory, "topology_events.csv")

    def _write_csv(self, trainer: pl.Trainer, events: List[Dict[str, Any]]) -> None:
        path = self.events_path(trainer)
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
                "last_step": self._last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
        self.skipped = list(state_dict.get("skipped", []))
        self.history = list(state_dict.get("history", []))
        self.policy.load_state_dict(state_dict.get("policy", {}))
        self._last_step = int(state_dict.get("last_step", -1))


