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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

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

WidthBound = Union[None, int, Mapping[str, int]]


@dataclass
class SpaceInfo:
    """A snapshot of one neuron space.

    Attributes:
        name: the space's name (``"hidden.0"``; prefixed by the module path inside a larger model).
        width: current number of neurons.
        singular_values: descending, float64, one per neuron (all groups together).
        out_norms: norm of each singular direction's outgoing column, in the same order.
        groups: number of neuron groups.
        params_per_neuron: parameters one more neuron costs (row in, column out, bias, corrections).
    """

    name: str
    width: int
    singular_values: Tensor
    out_norms: Tensor
    groups: int = 1
    params_per_neuron: int = 0

    def scores(self, score: str) -> Tensor:
        if score == "singular_value":
            return self.singular_values
        return self.singular_values * self.out_norms


@dataclass
class PolicyContext:
    """Where training is: epoch, optimizer step, the logged metrics and the model size."""

    epoch: int = 0
    step: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    total_params: int = 0


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
        spaces: shell-style patterns of the space names the policy may change (default all).
    """

    def __init__(self, min_width: WidthBound = 1, max_width: WidthBound = None, cooldown: int = 0,
                 score: str = "singular_value", spaces: Optional[Sequence[str]] = None) -> None:
        self.min_width = _check_bound("min_width", min_width, 1)
        self.max_width = _check_bound("max_width", max_width, 1)
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
        width = max(low, int(width))
        return width if high is None else min(high, width)

    def decide(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        """Clamped target widths for the spaces that should change now, honouring the cooldown."""
        proposal = self.propose(spaces, context)
        decision: Dict[str, int] = {}
        for name, info in spaces.items():
            if name not in proposal or not self.selected(name):
                continue
            if self._quiet.get(name, 0) > 0:
                continue
            # A shrink keeps one neuron in every group: a grouped space cannot go below its group count.
            width = max(self.clamp(name, proposal[name]), info.groups)
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


class ScaffoldPolicy(TopologyPolicy):
    """The paper's rule: keep ``scaffold`` neurons whose score is below ``threshold`` in every space.

    Fewer below the threshold: grow by the difference; more: shrink the surplus (the weakest).

    Args:
        threshold: score below which a neuron counts as scaffold (orthogonal initialisation puts
            every singular value at 1; the paper uses 0.95).
        scaffold: number of scaffold neurons to keep per space (the paper uses 5).
    """

    def __init__(self, threshold: float = 0.95, scaffold: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"Expected argument `threshold` to be a positive number, but got {threshold!r}.")
        if isinstance(scaffold, bool) or not isinstance(scaffold, int) or scaffold < 0:
            raise ValueError(f"Expected argument `scaffold` to be an int >= 0, but got {scaffold!r}.")
        self.threshold = float(threshold)
        self.scaffold = scaffold

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        out = {}
        for name, info in spaces.items():
            below = int((info.scores(self.score) < self.threshold).sum())
            out[name] = info.width + self.scaffold - below
        return out


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
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"Expected argument `min_delta` to be a number >= 0, but got {min_delta!r}.")
        self.monitor, self.mode, self.patience, self.grow_by = monitor, mode, patience, grow_by
        self.min_delta = float(min_delta)
        self.shrinker = None if scaffold is None else ScaffoldPolicy(threshold, scaffold, score=self.score)
        self.best: Optional[float] = None
        self.wait = 0

    def propose(self, spaces: Mapping[str, SpaceInfo], context: PolicyContext) -> Dict[str, int]:
        if self.monitor not in context.metrics:
            raise KeyError(
                f"LossPlateauPolicy monitors `{self.monitor}`, which is not among the logged metrics "
                f"{sorted(context.metrics)}."
            )
        value = float(context.metrics[self.monitor])
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
def describe(network: Any, prefix: str = "") -> Dict[str, SpaceInfo]:
    """Snapshots of every hidden space of an :class:`~iso_lightning.IsotropicNetwork`.

    Spectra are computed in float64 from the current weights; a space with non-finite weights
    raises :class:`~iso_lightning.NonFiniteError`.
    """
    from iso_lightning.surgery import NonFiniteError, _check_finite, _group_rows, left_basis

    out: Dict[str, SpaceInfo] = {}
    for layer in range(network.num_hidden):
        space = network.space(layer)
        try:
            _check_finite(space)
        except NonFiniteError as err:
            raise NonFiniteError(str(err).replace(f"`{space.name}`", f"`{prefix}{space.name}`")) from None
        a = space.incoming_matrix()
        w_out = space.weight_out
        assert w_out is not None
        out_view = w_out.view(w_out.tensor.detach()).to(torch.float64)  # (pre, n, rest)
        sigmas, norms = [], []
        for rows in _group_rows(space):
            u, s = left_basis(a[rows])
            cols = torch.einsum("pir,ij->pjr", out_view[:, rows], u)
            sigmas.append(s)
            norms.append(cols.pow(2).sum(dim=(0, 2)).sqrt())
        sigma, norm = torch.cat(sigmas), torch.cat(norms)
        order = torch.argsort(sigma, descending=True, stable=True)
        per_neuron = sum(b.tensor.numel() // max(1, b.size()) for b, _ in space.neuron_bindings())
        out[prefix + space.name] = SpaceInfo(prefix + space.name, space.width, sigma[order], norm[order],
                                             space.groups(), per_neuron)
    return out


def apply_decision(network: Any, decision: Mapping[str, int], *, optimizer: Any = None, prefix: str = "",
                   generator: Optional[torch.Generator] = None) -> list:
    """Apply ``{space name: width}`` to one network, last hidden layer first; returns the reports."""
    widths = {}
    for name, width in decision.items():
        if not name.startswith(prefix + "hidden."):
            raise ValueError(f"Expected space names of the form `{prefix}hidden.<layer>`, but got {name!r}.")
        widths[int(name[len(prefix) + len("hidden."):])] = width
    return list(network.set_widths(widths, optimizer=optimizer, generator=generator))
