"""``nn.Module`` forms of the isotropic activations, with the intrinsic length ``o`` as state."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from iso_lightning.functional import PROFILES, capped_abs, isotropic_with_scale

__all__ = ["LENGTH_MODES", "IsotropicActivation"]

#: Modes of the intrinsic length ``o``.
LENGTH_MODES = ("none", "constant", "trainable")

_DEFAULT_LENGTH = {"constant": 1.0, "trainable": 1e-6}


def _partition(width: int, group_size: Optional[int], partition: Optional[Sequence[int]]) -> Optional[Tensor]:
    if group_size is not None and partition is not None:
        raise ValueError("Expected at most one of `group_size` and `partition`, but got both.")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"Expected argument `group_size` to be a positive int, but got {group_size!r}.")
        return torch.arange(width) // group_size
    if partition is not None:
        values = list(partition)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"Expected argument `partition` to hold ints (group numbers), but got {values!r}.")
        index = torch.as_tensor(values, dtype=torch.long)
        used = set(index.tolist())
        if index.numel() != width or (used and (min(used) < 0 or used != set(range(max(used) + 1)))):
            raise ValueError(
                f"Expected argument `partition` to give a group 0..m-1 for each of the {width} channels, "
                f"using every group, but got {list(partition)!r}."
            )
        return index
    return None


class IsotropicActivation(nn.Module):
    r"""Isotropic activation :math:`f(z)_G = s(\sqrt{\lVert z_G\rVert^2 + o_G})\, z_G` over channel groups.

    Args:
        width: number of channels (needed for groups; ``None`` for a single group).
        profile: radial profile, one of :data:`~iso_lightning.functional.PROFILES`.
        length: intrinsic length mode: ``"none"`` (``o = 0``), ``"constant"`` (a buffer, changed only
            by neuron surgery) or ``"trainable"`` (a parameter).
        length_init: initial ``o`` (default 1.0 for ``"constant"``, 1e-6 for ``"trainable"``).
        max_length: upper bound of the effective ``o``. A trainable length is used as ``|o|`` clamped to
            this value, so it stays non-negative and cannot run away and switch the layer off.
        dim: channel axis (``-1`` or ``1`` for dense inputs, ``1`` for images).
        group_size: split the channels into consecutive groups of this size (last group may be smaller).
        partition: explicit group of each channel (any order), instead of ``group_size``.

    Example:
        >>> import torch
        >>> act = IsotropicActivation(profile="tanh", length="trainable")
        >>> act(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    length: Optional[Tensor]
    group_index: Optional[Tensor]

    def __init__(
        self,
        width: Optional[int] = None,
        profile: str = "tanh",
        length: str = "none",
        length_init: Optional[float] = None,
        max_length: float = 100.0,
        dim: int = -1,
        group_size: Optional[int] = None,
        partition: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if profile not in PROFILES:
            raise ValueError(f"Expected argument `profile` to be one of {sorted(PROFILES)}, but got {profile!r}.")
        if length not in LENGTH_MODES:
            raise ValueError(f"Expected argument `length` to be one of {list(LENGTH_MODES)}, but got {length!r}.")
        if not (isinstance(max_length, (int, float)) and max_length > 0):
            raise ValueError(f"Expected argument `max_length` to be a positive number, but got {max_length!r}.")
        if (group_size is not None or partition is not None) and width is None:
            raise ValueError("Expected argument `width` when `group_size` or `partition` is given, but got None.")
        self.profile = profile
        self.length_mode = length
        self.max_length = float(max_length)
        self.dim = dim
        index = _partition(int(width or 0), group_size, partition)
        self.register_buffer("group_index", index)
        groups = 1 if index is None else int(index.max()) + 1 if index.numel() else 1
        if length == "none":
            self.register_parameter("length", None)
            self.length_init = 0.0
        else:
            init = _DEFAULT_LENGTH[length] if length_init is None else float(length_init)
            if not (init >= 0):
                raise ValueError(f"Expected argument `length_init` to be >= 0, but got {length_init!r}.")
            if init > self.max_length:
                raise ValueError(f"Expected argument `length_init` <= `max_length` ({max_length}), but got {init}.")
            self.length_init = init
            value = torch.full((groups,), init)
            if length == "trainable":
                self.length = nn.Parameter(value)
            else:
                self.register_buffer("length", value)

    @property
    def groups(self) -> int:
        """Number of channel groups."""
        if self.group_index is None:
            return 1
        return int(self.group_index.max()) + 1 if self.group_index.numel() else 0

    def effective_length(self) -> Optional[Tensor]:
        """The ``o`` used in the forward pass (non-negative, at most ``max_length``), or ``None``."""
        if self.length is None:
            return None
        if self.length_mode == "trainable":
            # |o| capped at max_length, with a gradient at both ends (abs and clamp would pass none
            # at o = 0 and o = max_length, and a length started there would never train).
            return capped_abs(self.length, self.max_length)
        return self.length

    def forward_with_scale(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """``(f(z), s)`` with ``s`` the per-group scale (channel axis of size ``groups``)."""
        if self.length_mode == "trainable":
            return isotropic_with_scale(z, self.dim, self.profile, self.length, self.group_index, self.groups,
                                        length_cap=self.max_length)
        return isotropic_with_scale(z, self.dim, self.profile, self.length, self.group_index, self.groups)

    def forward(self, z: Tensor) -> Tensor:
        return self.forward_with_scale(z)[0]

    def extra_repr(self) -> str:
        parts = [f"profile={self.profile!r}", f"length={self.length_mode!r}"]
        if self.group_index is not None:
            parts.append(f"groups={self.groups}")
        return ", ".join(parts)


Number = Union[int, float]
