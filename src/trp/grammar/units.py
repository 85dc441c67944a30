"""The registry of decoding units a ``<Unit>`` tag may name (``box``, ``mask``, …)."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_UNITS", "register_unit", "registered_units", "unregister_unit"]

DEFAULT_UNITS: tuple[str, ...] = ("box", "mask", "keypoint", "depth")

# Lower-case identifiers only: a unit name is written verbatim between tags and in task lines
# ("Unit: box Num: 2"), so it must not contain spaces, tags or newlines.
_UNIT_NAME = re.compile(r"[a-z][a-z0-9_]*")

_registry: list[str] = list(DEFAULT_UNITS)


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"unit name must be a str, got {type(name).__name__}")
    if _UNIT_NAME.fullmatch(name) is None:
        raise ValueError(f"unit name must match [a-z][a-z0-9_]*, got {name!r}")
    return name


def register_unit(name: str) -> None:
    """Add ``name`` to the units the parser, formatter and constrained decoder accept.

    Idempotent. The unit's head is found through :func:`trp.grammar.route_targets`, which groups
    parsed targets by unit name.
    """
    name = _check_name(name)
    if name not in _registry:
        _registry.append(name)


def unregister_unit(name: str) -> None:
    """Remove ``name`` from the registry (``KeyError`` when it is not registered)."""
    name = _check_name(name)
    if name not in _registry:
        raise KeyError(f"unit {name!r} is not registered (registered: {registered_units()})")
    _registry.remove(name)


def registered_units() -> tuple[str, ...]:
    """The registered unit names, in registration order."""
    return tuple(_registry)


def resolve_units(units: object) -> tuple[str, ...]:
    """``units`` as a validated tuple; ``None`` means the registry."""
    if units is None:
        return registered_units()
    if isinstance(units, str):
        raise TypeError("units must be a sequence of unit names, not a single str")
    out = tuple(_check_name(u) for u in units)  # type: ignore[attr-defined]
    if not out:
        raise ValueError("units must not be empty")
    return out
