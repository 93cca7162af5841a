"""All-or-nothing changes to a model and its optimizer: an undo log.

Every neuron operation runs inside :func:`atomic`. It checks its arguments first; then each change
to a tensor, a gradient, an optimizer state entry or an attribute goes through the
:class:`Transaction`, which remembers how to undo it. If anything raises before the outermost
:func:`atomic` block ends (a refused argument found late, an out-of-memory error, a bug, a
``KeyboardInterrupt``), every change is undone in reverse order and the exception propagates:
parameters keep their values, shapes, object identity, ``requires_grad`` and gradients, and the
optimizer its state, bit for bit.

Undoing is cheap because operations do not overwrite tensors: each new value is a new tensor
that is swapped in with ``Tensor.set_`` (which keeps the ``Parameter`` and gradient objects), so the undo only
swaps the old storage back. An extension (a grow) does not even keep the old storage: its result
holds the old values as its leading entries, and where those are laid out as the old tensor was
(the rows of a weight, a bias, their gradients and optimizer state) the undo restores a view of
them, so that the old tensor is freed as soon as the new one is swapped in: operations swap one
tensor at a time, so a grow holds one new copy of one tensor beyond the model at any moment.
Tensors are overwritten in one case only: a rotation of a tensor of more than
:data:`IN_PLACE_ELEMENTS` elements (a layer with 150,000 inputs), which is applied in place so that
no second copy of it is ever allocated (its gradient and optimizer state likewise); its undo applies
the inverse rotation, which restores it to float round-off rather than bit for bit (a second moment,
whose squared-entry rotation has no inverse, comes back as a valid non-negative estimate near the
old one). Operations run those rotations after everything that can be refused has been checked, so
only an exception from outside (out of memory, an interrupt) can need that undo.

Nested :func:`atomic` blocks join the outermost one, so a multi-space change (``set_widths``, a
checkpoint's resize) is undone as a whole.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, MutableMapping, Optional

import torch
from torch import Tensor

__all__ = ["IN_PLACE_ELEMENTS", "Transaction", "atomic", "current"]

#: Tensors with more elements than this are rotated in place (see the module docstring); ``None``
#: stages every tensor, at the price of a second copy of the widest weight during an operation.
IN_PLACE_ELEMENTS: Optional[int] = 1 << 26

_MISSING = object()
_local = threading.local()


class Transaction:
    """An undo log of the changes made to tensors, optimizer state and attributes."""

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def replace(self, tensor: Tensor, new: Tensor, restore: Optional[Tensor] = None) -> None:
        """Give ``tensor`` the storage, shape and values of ``new``, keeping the tensor object.

        ``restore``: a tensor with ``tensor``'s present shape, strides and values, not sharing its
        storage (a view of the leading entries of an extension's result), for the undo to set
        instead; the present storage is then not kept, and is freed as soon as nothing else holds it.
        """
        old = tensor.detach() if restore is None else restore  # else an alias of the current storage
        with torch.no_grad():
            tensor.set_(new)  # type: ignore[call-overload]

        def undo() -> None:
            with torch.no_grad():
                tensor.set_(old)  # type: ignore[call-overload]

        self._undo.append(undo)

    def set_grad(self, param: Tensor, grad: Optional[Tensor]) -> None:
        """``param.grad = grad`` (a new gradient of the same shape, or ``None``)."""
        old = param.grad
        param.grad = grad

        def undo() -> None:
            param.grad = old

        self._undo.append(undo)

    def set_item(self, mapping: MutableMapping[Any, Any], key: Any, value: Any, restore: Any = None) -> None:
        """``mapping[key] = value``; ``restore``: what the undo puts back instead of the old value
        (see :meth:`replace`)."""
        old = restore if restore is not None else mapping[key] if key in mapping else _MISSING
        mapping[key] = value
        self._undo.append(lambda: _restore_item(mapping, key, old))

    def delete_item(self, mapping: MutableMapping[Any, Any], key: Any) -> None:
        if key not in mapping:
            return
        old = mapping.pop(key)
        self._undo.append(lambda: _restore_item(mapping, key, old))

    def clear(self, mapping: MutableMapping[Any, Any]) -> None:
        old = list(mapping.items())
        mapping.clear()

        def undo() -> None:
            mapping.clear()
            mapping.update(old)

        self._undo.append(undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def on_rollback(self, undo: Callable[[], Any]) -> None:
        """Register an undo of a change made outside the methods above (an in-place rotation)."""
        self._undo.append(undo)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __len__(self) -> int:
        return len(self._undo)


def _restore_item(mapping: MutableMapping[Any, Any], key: Any, old: Any) -> None:
    if old is _MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = old


def current() -> Optional[Transaction]:
    """The transaction of the enclosing :func:`atomic` block, if any."""
    return getattr(_local, "transaction", None)


@contextmanager
def atomic() -> Iterator[Transaction]:
    """Run a block of changes all-or-nothing (nested blocks join the outermost).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> try:
        ...     with atomic() as tx:
        ...         tx.replace(p, torch.zeros(5))
        ...         raise RuntimeError("refused late")
        ... except RuntimeError:
        ...     pass
        >>> p.tolist()
        [1.0, 1.0]
    """
    outer = current()
    if outer is not None:
        yield outer
        return
    tx = Transaction()
    _local.transaction = tx
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise
    finally:
        _local.transaction = None
