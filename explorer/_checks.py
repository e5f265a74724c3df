"""Parameter checks shared by the estimators (umap-learn / hdbscan style ValueErrors)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def as_matrix(a: Any, name: str, dtype, *, cols: str = "D", nan_hint: str = "",
              empty_1d_ok: bool = True) -> np.ndarray:
    """``a`` as a finite 2-D ``dtype`` array of shape (N, cols).

    With ``empty_1d_ok`` an empty 1-D input is taken as shape (0, 0).

    Raises ``ValueError`` naming ``name`` for non-numeric input, the wrong number of
    dimensions, or rows with NaN/inf (``nan_hint`` is appended to that message).
    """
    try:
        a = np.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape (N, {cols}); {exc}") from exc
    if empty_1d_ok and a.ndim == 1 and a.size == 0:
        a = a.reshape(0, 0)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (N, {cols}); got shape {a.shape}")
    if a.size and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values{nan_hint}")
    return a


def check_int(name: str, value: Any, minimum: int, error: type[ValueError] = ValueError) -> int:
    """``value`` as an int >= ``minimum``; ``error`` (a ``ValueError``) naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_random_state(random_state: Any, *, allow_state: bool = False) -> Any:
    """``None`` or an int in [0, 2**32) (with ``allow_state``, also a
    ``numpy.random.RandomState``, returned as it is); ValueError naming the bad value
    otherwise."""
    if random_state is None:
        return None
    if allow_state and isinstance(random_state, np.random.RandomState):
        return random_state
    if (
        isinstance(random_state, bool)
        or not isinstance(random_state, numbers.Integral)
        or not 0 <= random_state < 2**32
    ):
        kinds = ("None, an integer in [0, 2**32) or a numpy RandomState" if allow_state
                 else "None or an integer in [0, 2**32)")
        raise ValueError(f"random_state must be {kinds}; got {random_state!r}")
    return int(random_state)
