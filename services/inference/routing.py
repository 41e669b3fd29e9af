"""Which models answer a (symbol, interval): every served model whose package declares the pair.

The persistence baseline serves every pair; a trained model serves the pairs its package lists
(a per-symbol model one, a unified model many). A swap (hot reload, rollback, removal) replaces
a name's model in one step between two candles; routes are cached per pair and rebuilt after it.

Pure domain: no bus.
"""

from __future__ import annotations

from typing import Any, Iterable

from services.inference.package import ModelSpec


class Router:
    def __init__(self) -> None:
        self._models: dict[str, Any] = {}  # name -> loaded model (has ``.spec: ModelSpec``)
        self._routes: dict[tuple[str, str], tuple[Any, ...]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> Any | None:
        return self._models.get(name)

    def models(self) -> list[Any]:
        return list(self._models.values())

    def specs(self) -> list[ModelSpec]:
        return [m.spec for m in self._models.values()]

    def put(self, model: Any) -> Any | None:
        """Serve ``model`` under its name from now on; returns the model it replaced."""
        old = self._models.get(model.spec.name)
        self._models[model.spec.name] = model
        self._routes.clear()
        return old

    def remove(self, name: str) -> Any | None:
        old = self._models.pop(name, None)
        self._routes.clear()
        return old

    def route(self, symbol: str, interval: str) -> tuple[Any, ...]:
        key = (symbol, interval)
        got = self._routes.get(key)
        if got is None:
            got = self._routes[key] = tuple(m for m in self._models.values() if m.spec.serves(symbol, interval))
        return got

    def pairs(self) -> Iterable[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for m in self._models.values():
            out |= set(m.spec.pairs or ())
        return out
