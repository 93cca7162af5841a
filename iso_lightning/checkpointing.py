"""Finding the checkpoint to resume from after a crash.

A scan must never execute a file's contents: a checkpoint is a pickle, and unpickling one with
``torch.load(..., weights_only=False)`` runs whatever code it names. :func:`latest_valid_checkpoint`
therefore never unpickles with ``pickle``'s own class lookup. It checks a candidate's structure
only: the file must be a complete ``torch.save`` zip archive (every record present, every CRC
correct) whose ``data.pkl`` reads, with an inert unpickler, as a dict holding a ``state_dict``
mapping and a ``global_step``, and whose tensor records all exist. The inert unpickler imports
nothing and calls nothing: every class or function the pickle names (tensors, Lightning's
hyper-parameter dict, a user's own objects) becomes a placeholder, except plain containers.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import zipfile
from typing import Any, Dict, List, Optional, Set, Union

__all__ = ["latest_valid_checkpoint"]

# The only names the inert unpickler resolves to real objects: containers that run no user code.
_SAFE = {
    ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _Inert:
    """Stands for any object a checkpoint's pickle names: built from anything, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Dict(dict):
    """A dict that takes attributes (``OrderedDict`` state such as a state dict's ``_metadata``)."""


class _InertUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle without importing or calling anything it names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: Set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return {"OrderedDict": _Dict, "dict": _Dict, "list": list, "tuple": tuple, "set": set,
                    "frozenset": frozenset}[name]
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        # torch.save: ("storage", storage type, key, location, numel); the bytes are record data/<key>.
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            self.storages.add(str(pid[2]))
        return _Inert()


def _loads(path: str) -> bool:
    """``path`` is a complete checkpoint (see the module docstring); never runs its contents."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1 or archive.testzip() is not None:
                return False
            prefix = pickles[0][: -len("data.pkl")]
            unpickler = _InertUnpickler(archive.read(pickles[0]))
            checkpoint: Dict[Any, Any] = unpickler.load()
            records = set(names)
    except Exception:  # a file cut short by a crash fails to read in many different ways
        return False
    if any(f"{prefix}data/{key}" not in records for key in unpickler.storages):
        return False
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict) \
        and "global_step" in checkpoint


def latest_valid_checkpoint(directory: Union[str, os.PathLike], pattern: str = "**/*.ckpt") -> Optional[str]:
    """The newest checkpoint under ``directory`` that is complete, or ``None``.

    Lightning writes checkpoints through a temporary file, but a process killed at the wrong
    moment can still leave a partial or stray file behind; this tries the candidates from the
    newest (by modification time) and returns the first one that is a complete checkpoint. Files
    are only inspected, never executed (see the module docstring), and files that fail are skipped,
    never deleted.

    Example:
        >>> latest_valid_checkpoint("/nonexistent") is None
        True
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"Expected argument `directory` to be a path (str or os.PathLike), but got {directory!r}.")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"Expected argument `pattern` to be a non-empty glob pattern (str), but got {pattern!r}.")
    candidates: List[str] = [p for p in glob.glob(os.path.join(os.fspath(directory), pattern), recursive=True)
                             if os.path.isfile(p)]
    candidates.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in candidates:
        if _loads(path):
            return path
    return None
