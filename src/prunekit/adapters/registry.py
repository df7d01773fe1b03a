"""Adapters registered by the `model_type` of a transformers config."""

from __future__ import annotations

from torch import nn

from prunekit.errors import PrunekitError

_ADAPTERS: dict[str, type] = {}


def register(cls: type) -> type:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module):
    """The adapter for a model, or one line naming its architecture and the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        arch = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
        raise PrunekitError(
            f"unsupported architecture {arch} (model_type {model_type!r}); supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return cls(model)
