"""Optimizer-state remapping across neuron operations, checked against an independent numpy reference.

For every supported optimizer and every operation the test

1. trains a small float64 :class:`IsotropicMLP` for a few steps so that the optimizer has state,
2. snapshots parameters and state in numpy (copies: the library rotates tensors in place),
3. runs the operation with ``optimizer=opt`` while an old loss graph is still alive,
4. recovers the change of basis that was *actually applied* from the parameters alone (least squares
   on the stacked tensors of the space, or a numpy SVD for full diagonalisation), and
5. checks every state entry against the rules of DESIGN.md 'Optimizer state': first moments
   ``M^T x``, second moments ``(M o M)^T v``, infinity norms ``sqrt((M o M)^T u^2)``, new entries zero
   (Adagrad: ``initial_accumulator_value``), ``step`` kept, untouched parameters bit-identical.

The reference never calls :mod:`iso_lightning.axis` or :mod:`iso_lightning.optim`.
"""

from __future__ import annotations

import gc
import math
import sys
import weakref
from collections import defaultdict
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import pytest
import torch
from _data import FASHION_MNIST_DIR, fashion_mnist_available, load_fashion_mnist
from torch.optim import Optimizer

import iso_lightning.optim as optim_module
from iso_lightning import IsotropicMLP, OptimizerRule, StateRemapper, UnsupportedOptimizerError, register_optimizer_rule

SIZES = [6, 9, 7, 3]
# Four hidden spaces, so that sparsify diagonalises two layers (1 and 3) in one call.
DEEP_SIZES = [6, 9, 7, 8, 5, 3]
ADAGRAD_INIT = 0.1

OPTIMIZERS: Dict[str, Tuple[type, Dict[str, object]]] = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "nadam": (torch.optim.NAdam, dict(lr=1e-2)),
    "radam": (torch.optim.RAdam, dict(lr=1e-2)),
    "adamax": (torch.optim.Adamax, dict(lr=1e-2)),
    "rmsprop_centered_momentum": (torch.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.9)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, initial_accumulator_value=ADAGRAD_INIT)),
}

# How each state key must follow a change of basis (DESIGN.md, 'Optimizer state'); written here
# independently of iso_lightning.optim so that a wrong rule there is caught.
KEY_KINDS = {
    "momentum_buffer": "linear",
    "exp_avg": "linear",
    "grad_avg": "linear",
    "exp_avg_sq": "quadratic",
    "max_exp_avg_sq": "quadratic",
    "square_avg": "quadratic",
    "sum": "quadratic",
    "exp_inf": "rms",
    "__grad__": "linear",  # gradients present during the operation follow the parameter
}

# Tolerance for rotations recovered by least squares. The reference sums O(n) float64 products
# (error ~ n * 1e-16) with a basis recovered from a system whose condition number is asserted to be
# below _MAX_COND, so errors stay under ~1e-12 relative; 1e-9 relative to the tensor's largest entry
# leaves a wide margin while a wrong rule (e.g. linear instead of quadratic, a transposed M) is off
# by O(1) relative.
_ROT_RTOL = 1e-9
_MAX_COND = 1e4
# Residual allowed when the recovered rotation is applied back to the parameters (float64 round-off).
_RECOVER_ATOL = 1e-10

Maps = Dict[str, List[Tuple[int, np.ndarray]]]


# ---------------------------------------------------------------------------- model, data, training
@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation (4x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_net(sizes: Sequence[int] = SIZES, seed: int = 0) -> IsotropicMLP:
    g = torch.Generator().manual_seed(seed)
    net = IsotropicMLP(list(sizes), psi="trainable", length="trainable", generator=g).double()
    # Non-zero biases and corrections make every tensor of a space informative, so the applied rotation
    # can be recovered (and its signs fixed) from the parameters.
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g, dtype=torch.float64))
            if layer.correction is not None:
                layer.correction.copy_(0.1 * torch.randn(layer.correction.shape, generator=g, dtype=torch.float64))
    return net


def make_opt(key: str, params) -> Optimizer:  # type: ignore[no-untyped-def]
    cls, kwargs = OPTIMIZERS[key]
    return cls(params, **kwargs)


def batch(net: IsotropicMLP, seed: int, n: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_features, generator=g, dtype=torch.float64)
    y = torch.randn(n, net.out_features, generator=g, dtype=torch.float64)
    return x, y


def loss_of(net: IsotropicMLP, seed: int) -> torch.Tensor:
    x, y = batch(net, seed)
    return (net(x) - y).pow(2).mean()


def train(net: IsotropicMLP, opts: Sequence[Optimizer], steps: int, seed: int = 100) -> List[float]:
    losses = []
    for i in range(steps):
        for opt in opts:
            opt.zero_grad()
        loss = loss_of(net, seed + i)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------- snapshots
class Snapshot(NamedTuple):
    params: Dict[str, np.ndarray]
    grads: Dict[str, np.ndarray]
    state: Dict[str, Dict[str, object]]
    group_ids: List[List[int]]
    param_ids: List[int]


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy().copy()


def snapshot(net: IsotropicMLP, opts: Sequence[Optimizer]) -> Snapshot:
    names = {id(p): n for n, p in net.named_parameters()}
    params = {n: _to_np(p) for n, p in net.named_parameters()}
    grads = {n: _to_np(p.grad) for n, p in net.named_parameters() if p.grad is not None}
    state: Dict[str, Dict[str, object]] = {}
    for opt in opts:
        for p, st in opt.state.items():
            state[names[id(p)]] = {
                k: (_to_np(v) if v.dim() > 0 else float(v)) if isinstance(v, torch.Tensor) else v for k, v in st.items()
            }
    group_ids = [[id(p) for p in g["params"]] for opt in opts for g in opt.param_groups]
    return Snapshot(params, grads, state, group_ids, [id(p) for p in net.parameters()])


# ---------------------------------------------------------------------------- reference maths
def along(x: np.ndarray, axis: int, m: np.ndarray) -> np.ndarray:
    """``x'_{..j..} = sum_i m_ij x_{..i..}`` along ``axis``."""
    return np.moveaxis(np.tensordot(x, m, axes=([axis], [0])), -1, axis)


def extension(n: int, k: int) -> np.ndarray:
    return np.hstack([np.eye(n), np.zeros((n, k))])


def selection(n: int, keep: Sequence[int]) -> np.ndarray:
    return np.eye(n)[:, list(keep)]


def is_zero_one(m: np.ndarray) -> bool:
    return bool(np.all((m == 0) | (m == 1)))


def space_tensors(layer: int, producers_only: bool = False) -> List[Tuple[str, int]]:
    """(parameter name, axis) of every tensor indexed by hidden space ``layer`` of an MLP with psi on."""
    out = [(f"layers.{layer}.weight", 0), (f"layers.{layer}.bias", 0)]
    if layer >= 1:
        out.append((f"layers.{layer}.correction", 0))
    if not producers_only:
        out.append((f"layers.{layer + 1}.weight", 1))
    return out


def stack(params: Dict[str, np.ndarray], tensors: Sequence[Tuple[str, int]]) -> np.ndarray:
    """The tensors as one ``n x K`` matrix, the space axis first."""
    cols = []
    for name, axis in tensors:
        t = np.moveaxis(params[name], axis, 0)
        cols.append(t.reshape(t.shape[0], -1))
    return np.hstack(cols)


def recover(x_old: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """The ``M`` with ``x_new = M^T x_old`` (least squares; ``x_old`` must have full row rank)."""
    cond = np.linalg.cond(x_old)
    assert cond < _MAX_COND, f"reference system too ill-conditioned to recover the rotation: cond={cond:.3g}"
    m, *_ = np.linalg.lstsq(x_old.T, x_new.T, rcond=None)
    # The rotation really maps every tensor: the residual is round-off only.
    np.testing.assert_allclose(m.T @ x_old, x_new, rtol=0, atol=_RECOVER_ATOL * max(1.0, np.abs(x_new).max()))
    return m


def assert_orthonormal_columns(m: np.ndarray) -> None:
    np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), rtol=0, atol=100 * _RECOVER_ATOL)


def maps_for_space(layer: int, m: np.ndarray) -> Maps:
    return {name: [(axis, m)] for name, axis in space_tensors(layer)}


def rotation_maps(old: Dict[str, np.ndarray], new: Dict[str, np.ndarray], layer: int) -> Tuple[Maps, np.ndarray]:
    m = recover(stack(old, space_tensors(layer)), stack(new, space_tensors(layer)))
    assert_orthonormal_columns(m)
    return maps_for_space(layer, m), m


def full_diag_maps(old: Dict[str, np.ndarray], new: Dict[str, np.ndarray], layers: Sequence[int]) -> Maps:
    """Rotations applied by full diagonalisation of ``layers`` (ascending), recovered step by step.

    For each layer ``l``: ``W_l = U S V^T`` (numpy). ``U`` is unique up to column signs (distinct singular
    values), fixed with ``b_l`` and ``psi_{l-1}``, which no other step touches. The previous space's
    rotation ``V`` (including the null-space part, which an SVD leaves arbitrary) is recovered by least
    squares from its producers and from ``U W_l^new = W_l^old V``. ``sim`` holds the parameters between
    steps so that a later layer is referred to the tensors it really saw.
    """
    sim = {k: v.copy() for k, v in old.items()}
    maps: Maps = defaultdict(list)
    for layer in layers:
        w = sim[f"layers.{layer}.weight"]
        assert w.shape[0] <= w.shape[1], "reference assumes a wide W_l (the null space is on the V side)"
        u, s, _ = np.linalg.svd(w)
        assert np.min(-np.diff(s)) > 1e-6, "singular values too close for a unique basis"
        fix = [f"layers.{layer}.bias", f"layers.{layer}.correction"]
        y_sim = np.column_stack([sim[n].reshape(len(s), -1) for n in fix])
        y_new = np.column_stack([new[n].reshape(len(s), -1) for n in fix])
        dots = np.sum((u.T @ y_sim) * y_new, axis=1)
        assert np.all(np.abs(dots) > 1e-8), f"cannot fix singular vector signs: {dots}"
        m_this = u * np.sign(dots)
        producers = space_tensors(layer - 1, producers_only=True)
        w_new = new[f"layers.{layer}.weight"]
        x_old = np.hstack([stack(sim, producers), w.T])
        x_new = np.hstack([stack(new, producers), (m_this @ w_new).T])
        m_prev = recover(x_old, x_new)
        assert_orthonormal_columns(m_prev)
        for space, m in ((layer - 1, m_prev), (layer, m_this)):
            for name, axis in space_tensors(space):
                maps[name].append((axis, m))
                sim[name] = along(sim[name], axis, m)
    return dict(maps)


# ---------------------------------------------------------------------------- operations under test
class Op(NamedTuple):
    name: str
    sizes: Sequence[int]
    run: Callable[[IsotropicMLP, object], object]
    # (old params, new params) -> the axis maps the operation applied
    maps: Callable[[Dict[str, np.ndarray], Dict[str, np.ndarray]], Maps]
    rotation: bool


def _grow(layer: int, k: int) -> Op:
    def maps(old, new):  # type: ignore[no-untyped-def]
        n = old[f"layers.{layer}.bias"].shape[0]
        return maps_for_space(layer, extension(n, k))

    return Op(f"grow{layer}_n{k}", SIZES, lambda net, opt: net.grow(layer, k, optimizer=opt), maps, False)


def _shrink(layer: int, k: int) -> Op:
    def maps(old, new):  # type: ignore[no-untyped-def]
        result, m = rotation_maps(old, new, layer)
        assert m.shape == (old[f"layers.{layer}.bias"].shape[0], old[f"layers.{layer}.bias"].shape[0] - k)
        return result

    return Op(f"shrink{layer}_n{k}", SIZES, lambda net, opt: net.shrink(layer, k, optimizer=opt), maps, True)


def _diag_left(layer: int) -> Op:
    def maps(old, new):  # type: ignore[no-untyped-def]
        result, m = rotation_maps(old, new, layer)
        # Independent check that the rotation is the left singular basis of A = [W_l | psi_{l-1}].
        a = stack(old, space_tensors(layer, producers_only=True)[:1] + space_tensors(layer, producers_only=True)[2:])
        u, s, _ = np.linalg.svd(a)
        r = len(s)
        np.testing.assert_allclose(np.abs(m[:, :r].T @ u[:, :r]), np.eye(r), rtol=0, atol=100 * _RECOVER_ATOL)
        return result

    return Op(f"diag_left{layer}", SIZES, lambda net, opt: net.diagonalise(layer, "left", optimizer=opt), maps, True)


def _diag_full(layer: int) -> Op:
    return Op(f"diag_full{layer}", SIZES, lambda net, opt: net.diagonalise(layer, "full", optimizer=opt),
              lambda old, new: full_diag_maps(old, new, [layer]), True)


def _sparsify() -> Op:
    return Op("sparsify", DEEP_SIZES, lambda net, opt: net.sparsify(optimizer=opt),
              lambda old, new: full_diag_maps(old, new, [1, 3]), True)


def _last(sizes: Sequence[int]) -> int:
    return len(sizes) - 2


def _add_inputs(k: int) -> Op:
    return Op("add_inputs", SIZES, lambda net, opt: net.add_inputs(k, optimizer=opt),
              lambda old, new: {"layers.0.weight": [(1, extension(SIZES[0], k))]}, False)


def _remove_inputs(idx: Sequence[int]) -> Op:
    keep = [i for i in range(SIZES[0]) if i not in idx]
    return Op("remove_inputs", SIZES, lambda net, opt: net.remove_inputs(idx, optimizer=opt),
              lambda old, new: {"layers.0.weight": [(1, selection(SIZES[0], keep))]}, False)


def _output_maps(m: np.ndarray) -> Maps:
    last = _last(SIZES)
    return {f"layers.{last}.{n}": [(0, m)] for n in ("weight", "bias", "correction")}


def _add_outputs(k: int) -> Op:
    return Op("add_outputs", SIZES, lambda net, opt: net.add_outputs(k, optimizer=opt),
              lambda old, new: _output_maps(extension(SIZES[-1], k)), False)


def _remove_outputs(idx: Sequence[int]) -> Op:
    keep = [i for i in range(SIZES[-1]) if i not in idx]
    return Op("remove_outputs", SIZES, lambda net, opt: net.remove_outputs(idx, optimizer=opt),
              lambda old, new: _output_maps(selection(SIZES[-1], keep)), False)


OPS = [
    _grow(0, 2), _grow(1, 3),
    _shrink(0, 1), _shrink(1, 1), _shrink(0, 3), _shrink(1, 3),
    _diag_left(0), _diag_left(1), _diag_full(1),
    _add_inputs(2), _remove_inputs([1, 4]), _add_outputs(2), _remove_outputs([0]),
    _sparsify(),
]


# ---------------------------------------------------------------------------- the state check
def _fill(key: str) -> float:
    return ADAGRAD_INIT if key == "sum" else 0.0


def expected_entry(key: str, old: np.ndarray, maps: List[Tuple[int, np.ndarray]]) -> np.ndarray:
    kind = KEY_KINDS[key]
    x = old * old if kind == "rms" else old
    for axis, m in maps:
        x = along(x, axis, m if kind == "linear" else m * m)
        new_cols = np.flatnonzero(~m.any(axis=0))  # entries an extension appended
        if new_cols.size:
            index = [slice(None)] * x.ndim
            index[axis] = new_cols
            fill = _fill(key)
            x[tuple(index)] = fill * fill if kind == "rms" else fill
    return np.sqrt(x) if kind == "rms" else x


def check_structure(net: IsotropicMLP, opts: Sequence[Optimizer], before: Snapshot) -> None:
    params = {id(p) for p in net.parameters()}
    assert [id(p) for p in net.parameters()] == before.param_ids, "Parameter objects were replaced"
    assert [[id(p) for p in g["params"]] for o in opts for g in o.param_groups] == before.group_ids
    for opt in opts:
        assert set(map(id, opt.state)) <= params, "stale key in optimizer.state"
        for p, st in opt.state.items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert v.shape == p.shape, f"state `{key}` has shape {tuple(v.shape)}, param {tuple(p.shape)}"
                    assert v.dtype == p.dtype
        sd = opt.state_dict()  # raises on a stale key
        # A checkpoint round trip into a fresh optimizer (hyper-parameters come from the state dict).
        fresh = type(opt)([{"params": g["params"]} for g in opt.param_groups])
        fresh.load_state_dict(sd)
        assert len(fresh.state) == len(opt.state)


def check_grads(before: Snapshot, after: Snapshot, maps: Maps) -> None:
    assert set(after.grads) == set(before.grads), "gradients appeared or vanished"
    for name, old in before.grads.items():
        if name not in maps:
            np.testing.assert_array_equal(after.grads[name], old, err_msg=f"grad of untouched {name} changed")
            continue
        expected = expected_entry("__grad__", old, maps[name])
        np.testing.assert_allclose(after.grads[name], expected, rtol=0,
                                   atol=_ROT_RTOL * max(np.abs(expected).max(), 1e-300), err_msg=f"{name}.grad")


def check_state(net: IsotropicMLP, opts: Sequence[Optimizer], before: Snapshot, maps: Maps,
                centered: bool) -> None:
    after = snapshot(net, opts)
    check_grads(before, after, maps)
    assert set(after.state) == set(before.state), "a parameter gained or lost its optimizer state"
    for name, st_old in before.state.items():
        st_new = after.state[name]
        assert set(st_new) == set(st_old), f"{name}: state keys changed"
        expected_shape = before.params[name].shape
        for axis, m in maps.get(name, []):
            expected_shape = expected_shape[:axis] + (m.shape[1],) + expected_shape[axis + 1 :]
        assert after.params[name].shape == expected_shape, name
        for key, old in st_old.items():
            new = st_new[key]
            if not isinstance(old, np.ndarray):
                assert new == old, f"{name}.{key}: scalar state changed ({old} -> {new})"
                continue
            if name not in maps:
                np.testing.assert_array_equal(new, old, err_msg=f"{name}.{key} of an untouched parameter changed")
                continue
            expected = expected_entry(key, old, maps[name])
            exact = all(is_zero_one(m) for _, m in maps[name])
            if centered and key == "square_avg":
                grad_avg = expected_entry("grad_avg", st_old["grad_avg"], maps[name])  # type: ignore[arg-type]
                if len(maps[name]) == 1:
                    # one remap, then the documented fixup square_avg = max(square_avg, grad_avg^2)
                    expected = np.maximum(expected, grad_avg * grad_avg)
                else:
                    # two remaps with a fixup after each: bounded below by both rules
                    tol = _ROT_RTOL * np.abs(expected).max()
                    assert np.all(new >= expected - tol), f"{name}.square_avg below the squared rule"
                    assert np.all(new >= grad_avg * grad_avg - tol), f"{name}.square_avg < grad_avg**2"
                    continue
            if exact:
                np.testing.assert_array_equal(new, expected, err_msg=f"{name}.{key}")
            else:
                np.testing.assert_allclose(new, expected, rtol=0, atol=_ROT_RTOL * max(np.abs(expected).max(), 1e-300),
                                           err_msg=f"{name}.{key}")


def check_training_continues(net: IsotropicMLP, opts: Sequence[Optimizer], centered: bool, steps: int = 3) -> None:
    losses = train(net, opts, steps, seed=500)
    assert all(math.isfinite(v) for v in losses), losses
    for p in net.parameters():
        assert bool(torch.isfinite(p).all())
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    assert bool(torch.isfinite(v).all())
            if centered:
                assert bool((st["square_avg"] >= st["grad_avg"] ** 2).all())


def prepare(sizes: Sequence[int], opt_key: str) -> Tuple[IsotropicMLP, Optimizer]:
    net = make_net(sizes)
    opt = make_opt(opt_key, net.parameters())
    train(net, [opt], 3)
    # Leave gradients in place (the library must transform them too) by a last backward without step.
    opt.zero_grad()
    loss_of(net, 99).backward()
    return net, opt


# ---------------------------------------------------------------------------- the main matrix
@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
@pytest.mark.parametrize("opt_key", list(OPTIMIZERS))
def test_state_follows_operation(opt_key: str, op: Op) -> None:
    net, opt = prepare(op.sizes, opt_key)
    centered = bool(opt.defaults.get("centered", False))
    before = snapshot(net, [opt])
    assert before.state, "the optimizer should have state before the operation"
    # An autograd graph that refers to the old parameters and outlives the operation (Lightning keeps
    # the last loss): the backward passes below must still work (DESIGN.md pitfalls).
    lingering = loss_of(net, 7)
    op.run(net, opt)
    check_structure(net, [opt], before)
    check_state(net, [opt], before, op.maps(before.params, snapshot(net, [opt]).params), centered)
    # The operation ran between backward() and step() (as in Lightning's on_after_backward): the step
    # uses the remapped gradients.
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    check_training_continues(net, [opt], centered)
    assert lingering.grad_fn is not None  # still alive here


@pytest.mark.parametrize("op", [o for o in OPS if o.rotation], ids=[o.name for o in OPS if o.rotation])
def test_centered_rmsprop_invariant_after_rotation(op: Op) -> None:
    """The squared rule alone can give square_avg < grad_avg**2 and NaN (DESIGN.md pitfalls)."""
    net = make_net(op.sizes)
    # A short average (alpha=0.1) keeps square_avg close to grad_avg**2, where the bare squared rule
    # breaks the invariant; the default alpha=0.99 after 3 steps leaves a wide margin.
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.1, centered=True, momentum=0.9)
    train(net, [opt], 3)
    before = snapshot(net, [opt])
    op.run(net, opt)
    maps = op.maps(before.params, snapshot(net, [opt]).params)
    violated = 0
    for st in opt.state.values():
        assert bool((st["square_avg"] >= st["grad_avg"] ** 2).all())
    # The invariant is not vacuous: the bare squared rule does violate it for at least one entry.
    for name, st in before.state.items():
        if name in maps:
            sq = expected_entry("square_avg", st["square_avg"], maps[name])  # type: ignore[arg-type]
            ga = expected_entry("grad_avg", st["grad_avg"], maps[name])  # type: ignore[arg-type]
            violated += int(np.sum(sq < ga * ga))
    assert violated > 0, "test setup does not exercise the fixup (no entry would violate the invariant)"
    losses = train(net, [opt], 10, seed=900)
    assert all(math.isfinite(v) for v in losses)


def test_rotation_changes_second_moments_by_squared_rule_not_identity() -> None:
    """Guards the reference: a rotation must move exp_avg_sq, so a no-op remap cannot pass."""
    net, opt = prepare(SIZES, "adam")
    before = snapshot(net, [opt])
    net.diagonalise(0, "left", optimizer=opt)
    new = opt.state[net.layers[0].weight]["exp_avg_sq"].numpy()
    old = before.state["layers.0.weight"]["exp_avg_sq"]
    assert np.abs(new - old).max() > 1e-3 * np.abs(old).max()


# ---------------------------------------------------------------------------- LR schedulers
SCHEDULERS: Dict[str, Callable[[Optimizer], object]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=20),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
}

_SURGERY_AT = {
    2: lambda net, opt: net.grow(0, 3, optimizer=opt),
    4: lambda net, opt: net.shrink(1, 2, optimizer=opt),
    6: lambda net, opt: net.diagonalise(0, "left", optimizer=opt),
    8: lambda net, opt: net.diagonalise(1, "full", optimizer=opt),
    10: lambda net, opt: net.add_outputs(1, optimizer=opt),
    12: lambda net, opt: net.shrink(0, 4, optimizer=opt),
}


def _run_schedule(name: str, surgery: bool, steps: int = 16) -> List[List[float]]:
    net = make_net(SIZES)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = SCHEDULERS[name](opt)
    lrs = []
    for i in range(steps):
        if surgery and i in _SURGERY_AT:
            _SURGERY_AT[i](net, opt)
            assert sched.optimizer is opt  # type: ignore[attr-defined]
        opt.zero_grad()
        loss = loss_of(net, i)
        loss.backward()
        opt.step()
        if name == "ReduceLROnPlateau":
            sched.step(1.0)  # type: ignore[attr-defined]  # a fixed metric: identical in both runs
        else:
            sched.step()  # type: ignore[attr-defined]
        lrs.append([g["lr"] for g in opt.param_groups])
        assert math.isfinite(float(loss.detach()))
    sched.state_dict()  # type: ignore[attr-defined]
    opt.state_dict()
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_unaffected(name: str) -> None:
    with_surgery = _run_schedule(name, surgery=True)
    without = _run_schedule(name, surgery=False)
    assert with_surgery == without
    assert len({tuple(v) for v in without}) > 1, "the schedule should change the learning rate"


# ---------------------------------------------------------------------------- several optimizers, custom ones
def test_several_optimizers_each_remapped() -> None:
    net = make_net(SIZES)
    first = torch.optim.SGD(net.layers[0].parameters(), lr=0.05, momentum=0.9)
    rest = [p for n, p in net.named_parameters() if not n.startswith("layers.0.")]
    second = torch.optim.Adam(rest, lr=1e-2)
    opts = [first, second]
    train(net, opts, 3)
    for op in (_grow(0, 2), _diag_left(0), _shrink(0, 2)):
        before = snapshot(net, opts)
        op.run(net, opts)
        check_structure(net, opts, before)
        # maps for the *current* sizes: rebuild the op's reference from the snapshots
        check_state(net, opts, before, op.maps(before.params, snapshot(net, opts).params), centered=False)
        assert set(first.state) == set(net.layers[0].parameters())
        assert net.layers[1].weight in second.state
        check_training_continues(net, opts, centered=False, steps=2)


def test_optimizer_missing_a_parameter_is_refused_before_any_change() -> None:
    net = make_net(SIZES)
    partial = torch.optim.Adam([p for n, p in net.named_parameters() if not n.startswith("layers.0.")], lr=1e-2)
    train(net, [partial], 2)
    before = snapshot(net, [partial])
    with pytest.raises(ValueError, match="to hold parameter"):
        net.grow(0, 1, optimizer=partial)
    after = snapshot(net, [partial])
    for name, value in before.params.items():
        np.testing.assert_array_equal(after.params[name], value)


class _Velocity(Optimizer):
    """A toy optimizer with one state entry of each kind, none of them known to iso_lightning."""

    def __init__(self, params, lr: float = 0.01, init: float = 0.25) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, dict(lr=lr, init=init))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["velocity"] = torch.zeros_like(p)
                    st["energy"] = torch.full_like(p, group["init"])
                    st["peak"] = torch.zeros_like(p)
                    st["count"] = 0
                st["count"] += 1
                st["velocity"].mul_(0.9).add_(p.grad)
                st["energy"].mul_(0.9).addcmul_(p.grad, p.grad, value=0.1)
                torch.maximum(st["peak"] * 0.99, p.grad.abs(), out=st["peak"])
                p.add_(st["velocity"] / (st["energy"].sqrt() + 1e-8), alpha=-group["lr"])
        return None


@pytest.fixture
def private_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone afterwards."""
    monkeypatch.setattr(optim_module, "_RULES", dict(optim_module._RULES))


def test_custom_rule_registered(private_rules: None, monkeypatch: pytest.MonkeyPatch) -> None:
    rule = OptimizerRule(linear=("velocity",), quadratic=("energy",), rms=("peak",),
                         fill={"energy": lambda group: float(group["init"])})  # type: ignore[arg-type,dict-item]
    register_optimizer_rule(_Velocity, rule)
    monkeypatch.setitem(KEY_KINDS, "velocity", "linear")
    monkeypatch.setitem(KEY_KINDS, "energy", "quadratic")
    monkeypatch.setitem(KEY_KINDS, "peak", "rms")
    net = make_net(SIZES)
    opt = _Velocity(net.parameters(), lr=0.01, init=ADAGRAD_INIT)  # new `energy` entries must be 0.1
    train(net, [opt], 3)
    for op in (_diag_left(1), _shrink(1, 1)):
        before = snapshot(net, [opt])
        op.run(net, opt)
        check_structure(net, [opt], before)
        check_state(net, [opt], before, op.maps(before.params, snapshot(net, [opt]).params), centered=False)
    # growth: `energy` fill comes from the group's `init`; compare with _fill("sum") == ADAGRAD_INIT
    monkeypatch.setitem(KEY_KINDS, "sum", "quadratic")
    before = snapshot(net, [opt])
    net.grow(0, 2, optimizer=opt)
    energy = opt.state[net.layers[0].weight]["energy"]
    assert torch.equal(energy[-2:], torch.full_like(energy[-2:], ADAGRAD_INIT))
    np.testing.assert_array_equal(energy[:-2].numpy(), before.state["layers.0.weight"]["energy"])
    velocity = opt.state[net.layers[1].weight]["velocity"]
    assert torch.equal(velocity[:, -2:], torch.zeros_like(velocity[:, -2:]))
    assert opt.state[net.layers[0].weight]["count"] == 3
    check_training_continues(net, [opt], centered=False)


def test_unregistered_optimizer_refused_or_reset() -> None:
    net = make_net(SIZES)
    opt = _Velocity(net.parameters())
    train(net, [opt], 2)
    before = snapshot(net, [opt])
    with pytest.raises(UnsupportedOptimizerError, match="register_optimizer_rule"):
        net.grow(0, 1, optimizer=opt)
    after = snapshot(net, [opt])
    assert after.params.keys() == before.params.keys()
    for name in before.params:
        np.testing.assert_array_equal(after.params[name], before.params[name])
        for key, value in before.state[name].items():
            np.testing.assert_array_equal(after.state[name][key], value)  # type: ignore[arg-type]
    # on_unknown="reset" drops the state of the touched parameters only
    net.grow(0, 1, optimizer=opt, on_unknown="reset")
    touched = {net.layers[0].weight, net.layers[0].bias, net.layers[1].weight}
    assert touched.isdisjoint(opt.state)
    assert net.layers[2].weight in opt.state and net.layers[1].bias in opt.state
    check_structure(net, [opt], before)
    check_training_continues(net, [opt], centered=False)


def test_adam_subclass_inherits_rule() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    assert optim_module.rule_for(MyAdam([torch.nn.Parameter(torch.zeros(1))])) is \
        optim_module.rule_for(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]))
    net = make_net(SIZES)
    opt = MyAdam(net.parameters(), lr=1e-2, amsgrad=True)
    train(net, [opt], 3)
    for op in (_diag_left(1), _diag_full(1), _shrink(0, 2), _grow(1, 2)):
        before = snapshot(net, [opt])
        op.run(net, opt)
        check_structure(net, [opt], before)
        check_state(net, [opt], before, op.maps(before.params, snapshot(net, [opt]).params), centered=False)
    check_training_continues(net, [opt], centered=False)


def test_subclass_rule_overrides_parent(private_rules: None) -> None:
    class MySGD(torch.optim.SGD):
        pass

    rule = OptimizerRule(linear=("momentum_buffer",))
    register_optimizer_rule(MySGD, rule)
    assert optim_module.rule_for(MySGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is rule
    assert optim_module.rule_for(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is not rule


def test_uncovered_state_key_refused_before_any_change() -> None:
    class AdamWithExtra(torch.optim.Adam):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            out = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["extra"] = torch.zeros_like(p)
            return out

    net = make_net(SIZES)
    opt = AdamWithExtra(net.parameters(), lr=1e-2)
    train(net, [opt], 2)
    before = snapshot(net, [opt])
    with pytest.raises(UnsupportedOptimizerError):
        net.grow(0, 2, optimizer=opt)
    after = snapshot(net, [opt])
    for name, st in before.state.items():
        for key, value in st.items():
            np.testing.assert_array_equal(after.state[name][key], value)  # type: ignore[arg-type]


def test_adagrad_fill_comes_from_the_owning_param_group() -> None:
    net = make_net(SIZES)
    first = [p for n, p in net.named_parameters() if n.startswith("layers.0.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("layers.0.")]
    opt = torch.optim.Adagrad([{"params": first, "initial_accumulator_value": 0.1},
                               {"params": rest, "initial_accumulator_value": 0.5}], lr=0.05)
    train(net, [opt], 2)
    before = snapshot(net, [opt])
    net.grow(0, 2, optimizer=opt)
    check_structure(net, [opt], before)
    w0, b0, w1 = (opt.state[p]["sum"] for p in (net.layers[0].weight, net.layers[0].bias, net.layers[1].weight))
    assert torch.equal(w0[-2:], torch.full_like(w0[-2:], 0.1)) and torch.equal(b0[-2:], torch.full_like(b0[-2:], 0.1))
    assert torch.equal(w1[:, -2:], torch.full_like(w1[:, -2:], 0.5))
    np.testing.assert_array_equal(w1[:, :-2].numpy(), before.state["layers.1.weight"]["sum"])
    check_training_continues(net, [opt], centered=False)


def test_lightning_optimizer_wrappers_accepted() -> None:
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    net = make_net(SIZES)
    first = torch.optim.SGD(net.layers[0].parameters(), lr=0.05, momentum=0.9)
    second = torch.optim.Adam([p for n, p in net.named_parameters() if not n.startswith("layers.0.")], lr=1e-2)
    train(net, [first, second], 2)
    wrapped = [core.LightningOptimizer(first), core.LightningOptimizer(second)]  # what `self.optimizers()` returns
    before = snapshot(net, [first, second])
    op = _diag_left(0)
    op.run(net, wrapped)
    check_structure(net, [first, second], before)
    check_state(net, [first, second], before, op.maps(before.params, snapshot(net, [first, second]).params),
                centered=False)
    single = make_net(SIZES)
    opt = torch.optim.Adam(single.parameters(), lr=1e-2)
    train(single, [opt], 2)
    single.grow(1, 2, optimizer=core.LightningOptimizer(opt))
    assert opt.state[single.layers[1].weight]["exp_avg"].shape == (9, 9)


def test_reset_works_for_optimizer_with_factored_state() -> None:
    net = make_net(SIZES)
    opt = torch.optim.Adafactor(net.parameters(), lr=1e-2)
    train(net, [opt], 2)
    net.grow(0, 1, optimizer=opt, on_unknown="reset")
    assert net.layers[0].weight not in opt.state and net.layers[2].weight in opt.state
    check_training_continues(net, [opt], centered=False)


@pytest.mark.parametrize("opt_key", ["adam", "rmsprop_centered_momentum", "adamax"])
def test_float32_state_keeps_dtype_and_rules(monkeypatch: pytest.MonkeyPatch, opt_key: str) -> None:
    # float32 parameters carry ~1e-7 relative round-off into the recovered rotation and the state, so the
    # reference is relaxed to 1e-4 relative (a wrong rule is still off by O(1)).
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "_ROT_RTOL", 1e-4)
    monkeypatch.setattr(module, "_RECOVER_ATOL", 1e-5)
    net = make_net(SIZES).float()
    opt = make_opt(opt_key, net.parameters())
    centered = opt_key.startswith("rmsprop")
    train_float = [torch.randn(16, 6), torch.randn(16, 3)]
    for _ in range(3):
        opt.zero_grad()
        (net(train_float[0]) - train_float[1]).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    for op in (_diag_left(1), _shrink(1, 2), _grow(0, 2), _diag_full(1)):
        before = snapshot(net, [opt])
        op.run(net, opt)
        check_structure(net, [opt], before)
        check_state(net, [opt], before, op.maps(before.params, snapshot(net, [opt]).params), centered)
        for p in net.parameters():
            assert p.dtype == torch.float32
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(3):
        opt.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


# ---------------------------------------------------------------------------- argument validation
def test_register_rejects_non_optimizer() -> None:
    with pytest.raises(TypeError, match="`optimizer_cls`"):
        register_optimizer_rule(dict, OptimizerRule())  # type: ignore[arg-type]


def test_remapper_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`on_unknown`"):
        StateRemapper(None, on_unknown="ignore")
    with pytest.raises(TypeError, match="`optimizer`"):
        StateRemapper("adam")  # type: ignore[arg-type]


def test_state_of_wrong_shape_is_refused() -> None:
    net = make_net(SIZES)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, [opt], 1)
    opt.state[net.layers[0].weight]["exp_avg"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not match the model"):
        net.grow(0, 1, optimizer=opt)
    assert net.layers[0].weight.shape == (9, 6)


# ---------------------------------------------------------------------------- a real task
_FM_SIZE = 14


def _fashion_lr(key: str) -> Dict[str, object]:
    lrs = {"sgd_momentum": 0.2, "sgd_nesterov": 0.2, "adam": 1e-2, "adamw": 1e-2, "adamw_amsgrad": 1e-2,
           "nadam": 1e-2, "radam": 3e-2, "adamax": 3e-2, "rmsprop_centered_momentum": 1e-3, "adagrad": 0.3}
    return dict(OPTIMIZERS[key][1], lr=lrs[key])


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}")
@pytest.mark.parametrize("opt_key", list(OPTIMIZERS))
def test_fashion_mnist_loss_falls_with_surgery(opt_key: str) -> None:
    x, y = load_fashion_mnist(2000, _FM_SIZE)
    g = torch.Generator().manual_seed(1)
    net = IsotropicMLP([_FM_SIZE * _FM_SIZE, 24, 16, 10], psi="trainable", length="trainable", generator=g)
    cls = OPTIMIZERS[opt_key][0]
    opt = cls(net.parameters(), **_fashion_lr(opt_key))
    order = torch.randperm(len(x), generator=g)
    losses, widths = [], set()
    batch_size, steps = 100, 80
    for i in range(steps):
        if i and i % 10 == 5:
            net.grow(1, 3, optimizer=opt, generator=g)
            net.grow(0, 4, optimizer=opt, generator=g)
        if i and i % 10 == 0:
            net.shrink(1, 2, optimizer=opt)  # last hidden layer first (surgery.py order rule)
            net.shrink(0, 3, optimizer=opt)
        widths.add(tuple(net.hidden_widths))
        idx = order[(i * batch_size) % len(x):][:batch_size]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert len(widths) > 5, "the topology should have changed several times"
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # ln(10) = 2.30 at chance; a working optimizer gets well below 0.75x of its start in 8 epochs of 2k images
    assert last < 0.75 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def _trained_mlp_and_adam(seed: int = 0):
    torch.manual_seed(seed)
    net = IsotropicMLP([40, 12, 4], psi="decay", length="trainable")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(16, 40)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    return net, opt


def _adam_state(net, opt):
    return {name: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
            for name, p in net.named_parameters()}


@pytest.mark.parametrize("grow_first", [False, True])
def test_tensors_too_large_to_copy_rotate_every_state_in_place_like_a_staged_copy(monkeypatch, grow_first):
    # The staged route (a new tensor per change) is the reference; the in-place route (layers past
    # IN_PLACE_ELEMENTS) must give the same weights and optimizer state without a second copy.
    from iso_lightning import transaction

    results = []
    for limit in (None, 100):
        monkeypatch.setattr(transaction, "IN_PLACE_ELEMENTS", limit)
        net, opt = _trained_mlp_and_adam()
        if grow_first:  # then a step, so that the new rows are not zero (their removal needs no rotation)
            net.grow(0, 2, optimizer=opt)
            opt.zero_grad()
            net(torch.randn(16, 40, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
            opt.step()
        layer = net.layers[0]
        storages = {k: v.untyped_storage().data_ptr() for k, v in opt.state[layer.weight].items() if v.dim()}
        net.shrink(0, 1, optimizer=opt)
        if limit is not None:  # every moment of the wide weight was rotated in its own storage
            assert {k: v.untyped_storage().data_ptr() for k, v in opt.state[layer.weight].items() if v.dim()} \
                == storages
        results.append((dict(net.state_dict()), _adam_state(net, opt)))
    (ref_w, ref_s), (w, s) = results
    for key in ref_w:
        torch.testing.assert_close(w[key], ref_w[key], rtol=1e-5, atol=1e-6)
    for name in ref_s:
        for key in ref_s[name]:
            torch.testing.assert_close(s[name][key], ref_s[name][key], rtol=1e-5, atol=1e-9)
    assert all((v["exp_avg_sq"] >= 0).all() for v in s.values())


def test_an_in_place_rotation_undone_restores_weights_and_gives_valid_second_moments(monkeypatch):
    from iso_lightning import transaction

    monkeypatch.setattr(transaction, "IN_PLACE_ELEMENTS", 100)
    net, opt = _trained_mlp_and_adam()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    before = _adam_state(net, opt)
    with pytest.raises(RuntimeError, match="late"):
        with transaction.atomic():
            net.shrink(0, 1, optimizer=opt)
            raise RuntimeError("refused late")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6)  # the inverse rotation
    after = _adam_state(net, opt)
    for name in before:
        m = before[name]["exp_avg"]
        torch.testing.assert_close(after[name]["exp_avg"], m, rtol=1e-5, atol=1e-5 * float(m.abs().max()))
        sq, old = after[name]["exp_avg_sq"], before[name]["exp_avg_sq"]
        assert sq.shape == old.shape and bool(torch.isfinite(sq).all()) and bool((sq >= 0).all())
        # (M^T o M^T)^T (M o M)^T v: a weighted average of v's entries along the neuron axis.
        assert float(sq.sum()) == pytest.approx(float(old.sum()), rel=1e-4)
        assert float(sq.max()) <= float(old.max()) * (1 + 1e-5)


def _resident(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident set from /proc")
def test_a_grow_holds_one_new_tensor_at_a_time():
    # Weight, gradient and both AdamW moments of a 1024 x 8192 layer (32 MiB each, allocated and
    # freed as whole mappings): each is swapped in before the next is made, so the peak above the
    # starting resident set is one new copy of one of them, not two or four.
    torch.manual_seed(0)
    net = IsotropicMLP([8192, 1024, 4])
    opt = torch.optim.AdamW(net.parameters())
    x = torch.randn(2, 8192)
    net(x).sum().backward()
    opt.step()
    del x
    gc.collect()
    tensor_bytes = net.layers[0].weight.numel() * 4
    base = _resident("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak resident set (VmHWM) starts again from the current one
    net.grow(0, 1, optimizer=opt)
    extra = _resident("VmHWM") - base
    assert net.layers[0].weight.shape == (1025, 8192)
    assert extra < 1.5 * tensor_bytes, f"a grow held {extra / tensor_bytes:.2f} new tensors at once"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_a_grow_keeps_no_copy_of_the_old_tensors_and_still_undoes_bit_for_bit(optimizer):
    # An extension's result holds the old values as its leading rows: the undo restores from views
    # of it, so the old gradients and optimizer state are freed at once (a grow of a wide layer
    # needs one new copy of each tensor, not two); a rollback still gives every bit back.
    from _helpers import assert_unchanged, snapshot

    from iso_lightning import transaction

    torch.manual_seed(0)
    net = IsotropicMLP([40, 12, 4], psi="decay", length="trainable")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2) if optimizer == "adamw" else \
        torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(16, 40)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    net(x).pow(2).sum().backward()  # gradients present during the grow
    weight = net.layers[0].weight
    before = snapshot(net, opt)
    grad = weight.grad
    tensors = [weight, grad] + [v for v in opt.state[weight].values() if v.dim()]
    old = [weakref.ref(t.untyped_storage()) for t in tensors]
    del tensors
    with pytest.raises(RuntimeError, match="late"):
        with transaction.atomic():
            net.grow(0, 2, optimizer=opt)
            gc.collect()
            assert all(ref() is None for ref in old), "the undo must not keep the old tensors alive"
            raise RuntimeError("refused late")
    assert_unchanged(before, net, opt)
    assert weight.shape == (12, 40) and weight.grad.shape == (12, 40)
    assert weight.grad is grad, "the gradient keeps its object"
