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


def check_int(name: str, value: Any, minimum: int, error: type[ValueError] = ValueError, *,
              maximum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (and <= ``maximum`` when given; ``None`` passes
    with ``allow_none``); ``error`` (a ``ValueError``) naming the name and the value otherwise.
    The one integer check of the package (the bare ``int`` check: ``bool`` is refused)."""
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        extra = " or None" if allow_none else ""
        raise error(f"{name} must be an integer {span}{extra}; got {value!r}")
    return int(value)


def check_random_state(random_state: Any, *, allow_state: bool = False, allow_none: bool = True,
                       name: str = "random_state") -> Any:
    """``None`` (unless ``allow_none`` is false) or an int in [0, 2**32) (with
    ``allow_state``, also a ``numpy.random.RandomState``, returned as it is); ValueError
    naming ``name`` and the bad value otherwise. The one seed check of the package."""
    if random_state is None and allow_none:
        return None
    if allow_state and isinstance(random_state, np.random.RandomState):
        return random_state
    if (
        isinstance(random_state, bool)
        or not isinstance(random_state, numbers.Integral)
        or not 0 <= random_state < 2**32
    ):
        kinds = "an integer in [0, 2**32)"
        if allow_state:
            kinds += " or a numpy RandomState"
        if allow_none:
            kinds = "None, " + kinds if allow_state else "None or " + kinds
        raise ValueError(f"{name} must be {kinds}; got {random_state!r}")
    return int(random_state)
