"""What to prune: a sparsity and a pattern per layer.

A `SparsityTarget` is the contract between the engine and a method: prune this fraction of the
layer's weights, either freely (unstructured) or as N of every M consecutive input weights of a row.
A `SparsityPlan` maps layer names to targets, with overrides by name pattern.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from prunekit.errors import PrunekitError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityTarget:
    """Prune `sparsity` of a layer; with `n`/`m` set, exactly n of every m consecutive inputs per row."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def check_width(self, in_features: int, layer: str) -> None:
        """N:M needs M to divide the input width; say which layer breaks it."""
        if self.is_nm and in_features % self.m:  # type: ignore[operator]
            raise PrunekitError(
                f"pattern {self.pattern}: M={self.m} does not divide the input width {in_features} of "
                f"layer {layer}; choose an M that divides every prunable layer's input width"
            )


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Sparsity is a fraction in [0, 1): 1 would delete the layer."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PrunekitError(f"{what} {value!r} is not a number; expected a fraction in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise PrunekitError(f"{what} {value} is outside [0, 1); expected e.g. 0.5 for 50 %")
    return value


def parse_pattern(pattern: str | None, sparsity: float) -> SparsityTarget:
    """'unstructured' (or None) keeps `sparsity`; 'N:M' fixes the sparsity at N/M."""
    if pattern is None or str(pattern).strip().lower() in ("", "unstructured"):
        return SparsityTarget(check_sparsity(sparsity))
    match = _NM.match(str(pattern))
    if not match:
        raise PrunekitError(f"pattern {pattern!r} is not understood; expected 'unstructured' or 'N:M' like 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 2 or n < 1 or n >= m:
        raise PrunekitError(f"pattern {pattern}: need 1 <= N < M (N pruned of every M weights), got N={n}, M={m}")
    return SparsityTarget(n / m, n, m)


@dataclass
class SparsityPlan:
    """The default target, plus overrides whose glob pattern matches a layer's full name.

    The first matching override wins. Layers matching `skip` are not pruned at all.
    """

    default: SparsityTarget
    overrides: list[tuple[str, SparsityTarget]] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        sparsity: float,
        pattern: str | None = None,
        overrides: dict[str, float | str] | None = None,
        skip: list[str] | None = None,
    ) -> SparsityPlan:
        """Overrides map a glob to an unstructured sparsity (float) or an N:M pattern ('2:4')."""
        default = parse_pattern(pattern, sparsity)
        parsed: list[tuple[str, SparsityTarget]] = []
        for glob, value in (overrides or {}).items():
            if isinstance(value, str) and ":" in value:
                parsed.append((glob, parse_pattern(value, 0.0)))
            else:
                parsed.append((glob, SparsityTarget(check_sparsity(value, f"sparsity for {glob!r}"))))
        return cls(default, parsed, list(skip or []))

    def target_for(self, layer_name: str) -> SparsityTarget | None:
        if any(fnmatch.fnmatchcase(layer_name, glob) for glob in self.skip):
            return None
        for glob, target in self.overrides:
            if fnmatch.fnmatchcase(layer_name, glob):
                return target
        return self.default

    def describe(self) -> dict:
        return {
            "default": {"sparsity": self.default.sparsity, "pattern": self.default.pattern},
            "overrides": {g: {"sparsity": t.sparsity, "pattern": t.pattern} for g, t in self.overrides},
            "skip": self.skip,
        }
