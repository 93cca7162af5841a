"""Errors raised by neuron operations."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A tensor of a neuron space (a weight, its gradient or its optimizer state) holds NaN or Inf,
    or a decomposition of it is not finite; nothing is computed from it and nothing changes."""
