"""Lazy attribute loading for package ``__init__`` files: ``import neat_lightning.modules`` stays cheap and one
model's optional dependencies never break another's import."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]):
    """Return a module ``__getattr__`` that imports ``exports[name]`` (a submodule) on first access."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
