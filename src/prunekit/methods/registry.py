"""Methods registered by name; `build_method` validates the config in one line on error."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from prunekit.errors import PrunekitError
from prunekit.methods.base import PruningMethod

METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, options: dict[str, Any] | None = None) -> PruningMethod:
    cls = METHODS.get(name)
    if cls is None:
        raise PrunekitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        config = cls.config_class(**(options or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise PrunekitError(f"bad options for method {name}: {problems}") from None
    return cls(config)
