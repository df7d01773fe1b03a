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


def _config(cls, name: str, options: dict[str, Any]):
    try:
        return cls.config_class(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise PrunekitError(f"bad options for method {name}: {problems}") from None


def build_method(name: str, options: dict[str, Any] | None = None, refine: str | None = None) -> PruningMethod:
    """The method with its validated config; with `refine`, wrapped by that refiner, whose options are
    the ones prefixed with its name (`dsnot.max_cycles=20`)."""
    from prunekit.methods.refine import REFINERS, RefinedMethod

    cls = METHODS.get(name)
    if cls is None:
        raise PrunekitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    options = dict(options or {})
    if refine is None:
        return cls(_config(cls, name, options))
    refiner_cls = REFINERS.get(refine)
    if refiner_cls is None:
        raise PrunekitError(f"unknown refiner {refine!r}; available: {', '.join(sorted(REFINERS))}")
    if getattr(cls, "structured", False) or getattr(cls, "block_level", False):
        raise PrunekitError(f"--refine {refine} refines per-layer masks; method {name} does not produce them")
    prefix = f"{refine}."
    own = {k[len(prefix):]: options.pop(k) for k in list(options) if k.startswith(prefix)}
    return RefinedMethod(cls(_config(cls, name, options)), refiner_cls(_config(refiner_cls, refine, own)))
