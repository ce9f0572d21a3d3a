"""PEP 562 lazy exports: a package names what it offers without importing it.

``import cnncodes.extractor`` must stay cheap (reading a cache never loads torch), yet
``cnncodes.extractor.extract`` should still work. Each package's ``__init__`` therefore maps
its public names to the submodules defining them; a name is imported on first access.
"""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``; ``names`` maps each public name to the
    submodule (relative, e.g. ``".cache"``) that defines it."""

    def __getattr__(name: str):
        try:
            module = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
