"""Structured pruning: remove whole heads and MLP channels, and save a physically smaller model.

layout.py (coupled groups and the GQA rule per family) → collect.py (one dense statistics pass) →
search.py (scores and the UL/AL structure searches, SEAP's logistic schedule) → shrink.py (plans,
bias compensation, smaller nn.Linear modules) → engine.py (the run) → io.py (reload without remote
code). The methods (flap, wanda-sp, magnitude-sp, seap) live in prunekit.methods like the others.
State-space layers (Mamba, Mamba-2, Bamba's mixers) have their own view: ssm.py (sizes, shrink, spec, rebuild)
and ssm_plan.py (collect-pass scores and the plans of ssm-state, ssm-headdim, ssm-headmerge and SSM-FLAP).

Names are imported on first use: the method files import this package while prunekit.methods is
still initialising, so nothing here may import the engine eagerly.
"""

from importlib import import_module

_EXPORTS = {
    "BlockStatistics": "collect", "collect_statistics": "collect",
    "StructuredReport": "engine", "count_parameters": "engine", "model_for_plan": "engine",
    "prune_structured": "engine", "save_outputs": "engine",
    "load": "io", "load_structured": "io", "structured_spec": "io",
    "BlockLayout": "layout", "LlamaStructure": "layout", "get_structure": "layout",
    "LayerPlan": "shrink", "StructurePlan": "shrink", "apply_plan": "shrink",
    "SsmPlan": "ssm", "SsmStructure": "ssm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"prunekit.structured.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'prunekit.structured' has no attribute {name!r}")
