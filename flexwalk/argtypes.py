"""Argument types shared by the command lines (`flexwalk demo`, `flexwalk niah ...`)."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable


def density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def token_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts like 1024,2048, got {text!r}") from None
    if not values or min(values) < 128:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts >= 128, got {text!r}")
    return values


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = lo - 1
    if value < lo:
        raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {text!r}")
    return value


def comma_choices(allowed: Iterable[str], flag: str) -> Callable[[str], list[str]]:
    """An argument type: a non-empty comma-separated list, each item one of `allowed`."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in allowed for x in items):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: allowed {', '.join(allowed)} (comma-separated)")
        return items

    return parse
