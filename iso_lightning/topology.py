"""Topology records (the width and groups of every neuron space) and resizing a model before its weights load.

A record is plain, JSON-safe data, one entry per space::

    {"version": 2, "spaces": {"net.hidden.0": {"width": 12, "groups": None}, "net.input": {...}, ...}}

Checkpoints carry one (under :data:`TOPOLOGY_KEY`), but the state dict itself is the authority: a
state dict taken after growth and shrink events holds tensors of other shapes than the model it is
loaded into, and :func:`load_state_dict_resized` reads every space's width (and an isotropic
space's ``group_index`` buffer) from it, checks that every tensor will then fit, resizes the model
and loads, all or nothing. Records of iso_lightning 0.1 (one entry per network, with
``hidden_widths``) are read too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from iso_lightning.providers import find_spaces
from iso_lightning.spaces import IsotropicSpaceActivation, NeuronSpace, Role
from iso_lightning.transaction import Transaction, atomic

__all__ = [
    "RECORD_VERSION",
    "TOPOLOGY_KEY",
    "check_record",
    "load_state_dict_resized",
    "record_from_state_dict",
    "reshape",
    "space_entries",
    "topology_record",
]

#: Checkpoint key of the topology record.
TOPOLOGY_KEY = "iso_lightning_topology"
RECORD_VERSION = 2

Entry = Dict[str, Any]


def _entry(space: NeuronSpace) -> Entry:
    groups = None
    if isinstance(space.activation, IsotropicSpaceActivation) and space.activation.activation.group_index is not None:
        groups = space.activation.activation.group_index.tolist()
    return {"width": space.width, "groups": groups}


def space_entries(spaces: Mapping[str, NeuronSpace]) -> Dict[str, Entry]:
    """``{name: {"width": ..., "groups": ...}}`` of the spaces as they are now."""
    return {name: _entry(space) for name, space in spaces.items()}


def topology_record(spaces: Mapping[str, NeuronSpace]) -> Dict[str, Any]:
    """The record of ``spaces`` (every kind: hidden, input and output)."""
    return {"version": RECORD_VERSION, "spaces": space_entries(spaces)}


def _from_legacy(record: Mapping[str, Any]) -> Dict[str, Entry]:
    """Entries of an iso_lightning 0.1 record (``{network path: {in_features, out_features, hidden_widths,
    groups}}``)."""
    entries: Dict[str, Entry] = {}
    for path, net in record.items():
        if not isinstance(net, Mapping):
            raise ValueError(f"Expected a topology record of this model (a mapping per network), but got {record!r}.")
        prefix = f"{path}." if path else ""
        widths, groups = net.get("hidden_widths"), net.get("groups")
        if not isinstance(widths, list) or not isinstance(groups, list) or len(groups) != len(widths):
            raise ValueError(f"Expected a topology record of this model (hidden widths and one group list or None "
                             f"per hidden layer), but got {net!r} for `{path or '<module>'}`.")
        for layer, (width, index) in enumerate(zip(widths, groups)):
            entries[f"{prefix}hidden.{layer}"] = {"width": width, "groups": index}
        entries[f"{prefix}input"] = {"width": net.get("in_features"), "groups": None}
        entries[f"{prefix}output"] = {"width": net.get("out_features"), "groups": None}
    return entries


def _entries(record: Any) -> Dict[str, Entry]:
    if isinstance(record, Mapping) and record.get("version") == RECORD_VERSION and isinstance(record.get("spaces"),
                                                                                              Mapping):
        return dict(record["spaces"])
    if isinstance(record, Mapping) and "version" not in record:
        return _from_legacy(record)
    raise ValueError(
        f"Expected a topology record (version {RECORD_VERSION}, or one of iso_lightning 0.1), but got {record!r}."
    )


def check_record(spaces: Mapping[str, NeuronSpace], record: Any) -> Dict[str, Entry]:
    """Validated entries of ``record`` for ``spaces`` (raises ``ValueError`` naming the space).

    The record must name exactly the model's spaces; widths are positive ints, and groups ``None``
    or a group number for every neuron, numbered ``0 .. m-1``, each used.
    """
    entries = _entries(record)
    if set(entries) != set(spaces):
        missing, extra = sorted(set(spaces) - set(entries)), sorted(set(entries) - set(spaces))
        raise ValueError(
            f"The topology record names spaces {sorted(entries)}, but this model has {sorted(spaces)} (missing "
            f"{missing}, unknown {extra}): it is from a different architecture."
        )
    for name, entry in entries.items():
        def bad(why: str, name: str = name, entry: Any = entry) -> ValueError:
            return ValueError(f"Space `{name}`: expected a topology entry with {why}, but got {entry!r}.")

        if not isinstance(entry, Mapping):
            raise bad("a width and groups")
        width, groups = entry.get("width"), entry.get("groups")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise bad("a positive int width")
        if groups is None:
            continue
        if not isinstance(spaces[name].activation, IsotropicSpaceActivation):
            raise bad("no groups (its activation is elementwise)")
        if not isinstance(groups, list) or len(groups) != width or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in groups):
            raise bad("a group number for every neuron")
        if set(groups) != set(range(max(groups) + 1)):
            raise bad("groups numbered 0..m-1, each used")
    return entries


def _group_count(space: NeuronSpace, entry: Entry) -> int:
    groups = entry.get("groups")
    if space.activation is not None and not isinstance(space.activation, IsotropicSpaceActivation):
        return int(entry["width"])
    return 1 if groups is None else max(groups) + 1


def planned_shapes(spaces: Mapping[str, NeuronSpace],
                   entries: Mapping[str, Entry]) -> Dict[int, Tuple[Tensor, List[int]]]:
    """The shape every tensor of ``spaces`` gets under ``entries`` (a tensor shared by two spaces gets both axes)."""
    targets: Dict[int, Tuple[Tensor, List[int]]] = {}
    for name, entry in entries.items():
        space = spaces[name]
        m = _group_count(space, entry)
        for b in space.bindings:
            if b.role == Role.BIAS_OUT:
                continue
            t = b.tensor
            shape = targets[id(t)][1] if id(t) in targets else list(t.shape)
            size = m if b.role in (Role.LENGTH, Role.CORRECTION_OUT) else int(entry["width"])
            shape[b.axis] = size * b.inner
            targets[id(t)] = (t, shape)
    return targets


def reshape(spaces: Mapping[str, NeuronSpace], entries: Mapping[str, Entry]) -> None:
    """Give every tensor of ``spaces`` the shape ``entries`` describe (zeros: values come from a state dict).

    Tensors keep their identity; gradients of resized tensors are dropped. All or nothing: a
    failure (a record too large to allocate) leaves the model as it was and raises ``ValueError``.
    A space with a parametrized tensor (``weight_norm``) is refused before anything changes.
    """
    for name, entry in entries.items():
        space = spaces[name]
        if _entry(space) == dict(entry):
            continue
        for b in space.bindings:
            if b.role != Role.BIAS_OUT and nn.utils.parametrize.is_parametrized(b.module, b.name):
                kind = type(b.module.parametrizations[b.name][0]).__name__  # type: ignore[index]
                raise ValueError(
                    f"Space `{name}`: tensor `{b.label}` is parametrized ({kind}), so it cannot be resized to the "
                    "topology record. Remove the parametrization first "
                    "(`torch.nn.utils.parametrize.remove_parametrizations`)."
                )
    with atomic() as tx:
        try:
            for t, shape in planned_shapes(spaces, entries).values():
                if list(t.shape) != shape:
                    tx.set_grad(t, None)
                    tx.replace(t, t.new_zeros(shape))
        except (RuntimeError, MemoryError) as err:
            sizes = {name: entry["width"] for name, entry in entries.items()}
            raise ValueError(f"The topology record asks for widths {sizes}, which could not be allocated: {err}") \
                from None
        for name, entry in entries.items():
            _set_groups(spaces[name], entry, tx)


def _set_groups(space: NeuronSpace, entry: Entry, tx: Transaction) -> None:
    act = space.activation
    if not isinstance(act, IsotropicSpaceActivation):
        return
    groups = entry.get("groups")
    index = None if groups is None else torch.tensor(groups, dtype=torch.long)
    current = act.activation.group_index
    if current is None or index is None:
        if (current is None) != (index is None):
            act.set_group_index(index, tx)
    elif not torch.equal(current.cpu(), index):
        act.set_group_index(index, tx)


def record_from_state_dict(spaces: Mapping[str, NeuronSpace], state_dict: Mapping[str, Any]) -> Dict[str, Entry]:
    """The entry of every space whose tensors ``state_dict`` holds, read from their shapes.

    Raises ``ValueError`` when the state dict's tensors of one space disagree on its width.
    """
    entries: Dict[str, Entry] = {}
    for name, space in spaces.items():
        widths = {}
        for b in space.neuron_bindings():
            value = state_dict.get(b.path) if b.path else None
            if isinstance(value, Tensor) and value.dim() > b.axis:
                widths[b.path] = value.shape[b.axis] // b.inner
        if not widths:
            continue
        if len(set(widths.values())) != 1:
            raise ValueError(f"Space `{name}`: the state dict's tensors disagree on its width: {widths}.")
        width = next(iter(widths.values()))
        groups = None
        if isinstance(space.activation, IsotropicSpaceActivation):
            index = state_dict.get(f"{space.activation_path}.group_index") if space.activation_path else None
            if isinstance(index, Tensor):
                groups = index.tolist()
        entries[name] = {"width": width, "groups": groups}
    return entries


def load_state_dict_resized(module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                            load: Optional[Callable[..., Any]] = None, **kwargs: Any) -> Any:
    """``module.load_state_dict(state_dict)`` after resizing every neuron space to the state dict's widths.

    Everything is checked before anything changes: the widths and groups read from the state dict,
    that every tensor then has the state dict's shape, and (``strict``) that the keys match. Then
    the spaces are resized and the state dict loaded inside one all-or-nothing block. ``load`` is the
    loading function to call (default: ``nn.Module.load_state_dict`` of ``module``).
    """
    load = load if load is not None else (lambda *a, **k: nn.Module.load_state_dict(module, *a, **k))
    spaces = find_spaces(module)
    wanted = record_from_state_dict(spaces, state_dict)
    current = space_entries(spaces)
    changes = {name: entry for name, entry in wanted.items() if entry != current[name]}
    if changes:
        check_record({n: spaces[n] for n in changes}, {"version": RECORD_VERSION, "spaces": changes})
    planned = {id(t): shape for t, shape in planned_shapes(spaces, changes).values()}
    for name, entry in changes.items():  # the group index buffer follows the width
        act = spaces[name].activation
        if isinstance(act, IsotropicSpaceActivation) and act.activation.group_index is not None and entry["groups"]:
            planned[id(act.activation.group_index)] = [len(entry["groups"])]
    own = module.state_dict(keep_vars=True)
    mismatched = []
    for key, value in state_dict.items():
        mine = own.get(key)
        if isinstance(mine, Tensor) and isinstance(value, Tensor):
            shape = planned.get(id(mine), list(mine.shape))
            if list(value.shape) != list(shape):
                mismatched.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(shape)}.")
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            mismatched.append(f"Missing key(s) in state_dict: {', '.join(repr(k) for k in missing)}.")
        if unexpected:
            mismatched.append(f"Unexpected key(s) in state_dict: {', '.join(repr(k) for k in unexpected)}.")
    if mismatched:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__} (nothing was changed):\n\t"
                           + "\n\t".join(mismatched))
    reshaped = {id(t) for t, shape in planned_shapes(spaces, changes).values() if list(t.shape) != shape}
    with atomic() as tx:
        reshape(spaces, changes)
        _undo_loading(module, own, state_dict, reshaped, tx)
        return load(state_dict, strict=strict, **kwargs)


def _undo_loading(module: nn.Module, own: Mapping[str, Any], state_dict: Mapping[str, Any], reshaped: Set[int],
                  tx: Transaction) -> None:
    """Make a failure part-way through ``load`` undoable: it copies values into tensors in place (and,
    with ``assign=True``, swaps tensor objects), which the undo log does not see.

    Tensors that :func:`reshape` replaced need nothing (their old storage comes back); the others
    are saved, and every module's parameter and buffer entries are remembered.
    """
    seen: Set[int] = set()
    for key, t in own.items():  # the module's state dict, tensors kept as they are
        if key not in state_dict or not isinstance(t, Tensor) or id(t) in seen or id(t) in reshaped:
            continue
        seen.add(id(t))
        tx.on_rollback(functools.partial(_copy_back, t, t.detach().clone()))
    for sub in module.modules():
        entries = (sub._parameters, sub._buffers)
        tx.on_rollback(functools.partial(_restore_entries, entries, tuple(dict(e) for e in entries)))


def _copy_back(t: Tensor, saved: Tensor) -> None:
    with torch.no_grad():
        t.detach().copy_(saved)


def _restore_entries(entries: Tuple[Dict[str, Any], ...], saved: Tuple[Dict[str, Any], ...]) -> None:
    for current, old in zip(entries, saved):
        current.clear()
        current.update(old)

