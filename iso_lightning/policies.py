"""When and where to grow or shrink: topology policies.

A policy looks at a snapshot of every neuron space (:class:`SpaceInfo`) and the training context
(:class:`PolicyContext`) and returns the widths it wants (``{space name: width}``, only for spaces
to change). It does not touch the model: the caller (the Lightning callback, or your own loop with
:func:`apply_decision`) applies the changes, last hidden layer first.

Every policy shares the options of :class:`TopologyPolicy`: per-space ``min_width`` / ``max_width``,
a ``cooldown`` between two changes of one space, and the neuron ``score`` its rule counts with.
To write your own, subclass it and implement :meth:`TopologyPolicy.propose`.

Example:
    >>> import torch
    >>> from iso_lightning import IsotropicMLP
    >>> net = IsotropicMLP([8, 6, 10])
    >>> policy = ScaffoldPolicy(threshold=0.95, scaffold=2)
    >>> policy.decide(describe(net), PolicyContext(epoch=0))   # orthogonal init: no value below 0.95
    {'hidden.0': 8}
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from iso_lightning import operations
from iso_lightning.operations import SurgeryReport
from iso_lightning.optim import OptimizerArg
from iso_lightning.providers import find_spaces
from iso_lightning.spaces import NeuronSpace

__all__ = [
    "SCORES",
    "CompositePolicy",
    "LossPlateauPolicy",
    "ParameterBudgetPolicy",
    "PolicyContext",
    "ScaffoldPolicy",
    "SpaceInfo",
    "TopologyPolicy",
    "WidthSchedulePolicy",
    "apply_decision",
    "describe",
]

#: Neuron scores a policy can count with.
SCORES = ("singular_value", "singular_value_x_out_norm")
#: What a threshold is relative to: ``None`` (an absolute value), the space's median singular value
#: when the policy first saw it (``"initial"``), or its current median (``"median"``).
RELATIVE_TO = (None, "initial", "median")

WidthBound = Union[None, int, Mapping[str, int]]


class SpaceInfo:
    """A snapshot of one neuron space.

    Attributes:
        name: the space's name (``"net.hidden.0"``: its module path from the model root).
        width: current number of neurons.
        singular_values: descending, float64, one per neuron (all groups together; for one-neuron
            groups, as in an elementwise space, the norms of the incoming rows).
        out_norms: norm of each singular direction's outgoing column, in the same order (computed
            when first read: it needs the singular basis).
        groups: number of neuron groups.
        params_per_neuron: parameters one more neuron costs (row in, column out, bias, corrections).
        min_width: the narrowest width a shrink can leave (default: one neuron per group).
    """

    def __init__(self, name: str, width: int, singular_values: Tensor, out_norms: Optional[Tensor] = None,
                 groups: int = 1, params_per_neuron: int = 0, min_width: Optional[int] = None,
                 space: Optional[NeuronSpace] = None) -> None:
        if out_norms is None and space is None:
            raise ValueError("Expected `out_norms`, or a space to compute them from.")
        self.name, self.width, self.singular_values = name, width, singular_values
        self.groups, self.params_per_neuron = groups, params_per_neuron
        self.min_width = max(1, groups) if min_width is None else min_width
        self._out_norms, self._space = out_norms, space

    @property
    def out_norms(self) -> Tensor:
        if self._out_norms is None:
            assert self._space is not None
            self._out_norms = operations.spectrum(self._space, out_norms=True)[1]
        assert self._out_norms is not None
        return self._out_norms

    def scores(self, score: str) -> Tensor:
        if score == "singular_value":
            return self.singular_values
        return self.singular_values * self.out_norms

    def median(self) -> float:
        return float(self.singular_values.median()) if self.singular_values.numel() else 0.0

    def __repr__(self) -> str:
        return f"SpaceInfo(name={self.name!r}, width={self.width}, groups={self.groups})"


@dataclass
class PolicyContext:
    """Where training is: epoch, optimizer step, the logged metrics and the model size."""

    epoch: int = 0
    step: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    total_params: int = 0
    #: Metrics may still appear (no validation or epoch end has produced them yet): a policy that
    #: monitors one that is missing waits instead of failing.
    awaiting_metrics: bool = False


def _check_bound(name: str, value: WidthBound, minimum: int) -> WidthBound:
    if value is None:
        return None
    items = value.items() if isinstance(value, Mapping) else [("*", value)]
    for key, width in items:
        if not isinstance(key, str) or isinstance(width, bool) or not isinstance(width, int) or width < minimum:
            raise ValueError(
                f"Expected argument `{name}` to be an int >= {minimum} or a mapping of space-name patterns to such "
                f"ints, but got {value!r}."
            )
    return value


def _bound(value: WidthBound, space: str) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return value
    for pattern, width in value.items():
        if fnmatch.fnmatchcase(space, pattern):
            return width
    return None


class TopologyPolicy:
    """Base class: options shared by every policy, and the clamping they imply.

    Args:
        min_width: smallest width a space may be given (an int, or ``{"pattern": width}`` with
            shell-style patterns over space names); at least 1.
        max_width: largest width (same forms); ``None`` for no limit.
        cooldown: number of decisions after a change of a space during which it is left alone.
        score: what the rule counts: ``"singular_value"`` or ``"singular_value_x_out_norm"``.
        spaces: shell-style patterns of the space names the policy may change (default all); a
            pattern that matches no space of the model is an error when the callback starts.
        max_shrink: the largest fraction of a space one decision may remove (default half); a
            decision that asks for more is clipped, with a warning.
    """

    def __init__(self, min_width: WidthBound = 1, max_width: WidthBound = None, cooldown: int = 0,
                 score: str = "singular_value", spaces: Optional[Sequence[str]] = None,
                 max_shrink: float = 0.5) -> None:
        self.min_width = _check_bound("min_width", min_width, 1)
        self.max_width = _check_bound("max_width", max_width, 1)
        if isinstance(min_width, int) and isinstance(max_width, int) and min_width > max_width:
            raise ValueError(
                f"Expected argument `min_width` ({min_width}) to be at most `max_width`, but got max_width={max_width}."
            )
        if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0 < max_shrink <= 1:
            raise ValueError(f"Expected argument `max_shrink` to be a fraction in (0, 1], but got {max_shrink!r}.")
        self.max_shrink = float(max_shrink)
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
            raise ValueError(f"Expected argument `cooldown` to be an int >= 0, but got {cooldown!r}.")
        if score not in SCORES:
            raise ValueError(f"Expected argument `score` to be one of {list(SCORES)}, but got {score!r}.")
        if spaces is not None and (isinstance(spaces, str) or not all(isinstance(p, str) for p in spaces)):
            raise ValueError(f"Expected argument `spaces` to be a list of name patterns, but got {spaces!r}.")
        self.cooldown = cooldown
        self.score = score
        self.spaces = None if spaces is None else list(spaces)
        self._quiet: Dict[str, int] = {}

    # -- to implement -------------------------------------------------------------------------
    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        """Desired widths for some spaces (before clamping and cooldown)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def selected(self, name: str) -> bool:
        return self.spaces is None or any(fnmatch.fnmatchcase(name, p) for p in self.spaces)

    def clamp(self, name: str, width: int) -> int:
        low = max(1, _bound(self.min_width, name) or 1)
        high = _bound(self.max_width, name)
        if high is not None and low > high:
            raise ValueError(f"Space `{name}`: `min_width` ({low}) is larger than `max_width` ({high}).")
        width = max(low, int(width))
        return width if high is None else min(high, width)

    def patterns(self) -> List[str]:
        """Every space-name pattern the policy was given (``spaces``, ``min_width``, ``max_width``)."""
        out = list(self.spaces or [])
        for bound in (self.min_width, self.max_width):
            if isinstance(bound, Mapping):
                out += [p for p in bound if p != "*"]
        return out

    def decide(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        """Clamped target widths for the spaces that should change now, honouring the cooldown."""
        proposal = self.propose(spaces, context)
        decision: Dict[str, int] = {}
        for name, info in spaces.items():
            if name not in proposal or not self.selected(name):
                continue
            if self._quiet.get(name, 0) > 0:
                continue
            # A shrink keeps one neuron in every group of several: a grouped space cannot go below its group count.
            width = max(self.clamp(name, proposal[name]), info.min_width)
            floor = info.width - int(math.floor(self.max_shrink * info.width))
            if width < floor:
                warnings.warn(
                    f"{type(self).__name__}: `{name}` would shrink from {info.width} to {width} neurons in one "
                    "decision; "
                    f"clipped to {floor} by `max_shrink={self.max_shrink:g}`.", UserWarning, stacklevel=2,
                )
                width = floor
            if width != info.width:
                decision[name] = width
        for name in list(self._quiet):
            self._quiet[name] -= 1
        for name in decision:
            self._quiet[name] = self.cooldown
        return decision

    def state_dict(self) -> Dict[str, Any]:
        return {"quiet": dict(self._quiet)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._quiet = dict(state.get("quiet", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score!r}, cooldown={self.cooldown})"

    #: The threshold singular values are compared with, if the policy has one (for figures and logs).
    threshold: Optional[float] = None


class ScaffoldPolicy(TopologyPolicy):
    """The paper's rule: keep ``scaffold`` neurons whose score is below ``threshold`` in every space.

    Fewer below the threshold: grow by the difference; more: shrink the surplus (the weakest).

    Args:
        threshold: score below which a neuron counts as scaffold (orthogonal initialisation puts
            every singular value at 1; the paper uses 0.95).
        scaffold: number of scaffold neurons to keep per space (the paper uses 5).
        relative_to: ``None`` (``threshold`` is absolute), ``"initial"`` (a fraction of the space's
            median singular value when the policy first saw it: for any initialisation or a
            pretrained model) or ``"median"`` (a fraction of its current median).
    """

    def __init__(self, threshold: float = 0.95, scaffold: int = 5, relative_to: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
            raise ValueError(f"Expected argument `threshold` to be a positive finite number, but got {threshold!r}.")
        if isinstance(scaffold, bool) or not isinstance(scaffold, int) or scaffold < 0:
            raise ValueError(f"Expected argument `scaffold` to be an int >= 0, but got {scaffold!r}.")
        if relative_to not in RELATIVE_TO:
            raise ValueError(f"Expected argument `relative_to` to be one of {list(RELATIVE_TO)}, but got "
                             f"{relative_to!r}.")
        self.threshold = float(threshold)
        self.scaffold = scaffold
        self.relative_to = relative_to
        self._reference: Dict[str, float] = {}

    def threshold_for(self, info: SpaceInfo) -> float:
        """The absolute threshold of one space."""
        base = float(self.threshold or 0.0)
        if self.relative_to is None:
            return base
        if self.relative_to == "median":
            return base * info.median()
        return base * self._reference.setdefault(info.name, info.median())

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        out = {}
        for name, info in spaces.items():
            below = int((info.scores(self.score) < self.threshold_for(info)).sum())
            out[name] = info.width + self.scaffold - below
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "reference": dict(self._reference)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._reference = {str(k): float(v) for k, v in dict(state.get("reference", {})).items()}


class WidthSchedulePolicy(TopologyPolicy):
    """Move each space linearly from its width at ``start_epoch`` to a target by ``end_epoch``.

    Args:
        targets: final width, one int for every space or ``{"pattern": width}``.
        start_epoch, end_epoch: the schedule runs over these epochs; widths are held before and after.
    """

    def __init__(self, targets: Union[int, Mapping[str, int]], start_epoch: int = 0, end_epoch: int = 10,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_bound("targets", targets, 1)
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected argument `{name}` to be an int >= 0, but got {value!r}.")
        if end_epoch <= start_epoch:
            raise ValueError(
                f"Expected argument `end_epoch` to be greater than `start_epoch` ({start_epoch}), but got {end_epoch}."
            )
        self.targets = targets
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self._start: Dict[str, int] = {}

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        out = {}
        for name, info in spaces.items():
            target = _bound(self.targets, name)  # type: ignore[arg-type]
            if target is None:
                continue
            # The start width is the one seen at the start epoch (or when first seen after it).
            if name not in self._start or context.epoch <= self.start_epoch:
                self._start[name] = info.width
            if context.epoch <= self.start_epoch:
                continue
            frac = min(1.0, (context.epoch - self.start_epoch) / (self.end_epoch - self.start_epoch))
            start = self._start[name]
            out[name] = int(round(start + frac * (target - start)))
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "start": dict(self._start)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._start = dict(state.get("start", {}))


class LossPlateauPolicy(TopologyPolicy):
    """Grow when a monitored metric stops improving; otherwise shrink scaffold surplus.

    Args:
        monitor: metric name in the context (e.g. ``"val_loss"``).
        mode: ``"min"`` or ``"max"``.
        patience: decisions without improvement before growing.
        grow_by: neurons added to every space on a plateau.
        min_delta: smallest change that counts as an improvement.
        threshold, scaffold: the scaffold rule used to shrink the surplus (``scaffold=None`` never
            shrinks).
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 2, grow_by: int = 4,
                 min_delta: float = 0.0, threshold: float = 0.95, scaffold: Optional[int] = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Expected argument `monitor` to be a metric name, but got {monitor!r}.")
        if mode not in ("min", "max"):
            raise ValueError(f"Expected argument `mode` to be 'min' or 'max', but got {mode!r}.")
        for name, value, minimum in (("patience", patience, 0), ("grow_by", grow_by, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Expected argument `{name}` to be an int >= {minimum}, but got {value!r}.")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not 0 <= min_delta < math.inf:
            raise ValueError(f"Expected argument `min_delta` to be a finite number >= 0, but got {min_delta!r}.")
        self.monitor, self.mode, self.patience, self.grow_by = monitor, mode, patience, grow_by
        self.min_delta = float(min_delta)
        self.shrinker = None if scaffold is None else ScaffoldPolicy(threshold, scaffold, score=self.score)
        self.best: Optional[float] = None
        self.wait = 0
        self._warned = False

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        if self.monitor not in context.metrics:
            if context.awaiting_metrics:
                if not self._warned:
                    warnings.warn(f"LossPlateauPolicy monitors `{self.monitor}`, which has not been logged yet: no "
                                  "decision until it is.", UserWarning, stacklevel=2)
                    self._warned = True
                return {}
            raise ValueError(
                f"LossPlateauPolicy monitors `{self.monitor}`, which is not among the logged metrics "
                f"{sorted(context.metrics)}: pass one of them as `monitor`."
            )
        value = float(context.metrics[self.monitor])
        if not math.isfinite(value):
            warnings.warn(f"LossPlateauPolicy: `{self.monitor}` is {value}; no decision.", RuntimeWarning, stacklevel=2)
            return {}
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.wait > self.patience:
            self.wait = 0
            return {name: info.width + self.grow_by for name, info in spaces.items()}
        if self.shrinker is None:
            return {}
        proposal = self.shrinker.propose(spaces, context)
        return {name: width for name, width in proposal.items() if width < spaces[name].width}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "best": self.best, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


class ParameterBudgetPolicy(TopologyPolicy):
    """Wrap another policy and never let the model exceed ``max_parameters``.

    Growth proposed by ``policy`` is cut back, from the last space to the first, until the total
    fits; shrinks always pass. If the model is already over budget, the spaces' scaffold surplus is
    not enough: every space is shrunk by its share of the excess.
    """

    def __init__(self, policy: TopologyPolicy, max_parameters: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(policy, TopologyPolicy):
            raise ValueError(f"Expected argument `policy` to be a TopologyPolicy, but got {type(policy).__name__}.")
        if isinstance(max_parameters, bool) or not isinstance(max_parameters, int) or max_parameters < 1:
            raise ValueError(f"Expected argument `max_parameters` to be a positive int, but got {max_parameters!r}.")
        self.policy, self.max_parameters = policy, max_parameters

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        proposal = {n: w for n, w in self.policy.decide(spaces, context).items()}
        total = context.total_params + sum(
            (w - spaces[n].width) * spaces[n].params_per_neuron for n, w in proposal.items()
        )
        for name in reversed(list(proposal)):
            if total <= self.max_parameters:
                break
            info = spaces[name]
            extra = proposal[name] - info.width
            if extra <= 0 or info.params_per_neuron == 0:
                continue
            cut = min(extra, math.ceil((total - self.max_parameters) / info.params_per_neuron))
            proposal[name] -= cut
            total -= cut * info.params_per_neuron
        if total > self.max_parameters:
            cost = sum(info.params_per_neuron for info in spaces.values()) or 1
            per_space = math.ceil((total - self.max_parameters) / cost)
            for name, info in spaces.items():
                proposal[name] = min(proposal.get(name, info.width), info.width - per_space)
        return proposal

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state.get("policy", {}))


class CompositePolicy(TopologyPolicy):
    """Several policies together: each space takes the first policy's proposal that names it
    (``combine="first"``), or the largest (``"max"``) or smallest (``"min"``) of them."""

    _COMBINE: Dict[str, Callable[[List[int]], int]] = {"first": lambda ws: ws[0], "max": max, "min": min}

    def __init__(self, policies: Sequence[TopologyPolicy], combine: str = "first", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not policies or not all(isinstance(p, TopologyPolicy) for p in policies):
            raise ValueError(
                f"Expected argument `policies` to be a non-empty list of TopologyPolicy, but got {policies!r}."
            )
        if combine not in self._COMBINE:
            raise ValueError(f"Expected argument `combine` to be one of {list(self._COMBINE)}, but got {combine!r}.")
        self.policies, self.combine = list(policies), combine

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        wanted: Dict[str, List[int]] = {}
        for policy in self.policies:
            for name, width in policy.decide(spaces, context).items():
                wanted.setdefault(name, []).append(width)
        return {name: self._COMBINE[self.combine](widths) for name, widths in wanted.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "policies": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for policy, sub in zip(self.policies, state.get("policies", [])):
            policy.load_state_dict(sub)


# ---------------------------------------------------------------------------- helpers
SpacesArg = Union[nn.Module, Mapping[str, NeuronSpace]]


def _hidden_spaces(model: SpacesArg) -> Dict[str, NeuronSpace]:
    if isinstance(model, nn.Module):
        return find_spaces(model, kind="hidden")
    if isinstance(model, Mapping) and all(isinstance(v, NeuronSpace) for v in model.values()):
        return {name: space for name, space in model.items() if space.kind == "hidden"}
    raise ValueError(f"Expected a model (nn.Module) or a mapping of neuron spaces, but got {type(model).__name__}.")


def describe(model: SpacesArg) -> Dict[str, SpaceInfo]:
    """Snapshots of every hidden space of ``model`` (any module, or a mapping of spaces), by name.

    Spectra are computed in float64 from the current weights, values only (the outgoing norms
    follow when a policy first asks for them); a space with non-finite weights raises
    :class:`~iso_lightning.NonFiniteError`.
    """
    out: Dict[str, SpaceInfo] = {}
    for name, space in _hidden_spaces(model).items():
        sigma, _ = operations.spectrum(space)
        per_neuron = sum(b.tensor.numel() // max(1, b.size()) for b in space.neuron_bindings())
        out[name] = SpaceInfo(name, space.width, sigma, None, space.groups(), per_neuron, space.min_width, space)
    return out


def apply_decision(model: SpacesArg, decision: Mapping[str, int], *, optimizer: OptimizerArg = None,
                   generator: Optional[torch.Generator] = None, on_unknown: str = "raise") -> List[SurgeryReport]:
    """Apply ``{space name: width}`` to ``model``, all or nothing (spaces read later first)."""
    spaces = _hidden_spaces(model)
    scale = {name: float(getattr(space.owner, "growth_scale", 0.01)) for name, space in spaces.items()}
    return operations.set_widths(spaces, decision, optimizer=optimizer, generator=generator, on_unknown=on_unknown,
                                 scale=scale, argument="decision")
