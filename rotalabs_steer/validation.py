"""Argument checks shared by the public entry points: each error names the argument."""

from __future__ import annotations

import math
import operator
from typing import Any


def as_int(value: Any, name: str) -> int:
    """``value`` as an int (anything with ``__index__`` but bool), or a TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def int_at_least(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a TypeError / ValueError naming ``name``."""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    try:
        value = as_int(value, name)
    except TypeError:
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be {kind}, got {value}")
    return value


def layer_in_range(value: Any, num_layers: int, name: str) -> int:
    """A layer index (Python-style negatives allowed) as a non-negative int, or an IndexError."""
    index = as_int(value, name)
    if not -num_layers <= index < num_layers:
        raise IndexError(f"{name}: layer {index} is out of range for a model with {num_layers} blocks "
                         f"(expected a layer in [{-num_layers}, {num_layers - 1}])")
    return index % num_layers


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_strength(value: Any, name: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)
