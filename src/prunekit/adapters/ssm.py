"""Which linears of a state-space layer the unstructured methods prune: the `ssm_parts` option.

The paper's reference code ("On Pruning State-Space LLMs", Ghattas et al.) prunes only `in_proj` of the
Mamba mixers with Wanda, so that is the default; `--option ssm_parts=in_proj,x_proj,dt_proj,out_proj` (or
`all`) adds the others. Attention and MLP linears of hybrids are always pruned. The parts that stay dense are
expressed as skip globs of the sparsity plan, so every method, the streamed path and the manifest see them
the same way.
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import PrunekitError

OPTION = "ssm_parts"
DEFAULT_PARTS = ("in_proj",)


def split_ssm_parts(options: dict[str, Any] | None) -> tuple[dict[str, Any], list[str] | None]:
    """The method's own options and the requested SSM parts (None: the default), parsed before any work."""
    options = dict(options or {})
    if OPTION not in options:
        return options, None
    value = options.pop(OPTION)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = [str(p).strip() for p in value]
    else:
        raise PrunekitError(f"--option {OPTION}={value!r} is not a comma-separated list of SSM parts "
                            "(e.g. in_proj,out_proj or all)")
    if not parts:
        raise PrunekitError(f"--option {OPTION} is empty; name at least one SSM part (e.g. in_proj) or all")
    return options, parts


def ssm_skip_globs(adapter, parts: list[str] | None) -> list[str]:
    """Skip globs for the SSM linears outside `parts` (nothing for a model without SSM layers, where an explicit
    `ssm_parts` is refused in one line)."""
    available = dict(getattr(adapter, "ssm_parts", {}) or {})
    if not available:
        if parts is not None:
            raise PrunekitError(f"--option {OPTION} applies to state-space models; {adapter.family} has no SSM layers")
        return []
    if parts is None:
        parts = list(DEFAULT_PARTS)
    elif parts == ["all"]:
        parts = list(available)
    return adapter.ssm_skip_globs(parts)


def resolved_parts(adapter, parts: list[str] | None) -> list[str] | None:
    """The parts actually pruned, for the report (None for a model without SSM layers)."""
    available = list(getattr(adapter, "ssm_parts", {}) or {})
    if not available:
        return None
    if parts is None:
        return list(DEFAULT_PARTS)
    return available if parts == ["all"] else list(parts)


def check_structured_parts(parts: list[str] | None, method: str) -> None:
    """`ssm_parts` chooses linears for per-layer masks; a structured method removes whole pieces instead."""
    if parts is not None:
        raise PrunekitError(f"--option {OPTION} selects the SSM linears of unstructured methods; structured method "
                            f"{method} removes whole states, channels or heads (drop the option)")
