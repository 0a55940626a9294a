"""Checks for method config values, for plugins' __post_init__. Each raises a one-line SurgeryError naming the
method, the option, what is allowed and what was given. Bools are never numbers here (True is an int to Python).
Also `one_line(exception)`, for messages that quote an exception raised by someone else's code."""
from __future__ import annotations

import math
import numbers

from .errors import SurgeryError


def one_line(e: BaseException, limit: int = 200) -> str:
    """'TypeError: what it said', whitespace collapsed and cut to `limit` characters."""
    text = " ".join(str(e).split())[:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _refuse(method: str, name: str, allowed: str, value):
    raise SurgeryError(f"{method}: {name} must be {allowed}, got {value!r}")


def integer(method: str, name: str, value, least: int | None = 1) -> None:
    """An int (not a bool) >= least; least=None allows any int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (least is not None and value < least):
        allowed = {None: "an integer", 0: "0 or a positive integer", 1: "a positive integer"}.get(
            least, f"an integer >= {least}")
        _refuse(method, name, allowed, value)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def positive(method: str, name: str, value) -> None:
    """A finite number above 0 (not nan, not a bool)."""
    if not (_real(value) and 0 < value < math.inf):
        _refuse(method, name, "a finite number above 0", value)


def fraction(method: str, name: str, value) -> None:
    """A number in [0, 1), such as a dropout probability."""
    if not (_real(value) and 0 <= value < 1):
        _refuse(method, name, "a number in [0, 1)", value)


def flag(method: str, name: str, value) -> None:
    if not isinstance(value, bool):
        _refuse(method, name, "true or false", value)


def selector(method: str, name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        _refuse(method, name, "a selector such as attn.q,attn.v or all-linear", value)
