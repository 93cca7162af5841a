"""Finding the checkpoint to resume from after a crash."""

from __future__ import annotations

import glob
import os
from typing import List, Optional, Union

import torch

__all__ = ["latest_valid_checkpoint"]


def _loads(path: str) -> bool:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a file cut short by a crash fails to unpickle in many different ways
        return False
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict) \
        and "global_step" in checkpoint


def latest_valid_checkpoint(directory: Union[str, os.PathLike], pattern: str = "**/*.ckpt") -> Optional[str]:
    """The newest checkpoint under ``directory`` that loads completely, or ``None``.

    Lightning writes checkpoints through a temporary file, but a process killed at the wrong
    moment can still leave a partial or stray file behind; this tries the candidates from the
    newest (by modification time) and returns the first
    one that loads. Files that do not load are skipped, never deleted.

    Example:
        >>> latest_valid_checkpoint("/nonexistent") is None
        True
    """
    candidates: List[str] = [p for p in glob.glob(os.path.join(os.fspath(directory), pattern), recursive=True)
                             if os.path.isfile(p)]
    candidates.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in candidates:
        if _loads(path):
            return path
    return None
