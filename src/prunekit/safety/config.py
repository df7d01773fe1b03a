"""What defines a safety study (`SafetyConfig`) and the checks of its user-facing values.

`run.json` stores the fields that define a run (state.py), so a rerun continues it or is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prunekit.adapters.base import MLP_LINEAR_GLOBS
from prunekit.errors import PrunekitError

Log = Callable[[str], None]


@dataclass
class SafetyConfig:
    """Everything that defines a study; stored in results.json."""

    model: str
    tasks: str
    benign: str | None = None
    reference: str | None = None
    sparsities: list[float] = field(default_factory=list)
    method: str = "wanda"
    templates: list[str] | None = None  # None: every template known for the task file
    template_files: list[str] = field(default_factory=list)
    limit: int | None = None
    max_new_tokens: int = 64  # measured: verdicts at 32 and 64 tokens equal those at 256 (benchmarks/safety.py)
    batch_size: int = 16
    prompt_format: str = "auto"
    calib: str | None = None  # prunekit calibration source; None = "self"
    nsamples: int = 128
    seqlen: int | None = 512
    seed: int = 0
    device: str = "cpu"
    analyses: bool = False  # attention-to-task and prompt perplexity
    analyses_limit: int | None = None  # analyses on this many tasks (spread evenly) of the run's tasks
    ppl_source: str | None = None  # perplexity of each variant on this text source
    ppl_seqlen: int = 512
    ppl_max_windows: int | None = None
    judge_model: str | None = None  # a local chat model as second judge
    keep_token_ids: bool = False  # store answer token ids (for the max-new-tokens study)
    layers: str = "attention"  # the paper prunes the attention projections only (docs/safety.md)
    generation: str = "prefix"  # "prefix": shared-prefix KV cache; "plain": model.generate on whole prompts
    stop_early: bool = True  # end an answer once the judges' verdict is final (recorded in the answer)
    dense_from: str | None = None  # a run folder whose unpruned answers (and measurements) this run reuses
    baseline_batch_size: int | None = None  # --throughput-study: the old path's batch (default: batch_size)


#: --layers: which Linear layers Wanda prunes. The paper's code (CrystalEye42/eval-safety, lib/prune.py,
#: prune_wanda) skips every layer whose name contains "mlp", i.e. prunes q/k/v/o of the attention only.
LAYER_SKIPS: dict[str, list[str]] = {"attention": list(MLP_LINEAR_GLOBS), "all": []}
GENERATIONS = ("prefix", "plain")


def check_layers(value: str) -> str:
    if value not in LAYER_SKIPS:
        raise PrunekitError(f"unknown --layers {value!r}; expected {' or '.join(LAYER_SKIPS)}")
    return value


def check_sparsities(values: Sequence[float]) -> list[float]:
    out = []
    for v in values:
        if not 0.0 < float(v) < 1.0:
            raise PrunekitError(f"sparsity {v} must lie in (0, 1)")
        out.append(float(v))
    return out


def parse_list(text: str | None, flag: str, kind: type) -> list[Any]:
    """'0.1,0.2' → [0.1, 0.2]; a bad item is a one-line error naming the flag."""
    if not text:
        return []
    items = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            items.append(kind(part.strip()))
        except ValueError as error:
            raise PrunekitError(f"{flag} item {part.strip()!r} is not a {kind.__name__}") from error
    return items

