r"""Optimizer-state remapping for neuron operations.

When a neuron space is rotated, extended or cut, every optimizer state tensor shaped like a touched
parameter must follow, or the next ``optimizer.step()`` fails or silently mixes neurons. Each state
entry has a *rule*:

``"linear"``
    first moments (``exp_avg``, ``momentum_buffer``, ``grad_avg``): the parameter's own transform,
    exact for every operation.
``"quadratic"``
    second moments (``exp_avg_sq``, ``square_avg``, ``sum``): the squared-entry rule
    :math:`v \mapsto (M \circ M)^T v`, exact for selections and extensions, an approximation that
    keeps values non-negative for a general rotation.
``"rms"``
    infinity-norm accumulators (Adamax ``exp_inf``): the quadratic rule applied to the squares.

Scalars such as ``step`` are kept. New entries get zero, or the optimizer's initial value
(Adagrad's ``initial_accumulator_value``). Parameters keep their identity, so ``param_groups`` and
LR schedulers are untouched and no stale key is ever left in ``optimizer.state``.

Optimizers with no registered rule raise :class:`UnsupportedOptimizerError`, unless the caller asks
for ``on_unknown="reset"``, which drops the state of the touched parameters. Rules for other
optimizers are added with :func:`register_optimizer_rule`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from iso_lightning.axis import AxisTransform, all_finite, leading_view
from iso_lightning.errors import NonFiniteError
from iso_lightning.transaction import Transaction, atomic

__all__ = [
    "OptimizerRule",
    "StateRemapper",
    "UnsupportedOptimizerError",
    "register_optimizer_rule",
    "rule_for",
]

OptimizerArg = Union[None, Optimizer, Sequence[Optimizer]]


class UnsupportedOptimizerError(TypeError):
    """An optimizer whose state cannot be remapped."""


@dataclass(frozen=True)
class OptimizerRule:
    """How each state entry of one optimizer class follows a neuron operation.

    Args:
        linear: keys transformed like the parameter (first moments).
        quadratic: keys transformed with the squared-entry rule (second moments).
        rms: keys holding magnitudes (infinity norms): squared, transformed quadratically, rooted.
        fill: initial value of new entries per key, as a function of the param group (default 0).
        fixup: called with ``(state, group)`` after remapping, to restore invariants the optimizer
            relies on (centered RMSprop needs ``square_avg >= grad_avg**2``).
    """

    linear: Tuple[str, ...] = ()
    quadratic: Tuple[str, ...] = ()
    rms: Tuple[str, ...] = ()
    fill: Mapping[str, Callable[[Mapping[str, object]], float]] = field(default_factory=dict)
    fixup: Optional[Callable[[Dict[str, object], Mapping[str, object]], None]] = None

    def __post_init__(self) -> None:
        for name in ("linear", "quadratic", "rms"):
            keys = getattr(self, name)
            if not isinstance(keys, tuple) or not all(isinstance(k, str) and k for k in keys):
                raise TypeError(f"Expected argument `{name}` to be a tuple of state key names, but got {keys!r}.")
        every = self.keys()
        if len(set(every)) != len(every):
            raise ValueError(f"Expected each state key in one of `linear`, `quadratic`, `rms`, but got {every!r}.")
        if not isinstance(self.fill, Mapping) or not all(
                isinstance(k, str) and callable(v) for k, v in self.fill.items()):
            raise TypeError(f"Expected argument `fill` to map state keys to callables, but got {self.fill!r}.")
        if self.fixup is not None and not callable(self.fixup):
            raise TypeError(f"Expected argument `fixup` to be None or a callable, but got {self.fixup!r}.")

    def keys(self) -> Tuple[str, ...]:
        return self.linear + self.quadratic + self.rms


def _rmsprop_fixup(state: Dict[str, object], group: Mapping[str, object]) -> None:
    # Centered RMSprop divides by sqrt(square_avg - grad_avg**2); after the approximate
    # squared-entry rule for a rotation that difference may turn negative and produce NaN.
    square_avg, grad_avg = state.get("square_avg"), state.get("grad_avg")
    if isinstance(square_avg, Tensor) and isinstance(grad_avg, Tensor):
        torch.maximum(square_avg, grad_avg * grad_avg, out=square_avg)


_ADAM = OptimizerRule(linear=("exp_avg",), quadratic=("exp_avg_sq", "max_exp_avg_sq"))

_RULES: Dict[Type[Optimizer], OptimizerRule] = {
    torch.optim.SGD: OptimizerRule(linear=("momentum_buffer",)),
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: _ADAM,
    torch.optim.RAdam: _ADAM,
    torch.optim.Adamax: OptimizerRule(linear=("exp_avg",), rms=("exp_inf",)),
    torch.optim.RMSprop: OptimizerRule(
        linear=("momentum_buffer", "grad_avg"), quadratic=("square_avg",), fixup=_rmsprop_fixup
    ),
    torch.optim.Adagrad: OptimizerRule(
        quadratic=("sum",),
        fill={"sum": lambda group: float(group.get("initial_accumulator_value", 0.0))},  # type: ignore[arg-type]
    ),
}


def register_optimizer_rule(optimizer_cls: Type[Optimizer], rule: OptimizerRule) -> None:
    """Register (or replace) the remapping rule of an optimizer class and its subclasses.

    Example:
        >>> import torch
        >>> class MySGD(torch.optim.SGD):
        ...     pass
        >>> register_optimizer_rule(MySGD, OptimizerRule(linear=("momentum_buffer",)))
        >>> rule_for(MySGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)).linear
        ('momentum_buffer',)
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"Expected argument `optimizer_cls` to be an Optimizer subclass, but got {optimizer_cls!r}.")
    if not isinstance(rule, OptimizerRule):
        raise TypeError(
            "Expected argument `rule` to be an OptimizerRule (e.g. OptimizerRule(linear=('momentum_buffer',))), "
            f"but got {rule!r}."
        )
    _RULES[optimizer_cls] = rule


def rule_for(optimizer: Optimizer) -> Optional[OptimizerRule]:
    """The rule of the closest registered class in the optimizer's MRO, or ``None``."""
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def _as_optimizers(optimizer: OptimizerArg) -> List[Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, Optimizer):
        return [optimizer]
    if isinstance(optimizer, (list, tuple)):
        bad = [o for o in optimizer if not isinstance(o, Optimizer)]
        if not bad:
            return list(optimizer)
    # Lightning's LightningOptimizer wraps the real optimizer.
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return [inner]
    raise TypeError(
        "Expected argument `optimizer` to be None, a torch.optim.Optimizer or a sequence of them, "
        f"but got {type(optimizer).__name__}."
    )


def _reset_state(opt: Optimizer, param: Tensor, tx: Transaction) -> None:
    """Drop the state of ``param``; all of it when the optimizer keeps flat, global state (LBFGS).

    LBFGS keeps vectors over all parameters concatenated, under its first parameter; its state is only
    consistent as a whole.
    """
    total = sum(p.numel() for group in opt.param_groups for p in group["params"])
    flat = any(
        isinstance(v, Tensor) and v.dim() == 1 and v.numel() == total != p.numel()
        for p, st in opt.state.items() for v in st.values() if isinstance(p, Tensor)
    )
    if flat or hasattr(opt, "_numel_cache"):
        tx.clear(opt.state)
        if hasattr(opt, "_numel_cache"):
            tx.set_attr(opt, "_numel_cache", None)  # LBFGS caches the total parameter count
    else:
        tx.delete_item(opt.state, param)


def _state_error(key: str, name: str, value: Tensor) -> NonFiniteError:
    bad = int((~torch.isfinite(value)).sum())
    return NonFiniteError(f"Optimizer state `{key}` of parameter `{name}` holds {bad} non-finite value(s); refusing "
                          "to remap it (the change would spread them).")


class StateRemapper:
    """Finds which optimizer owns each parameter and applies axis transforms to its state.

    Args:
        optimizer: ``None``, one optimizer, or several (each parameter's owner is looked up).
        on_unknown: ``"raise"`` for optimizers with no rule, or ``"reset"`` to drop the state of
            touched parameters instead.
    """

    def __init__(self, optimizer: OptimizerArg = None, on_unknown: str = "raise") -> None:
        if on_unknown not in ("raise", "reset"):
            raise ValueError(f"Expected argument `on_unknown` to be 'raise' or 'reset', but got {on_unknown!r}.")
        self.optimizers = _as_optimizers(optimizer)
        self.on_unknown = on_unknown
        self._owner: Dict[int, Tuple[Optimizer, Mapping[str, object]]] = {}
        self._shared: Dict[int, List[str]] = {}
        self._reset: set = set()
        self._names: Dict[int, str] = {}
        where: Dict[int, str] = {}
        for opt in self.optimizers:
            for index, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    here = f"{type(opt).__name__} (param group {index})"
                    if id(p) in self._owner:
                        self._shared.setdefault(id(p), [where[id(p)]]).append(here)
                    self._owner[id(p)] = (opt, group)
                    where[id(p)] = here

    def owner(self, param: Tensor) -> Optional[Tuple[Optimizer, Mapping[str, object]]]:
        return self._owner.get(id(param))

    def validate(self, params: Iterable[Tensor], names: Mapping[int, str], unchecked: Collection[int] = ()) -> None:
        """Raise before anything changes if a parameter cannot be remapped.

        Checks that every trainable parameter is held by one of the optimizers, that each owner
        has a rule (or ``on_unknown="reset"``), and that its state tensors are shaped like it and
        finite (except for the parameters whose ``id`` is in ``unchecked``: :meth:`apply` with
        ``verify=True`` checks theirs).
        """
        if not self.optimizers:
            return
        self._names.update(names)
        for p in params:
            name = names.get(id(p), "<parameter>")
            if id(p) in self._shared:
                raise ValueError(
                    f"Expected every parameter to be held by one optimizer param group, but parameter `{name}` is "
                    f"held by {' and '.join(self._shared[id(p)])}: its state could not be remapped consistently."
                )
            found = self.owner(p)
            if found is None:
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    kinds = ", ".join(type(o).__name__ for o in self.optimizers)
                    raise ValueError(
                        f"Expected argument `optimizer` ({kinds}) to hold parameter `{name}` of the model, "
                        "but it does not: pass the optimizer that trains this model."
                    )
                continue
            opt, _ = found
            state = opt.state.get(p, {})
            rule = rule_for(opt)
            uncovered = [] if rule is None else [
                key for key, value in state.items()
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == p.shape and key not in rule.keys()
            ]
            if rule is None or uncovered:
                if self.on_unknown == "reset":
                    self._reset.add(id(p))  # its state is dropped, whatever its shapes
                    continue
                if rule is None:
                    raise UnsupportedOptimizerError(
                        f"No state remapping rule for optimizer class {type(opt).__name__}. Supported: "
                        f"{sorted(c.__name__ for c in _RULES)}. Register one with `register_optimizer_rule`, "
                        "or pass `on_unknown='reset'` to drop the state of the changed parameters."
                    )
                raise UnsupportedOptimizerError(
                    f"Optimizer {type(opt).__name__} has state {uncovered} for parameter `{name}` that its remapping "
                    "rule does not cover. Register a complete rule with `register_optimizer_rule`, or pass "
                    "`on_unknown='reset'`."
                )
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"Optimizer state `{key}` of parameter `{name}` has shape {tuple(value.shape)}, "
                        f"but the parameter has shape {tuple(p.shape)}: the optimizer does not match the model."
                    )
                if isinstance(value, Tensor) and id(p) not in unchecked and not all_finite(value):
                    raise _state_error(key, name, value)

    def apply(self, param: Tensor, view_of: Callable[[Tensor], Tensor], shape_back: Callable[[Tensor], Tensor],
              transform: AxisTransform, inplace: bool = False, verify: bool = False, axis: Optional[int] = None
              ) -> None:
        """Remap the state of ``param`` (called before the parameter itself changes shape).

        New state tensors replace the old ones in the state dict, through the enclosing
        :func:`~iso_lightning.transaction.atomic` block, so a failure later in the operation restores them.
        With ``inplace`` (a rotation of a very wide tensor) first and second moments are rotated in
        place; an undo applies the inverse rotation, which restores first moments to round-off and
        second moments (whose rule has no inverse) to a valid estimate near the old ones.
        ``verify``: the state was not checked finite by :meth:`validate`; ``transform`` carries its
        input into its result (a rotation, an extension), whose check covers it, before any fixup
        (see ``operations.check_space``). ``axis``: the axis of ``param`` that holds one entry per
        neuron, where the transform may act on the state directly (:meth:`~iso_lightning.axis.AxisTransform.along`).
        """
        found = self.owner(param)
        if found is None:
            return
        opt, group = found
        rule = rule_for(opt)
        with atomic() as tx:
            if rule is None or id(param) in self._reset:
                _reset_state(opt, param, tx)
                return
            state = opt.state.get(param)
            if state:
                self._remap(state, group, rule, param, view_of, shape_back, transform, tx, inplace,
                            self._names.get(id(param), "<parameter>"), verify, axis)

    @staticmethod
    def _remap(state: Dict[str, object], group: Mapping[str, object], rule: OptimizerRule, param: Tensor,
               view_of: Callable[[Tensor], Tensor], shape_back: Callable[[Tensor], Tensor], transform: AxisTransform,
               tx: Transaction, inplace: bool, name: str = "<parameter>", verify: bool = False,
               axis: Optional[int] = None) -> None:
        # The state was checked finite (validate, or is checked here with `verify`): only a rotation,
        # the squares of the "rms" rule or a fixup can make it overflow; a selection or an extension
        # copies it (and finite fills).
        may_overflow = transform.may_overflow or bool(rule.rms) or rule.fixup is not None or bool(rule.fill)
        # Where nothing can overflow, each entry is swapped in as soon as it is made, so that the old
        # one is freed (an extension restores from a view of its result) before the next is allocated;
        # otherwise all are made and checked first.
        new_state = dict(state) if may_overflow else {}
        restores: Dict[str, Optional[Tensor]] = {}  # an extension's old values, as views of its result
        for key in list(state):
            value = state[key]
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape != param.shape:
                continue  # scalars such as `step` are kept
            if key not in rule.keys():
                raise UnsupportedOptimizerError(
                    f"Optimizer state `{key}` is not covered by its remapping rule "
                    "(call `validate` before `apply` to refuse this before anything changes)."
                )
            moment = key in rule.linear or key in rule.quadratic  # not an "rms" key
            # New entries' value (an extension's), by the rule's fill or zero.
            value_fill = rule.fill[key](group) if key in rule.fill and hasattr(transform, "count") else None
            direct = None
            if axis is not None and moment and not inplace:
                direct = transform.along(value, axis, value_fill)  # type: ignore[arg-type]
            view = value if direct is not None else view_of(value)
            if verify and inplace and not all_finite(value):  # overwritten below: checked first
                raise _state_error(key, name, value)
            if inplace and moment and view.data_ptr() == value.data_ptr() and value.is_contiguous():
                # A tensor too large for a second copy (see transaction.IN_PLACE_ELEMENTS), rotated after
                # everything that can be refused was checked. A rotation keeps finite state finite
                # (M o M is doubly stochastic: second moments keep their range). Undo: the inverse
                # rotation, to round-off for first moments; (M o M)^T has no inverse in general, so a
                # second moment comes back as (M^T o M^T)^T of its rotated self, a valid estimate near
                # the old one, not its bits.
                inverse = transform.inverse()
                if key in rule.linear:
                    transform.linear(view, inplace=True)
                    tx.on_rollback(functools.partial(inverse.linear, view, inplace=True))
                else:
                    transform.quadratic(view, inplace=True)
                    tx.on_rollback(functools.partial(inverse.quadratic, view, inplace=True))
                continue
            if direct is not None:
                new, restore = direct
            else:
                fill = None
                if value_fill is not None:
                    pre, _, rest = view.shape
                    fill = view.new_full((pre, transform.count, rest), value_fill)  # type: ignore[attr-defined]
                if key in rule.linear:
                    new = transform.linear(view, fill)
                elif key in rule.quadratic:
                    new = transform.quadratic(view, fill)
                else:
                    new = transform.quadratic(view * view, fill).clamp_min(0).sqrt()
                restore = leading_view(value, view, new) if transform.keeps_prefix and moment else None
                new = shape_back(new)
            if rule.fixup is not None:
                restore = None  # the fixup may change the new tensor in place: the undo keeps the old one
            if may_overflow:
                if verify and rule.fixup is not None and not all_finite(new) and not all_finite(value):
                    raise _state_error(key, name, value)  # before the fixup can hide it (a maximum)
                new_state[key] = new
                restores[key] = restore
            else:
                if verify and not all_finite(new):  # a copy of the input (and zeros): the input is not finite
                    raise _state_error(key, name, value)
                del value, view
                tx.set_item(state, key, new, restore=restore)
            del new
        if not may_overflow:
            return
        if rule.fixup is not None:
            # Fixups may update the tensors just made in place: they are not the optimizer's old ones.
            rule.fixup(new_state, group)
        bad = [key for key, value in new_state.items() if value is not state.get(key)
               and isinstance(value, Tensor) and not all_finite(value)]
        if bad:
            for key, value in state.items() if verify else ():  # a non-finite input, reported as such
                if isinstance(value, Tensor) and not all_finite(value):
                    raise _state_error(key, name, value)
            dtype = new_state[bad[0]].dtype  # type: ignore[attr-defined]
            raise NonFiniteError(
                f"The operation would write non-finite values into optimizer state `{bad[0]}` of parameter "
                f"`{name}` (its values are too large for {dtype}); refusing it, nothing was changed."
            )
        for key, value in new_state.items():
            if value is not state.get(key):
                tx.set_item(state, key, value, restore=restores.get(key))
