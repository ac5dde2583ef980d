"""Registering the strategy names with Lightning without importing Lightning from the engine.

``import zo2_lightning`` calls :func:`register`: if ``lightning.pytorch`` is already loaded the names go into
its ``StrategyRegistry`` now, otherwise the first import of ``lightning.pytorch.strategies`` does it. Either
way ``import zo2_lightning.engine`` stays torch-only (docs/architecture.md, "Layers"), and the registry entries
build the strategy lazily, importing :mod:`zo2_lightning.strategy` only when a Trainer asks.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

_TARGET = "lightning.pytorch.strategies"

#: name -> (description, ZO2OffloadStrategy keyword arguments)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "zo2_offload": ("ZO2: blocks streamed from (pinned) host memory", {"offload_device": "cpu"}),
    "zo2_resident": ("MeZO with the whole model on the working device", {"offload_device": None}),
}


def _build(**kwargs: Any) -> Any:
    from zo2_lightning.strategy import ZO2OffloadStrategy

    return ZO2OffloadStrategy(**kwargs)


def register_into(registry: Any) -> None:
    """Put every preset into a Lightning ``_StrategyRegistry`` (idempotent)."""
    for name, (description, kwargs) in PRESETS.items():
        if name not in registry:
            registry.register(name, _build, description=description, **kwargs)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``lightning.pytorch.strategies`` so the presets register right after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the real finders from seeing us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            register_into(module.StrategyRegistry)

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def register() -> None:
    if _TARGET in sys.modules:
        register_into(sys.modules[_TARGET].StrategyRegistry)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
