"""Lazy package faces: a package lists which of its modules holds each public name, and a
name's module is imported on first use (PEP 562), so that importing one light module of
the package does not import its heavy siblings."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(
    package: str, homes: Mapping[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose names live in ``homes``.

    ``homes`` maps each public name to the submodule (relative name) that defines it.
    """
    names = sorted(homes)

    def module_getattr(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{homes[name]}", package), name)

    def module_dir() -> list[str]:
        return names

    return names, module_getattr, module_dir
