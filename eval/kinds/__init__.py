"""Benchmark kinds by name.

A kind is a ``chatvec.eval.kinds.base.Kind`` subclass. To add one, either drop a module into this package
whose name is the kind's name (``-`` written as ``_``) and which sets ``KIND = TheClass``, e.g.
``eval/kinds/task.py`` for a ``task`` kind (found automatically), or call ``register_kind(cls)``
from anywhere before the run (nothing is registered during a run).
"""

from __future__ import annotations

import importlib
import pkgutil

from chatvec.core.errors import InputError
from chatvec.eval.kinds.base import Kind

_REGISTRY: dict[str, type[Kind]] = {}
_MODULE_OF = {"lm-eval": "lmeval"}  # kinds whose module name is not the kind's name


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _module_name(kind: str) -> str:
    return _MODULE_OF.get(kind, kind.replace("-", "_"))


def kind_class(name: str) -> type[Kind]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    module_name = f"{__name__}.{_module_name(name)}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        module = None
    cls = getattr(module, "KIND", None) if module is not None and name not in ("base",) else None
    if cls is None or getattr(cls, "name", None) != name:
        raise InputError(f"unknown benchmark kind {name!r}; known kinds: {', '.join(kind_names())}")
    # not added to _REGISTRY: that holds explicit registrations only; the import system keeps the module
    return cls


def get_kind(name: str) -> Kind:
    return kind_class(name)()


def kind_names() -> list[str]:
    names = set(_REGISTRY)
    reverse = {v: k for k, v in _MODULE_OF.items()}
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            names.add(reverse.get(info.name, info.name.replace("_", "-")))
    return sorted(names)
