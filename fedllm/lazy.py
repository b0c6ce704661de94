"""A module imported on first use: libraries that cost seconds and tens of MiB at import
(dp-accounting: 3 s, 30 MiB) stay out of every process that never calls them, and every
rank of a run pays for an import once per process."""
from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands in for `import name`: the first attribute read imports the module."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        module: ModuleType = importlib.import_module(self._name)  # a sys.modules lookup after the first
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
