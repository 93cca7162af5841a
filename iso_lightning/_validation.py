"""Argument checks shared by the modules: one error template, "Expected argument `x` to be ..., but got ..."."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["check_bool", "check_choice", "check_int"]


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """``value`` is an int (not a bool) >= ``minimum``, or ``None`` when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"Expected argument `{name}` to be {allowed}, but got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Expected argument `{name}` to be a bool, but got {value!r}.")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"Expected argument `{name}` to be one of {list(allowed)}, but got {value!r}.")
