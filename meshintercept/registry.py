"""Find backends through the ``meshintercept.backends`` entry-point group.

Built-in modes register the same way a third-party one does, so nothing in the core
imports a backend module by name. A plugin that fails to import is skipped and reported.
"""

from __future__ import annotations

from typing import Dict, Type

from meshintercept.errors import ModeUnavailable, UsageError

GROUP = "meshintercept.backends"

_cache: Dict[str, object] = {}
broken: Dict[str, str] = {}


def _entry_points():
    from importlib.metadata import entry_points

    eps = entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, []))  # Python < 3.10


def names() -> list:
    return sorted({ep.name for ep in _entry_points()})


def load(name: str) -> Type:
    """Return the backend class for a mode name; raise UsageError naming the available ones."""
    if name in _cache:
        return _cache[name]
    matches = [ep for ep in _entry_points() if ep.name == name]
    if not matches:
        available = ", ".join(names()) or "none (is meshintercept installed? run 'pip install -e .')"
        raise UsageError(f"unknown mode {name!r}; available modes: {available}.")
    try:
        cls = matches[0].load()
    except Exception as exc:  # a broken plugin must not take the CLI down
        broken[name] = f"{type(exc).__name__}: {exc}"
        raise ModeUnavailable(f"mode {name!r} failed to load ({exc}); reinstall the package that provides it.") from exc
    _cache[name] = cls
    return cls


def require(name: str) -> Type:
    """Like load, and also checks that the mode can run on this machine."""
    cls = load(name)
    reason = cls.unavailable_reason()
    if reason:
        raise ModeUnavailable(f"mode {name!r} cannot run here: {reason}")
    return cls
