"""String options checked against their ``Literal`` type, with one message that names the field and every value
it allows: ``taps='sobel' must be 'axial', 'isotropic', 'd4' or 'lattice'``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args


def one_of(names: Iterable[Any]) -> str:
    """``('a', 'b', 'c')`` -> ``"'a', 'b' or 'c'"``, for error messages."""
    shown = [repr(n) for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" or {shown[-1]}"


def check_choice(field: str, value: Any, allowed: Any) -> None:
    """Raise a ValueError naming ``field``, ``value`` and the allowed values unless ``value`` is one of ``allowed``:
    a ``Literal`` type or a collection of values."""
    names = get_args(allowed) or tuple(allowed)
    if value not in names:
        raise ValueError(f"{field}={value!r} must be {one_of(names)}")
